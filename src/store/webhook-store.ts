import { type ExpressionBuilder, type Kysely, sql } from 'kysely';
import type { Db } from './db';
import { nowIso } from './ids';
import type { Database, WebhookOutboxTable } from './schema';

/**
 * pending   — waiting for (or in) a delivery attempt;
 * delivered — the receiver answered 2xx;
 * failed    — dead-lettered after the maximum attempts or age; an operator may re-queue it.
 */
export type WebhookState = 'pending' | 'delivered' | 'failed';

export interface WebhookEntry {
  /** Also the `webhook-id` header: stable across retries, so a receiver can de-duplicate on it. */
  id: string;
  referralId: string;
  seq: number;
  url: string;
  /** The event body exactly as stored by the status change; it is sent and signed byte for byte. */
  payload: string;
  state: WebhookState;
  attempts: number;
  nextAttemptAt: string;
  lockedBy: string | null;
  lockedUntil: string | null;
  lastError: string | null;
  /** When the current delivery round began: the status change, or the operator's re-queue. */
  createdAt: string;
  updatedAt: string;
}

function toEntry(row: WebhookOutboxTable): WebhookEntry {
  return {
    id: row.id,
    referralId: row.referral_id,
    seq: Number(row.seq),
    url: row.url,
    payload: row.payload,
    state: row.state as WebhookState,
    attempts: Number(row.attempts),
    nextAttemptAt: row.next_attempt_at,
    lockedBy: row.locked_by,
    lockedUntil: row.locked_until,
    lastError: row.last_error,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}

/**
 * The status-webhook outbox. Rows are written by ReferralStore.changeStatus in the same transaction
 * as the status change; this store leases them to dispatchers and records the outcome.
 *
 * Ordering: events of one referral are delivered in `seq` order. A row is claimable only while no
 * earlier row of the same referral is `pending` (waiting, backing off or in flight), so a receiver
 * that keeps failing holds back the later events of that referral, and no other referral's.
 * A dead-lettered (`failed`) row no longer holds anything back: the later events proceed, and a
 * replay (requeue) sends the old event after them — receivers should order by the event's `at`.
 */
/** No earlier event of the same referral (row alias `w`) is still pending: events go out in order. */
function noEarlierPending({ not, exists, selectFrom }: ExpressionBuilder<Database & { w: WebhookOutboxTable }, 'w'>) {
  return not(
    exists(
      selectFrom('webhook_outbox as p')
        .select('p.id')
        .whereRef('p.referral_id', '=', 'w.referral_id')
        .where('p.state', '=', 'pending')
        .whereRef('p.seq', '<', 'w.seq')
    )
  );
}

export class WebhookStore {
  constructor(readonly db: Db) {}

  private get k(): Kysely<Database> {
    return this.db.kysely;
  }

  /**
   * Leases up to `limit` due rows to `workerId` for `leaseMs`. Each row is taken by a conditional
   * update (still pending, lease free or expired, no earlier pending row of its referral), so two
   * workers — in one process or several — never hold the same row, nor two rows of one referral.
   */
  async claim(workerId: string, limit: number, leaseMs: number, now = new Date()): Promise<WebhookEntry[]> {
    if (limit <= 0) return [];
    const nowS = now.toISOString();
    const candidates = await this.k
      .selectFrom('webhook_outbox as w')
      .selectAll('w')
      .where('w.state', '=', 'pending')
      .where('w.next_attempt_at', '<=', nowS)
      .where((eb) => eb.or([eb('w.locked_until', 'is', null), eb('w.locked_until', '<', nowS)]))
      .where(noEarlierPending)
      .orderBy('w.next_attempt_at')
      .orderBy('w.seq')
      .limit(limit)
      .execute();
    const until = new Date(now.getTime() + leaseMs).toISOString();
    const claimed: WebhookEntry[] = [];
    for (const c of candidates) {
      // The order condition is checked again in the update: a re-queued earlier event may have
      // become pending since the select.
      const res = await this.k
        .updateTable('webhook_outbox as w')
        .set({ locked_by: workerId, locked_until: until, updated_at: nowS })
        .where('w.id', '=', c.id)
        .where('w.state', '=', 'pending')
        .where((eb) => eb.or([eb('w.locked_until', 'is', null), eb('w.locked_until', '<', nowS)]))
        .where(noEarlierPending)
        .executeTakeFirst();
      if (Number(res.numUpdatedRows) === 1) {
        claimed.push(toEntry({ ...c, locked_by: workerId, locked_until: until, updated_at: nowS }));
      }
    }
    return claimed;
  }

  /**
   * The outcome updates below apply only while `workerId` still holds the row: a worker whose lease
   * expired and was taken over leaves the decision to the new holder. They return whether they applied.
   */
  async markDelivered(id: string, workerId: string, attempts: number): Promise<boolean> {
    return this.finish(id, workerId, { state: 'delivered', attempts, last_error: null });
  }

  /** Dead-letters a row (after the maximum attempts or age, or an unusable URL). */
  async markFailed(id: string, workerId: string, attempts: number, lastError: string): Promise<boolean> {
    return this.finish(id, workerId, { state: 'failed', attempts, last_error: lastError });
  }

  /** Records a failed attempt and when to try again; the row stays pending (and keeps its referral's later rows waiting). */
  async reschedule(id: string, workerId: string, attempts: number, nextAttemptAt: string, lastError: string): Promise<boolean> {
    return this.finish(id, workerId, { state: 'pending', attempts, next_attempt_at: nextAttemptAt, last_error: lastError });
  }

  private async finish(id: string, workerId: string, set: Partial<WebhookOutboxTable>): Promise<boolean> {
    const r = await this.k
      .updateTable('webhook_outbox')
      .set({ ...set, locked_by: null, locked_until: null, updated_at: nowIso() })
      .where('id', '=', id)
      .where('state', '=', 'pending')
      .where('locked_by', '=', workerId)
      .executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  /** Releases the leases a worker holds (clean shutdown), so another process can take them at once. */
  async releaseLeases(workerId: string): Promise<void> {
    await this.k
      .updateTable('webhook_outbox')
      .set({ locked_by: null, locked_until: null, updated_at: nowIso() })
      .where('locked_by', '=', workerId)
      .where('state', '=', 'pending')
      .execute();
  }

  /** Most recently changed first. */
  async list(state: WebhookState, limit = 100): Promise<WebhookEntry[]> {
    const rows = await this.k
      .selectFrom('webhook_outbox')
      .selectAll()
      .where('state', '=', state)
      .orderBy('updated_at', 'desc')
      .orderBy('id', 'desc')
      .limit(limit)
      .execute();
    return rows.map(toEntry);
  }

  async get(id: string): Promise<WebhookEntry | null> {
    const row = await this.k.selectFrom('webhook_outbox').selectAll().where('id', '=', id).executeTakeFirst();
    return row ? toEntry(row) : null;
  }

  /** A referral's events in order. */
  async forReferral(referralId: string): Promise<WebhookEntry[]> {
    const rows = await this.k.selectFrom('webhook_outbox').selectAll().where('referral_id', '=', referralId).orderBy('seq').execute();
    return rows.map(toEntry);
  }

  /** Rows still pending and dead-lettered (failed), for the backlog gauges (/metrics). */
  async openCounts(): Promise<Array<{ state: string; count: number }>> {
    const rows = await this.k
      .selectFrom('webhook_outbox')
      .select(['state', (eb) => eb.fn.countAll<string>().as('n')])
      .where('state', 'in', ['pending', 'failed'])
      .groupBy('state')
      .execute();
    return rows.map((r) => ({ state: r.state, count: Number(r.n) }));
  }

  async pendingCount(): Promise<number> {
    const r = await this.k
      .selectFrom('webhook_outbox')
      .select(sql<number>`count(*)`.as('n'))
      .where('state', '=', 'pending')
      .executeTakeFirst();
    return Number(r?.n ?? 0);
  }

  /**
   * Re-queues a dead-lettered row (admin replay): pending again, attempts 0, due now, with a fresh
   * age window (`created_at` restarts, since the maximum age counts from it). Same id, so the
   * receiver can still de-duplicate. Returns false when there is no failed row with this id.
   */
  async requeue(id: string): Promise<boolean> {
    const at = nowIso();
    const r = await this.k
      .updateTable('webhook_outbox')
      .set({ state: 'pending', attempts: 0, next_attempt_at: at, last_error: null, locked_by: null, locked_until: null, created_at: at, updated_at: at })
      .where('id', '=', id)
      .where('state', '=', 'failed')
      .executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }
}
