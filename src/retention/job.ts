import { schedule, type ScheduledTask } from 'node-cron';
import { logger, retentionActions } from '../observability';
import { closedBefore, type Db, deleteClosed, forgetAnswersBefore, removeDocumentBytes } from '../store';
import { closedStatuses, cutoff, type RetentionPolicy } from './policy';

export interface RetentionRun {
  /** Referrals whose inline document bytes were removed, and how many documents that was. */
  referralsStripped: number;
  documentsStripped: number;
  referralsDeleted: number;
  /** Blobs (streamed documents' bytes) no referral names any more, removed. */
  blobsDeleted: number;
  skipped?: string;
}

/** Removes the blobs no referral names (streamed documents whose referral was deleted or stripped, uploads a crash cut off). */
export interface BlobCollector {
  collect(now: Date): Promise<number>;
}

const BATCH = 100;
/** How long the acknowledgement of an inbound message (HL7 v2) is kept to answer a resend with it. */
export const INBOUND_ANSWER_DAYS = 30;

/**
 * Applies `apply` to the referrals `next` finds due, batch by batch, until none is left, or until a
 * whole batch was no longer due when rechecked (it changed under us; the next run sees it).
 */
async function eachDue(next: () => Promise<string[]>, apply: (id: string) => Promise<boolean>): Promise<void> {
  for (let ids = await next(); ids.length > 0; ids = await next()) {
    let progress = 0;
    for (const id of ids) if (await apply(id)) progress++;
    if (progress === 0) return;
  }
}

/**
 * Applies the retention policy on a schedule (RETENTION_CRON): closed referrals lose their inline
 * document bytes after `documentDays`, and are deleted after `referralDays`. The gateway is a relay,
 * not a record system: the EHR and the centre keep the documents. One instance runs it at a time.
 */
export class RetentionJob {
  private task: ScheduledTask | undefined;
  private running: Promise<RetentionRun> | undefined;

  constructor(
    private readonly db: Db,
    private readonly policy: RetentionPolicy & { cron: string },
    private readonly blobs?: BlobCollector
  ) {}

  start(): void {
    const { documentDays, referralDays, cron } = this.policy;
    logger.info('retention of closed referrals', {
      documentBytes: documentDays > 0 ? `removed ${documentDays} days after closing` : 'kept',
      referrals: referralDays > 0 ? `deleted ${referralDays} days after closing` : 'kept',
      ...(documentDays > 0 || referralDays > 0 ? { schedule: cron } : {}),
    });
    // Unreferenced blobs are collected on the same schedule even when referrals and their documents are kept.
    if (documentDays === 0 && referralDays === 0 && !this.blobs) return;
    this.task = schedule(this.policy.cron, () => this.run().then(() => undefined), { noOverlap: true, name: 'retention' });
  }

  async stop(): Promise<void> {
    await this.task?.stop();
    await this.running?.catch(() => undefined);
  }

  /** One pass over everything due at `now`; a second call while one runs joins it. */
  run(now = new Date()): Promise<RetentionRun> {
    this.running ??= this.pass(now).finally(() => (this.running = undefined));
    return this.running;
  }

  private async pass(now: Date): Promise<RetentionRun> {
    const result: RetentionRun = { referralsStripped: 0, documentsStripped: 0, referralsDeleted: 0, blobsDeleted: 0 };
    if (!(await this.db.holdLock('retention'))) return { ...result, skipped: 'another instance runs retention' };
    try {
      if (this.policy.referralDays > 0) {
        const due = { statuses: closedStatuses, cutoff: cutoff(now, this.policy.referralDays) };
        await eachDue(
          () => closedBefore(this.db.kysely, { ...due, limit: BATCH }),
          async (id) => {
            const deleted = await deleteClosed(this.db, id, due);
            if (deleted) result.referralsDeleted++;
            return deleted;
          }
        );
      }
      if (this.policy.documentDays > 0) {
        const due = { statuses: closedStatuses, cutoff: cutoff(now, this.policy.documentDays) };
        await eachDue(
          () => closedBefore(this.db.kysely, { ...due, documentsKept: true, noFailedDelivery: true, limit: BATCH }),
          async (id) => {
            const removed = await removeDocumentBytes(this.db, id, due, now.toISOString());
            if (removed === null) return false;
            result.referralsStripped++;
            result.documentsStripped += removed;
            return true;
          }
        );
      }
      // The answers kept for resends (src/store/inbound-messages.ts) name referral ids, not patients; a month is plenty.
      await forgetAnswersBefore(this.db, cutoff(now, INBOUND_ANSWER_DAYS));
      if (this.blobs) result.blobsDeleted = await this.blobs.collect(now);
    } catch (err) {
      logger.error('retention run failed; the next run resumes', { error: (err as Error).message });
      throw err;
    } finally {
      retentionActions.inc({ action: 'documents-removed' }, result.referralsStripped);
      retentionActions.inc({ action: 'referral-deleted' }, result.referralsDeleted);
    }
    if (result.referralsStripped + result.referralsDeleted + result.blobsDeleted > 0) logger.info('retention applied', { ...result });
    return result;
  }
}
