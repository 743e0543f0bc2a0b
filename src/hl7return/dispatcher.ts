import { Counter } from 'prom-client';
import { defaultV2Tables, MllpError, sendMllp, type V2Tables } from '../intake';
import type { StoredReferral } from '../model';
import { logger, metricsRegistry } from '../observability';
import { type DispatcherOptions, LeasedQueueRunner, settleRetry, withDefaults } from '../queue';
import { type Db, getReferral, hl7Origin, hl7ReturnQueue, type Hl7ReturnEntry, leasedQueue, noteStatus, type Settled, ulid } from '../store';
import { readAck } from './ack';
import { type ReportAttachment, statusMessages } from './message';
import { collectReport, reportBytesWithin, type ReportStream } from './report';
import { defaultStatusTables, type StatusTables } from './tables';

/** DispatcherOptions (src/queue) with HL7 defaults: 10 attempts or 24 h, backoff 10 s to 1 h, 30 s per exchange (connect, send, ACK), 4 in flight. */
export type Hl7ReturnOptions = DispatcherOptions;

export const HL7_RETURN_DEFAULTS: Readonly<Hl7ReturnOptions> = Object.freeze({
  maxAttempts: 10,
  maxAgeMs: 24 * 3600_000,
  baseDelayMs: 10_000,
  maxDelayMs: 3600_000,
  timeoutMs: 30_000,
  idleMs: 1000,
  concurrency: 4,
  stopGraceMs: 2000,
});

/** What the dispatcher needs besides the store: the report's bytes (through the referral's destination adapter). */
export interface Hl7ReturnDeps {
  /** The report as a stream; the dispatcher reads it whole, up to `maxReportBytes`. */
  readReport(referral: StoredReferral, opts: { signal: AbortSignal }): Promise<ReportStream>;
  /**
   * The largest report put in a message (it goes Base64 in OBX-5); a larger one is left out, the status sent
   * without it and the referral's history saying so. Default: what fits in a 25 MiB message (reportBytesWithin).
   */
  maxReportBytes?: number;
  /** The code tables (tests); default mappings/hl7v2-status.json and mappings/hl7v2.json. */
  tables?: StatusTables;
  v2Tables?: V2Tables;
}

/** The message size the report's default cap is derived from (MAX_BODY_BYTES's default). */
const DEFAULT_MAX_MESSAGE_BYTES = 25 * 1024 * 1024;

const hl7Attempts = new Counter({
  name: 'referral_hl7_return_attempts_total',
  help: 'HL7 v2 status messages sent back to referrers, by result (acknowledged, retry, failed)',
  labelNames: ['result'] as const,
  registers: [metricsRegistry],
});

type Attempt =
  | { kind: 'acknowledged'; messages: number; reportLeftOut?: string }
  | { kind: 'retry'; reason: string; ack?: string }
  | { kind: 'fail'; reason: string; ack?: string }
  | { kind: 'aborted' };

/**
 * Sends the status changes queued in `hl7_outbox` back to the HL7 v2 senders of the referrals, over MLLP to the
 * client's return channel: RRI^I12 to a REF^I12 sender, OSU^O51 (and ORU^R01 with the report) to an OMG^O19 sender,
 * and to the latter SIU^S12 when the centre books the board.
 * Each message is built when it is sent, from the referral as stored; the receiver's acknowledgement decides: AA or
 * CA done; AE or CE dead letter with the receiver's error text; AR, CR, no or another answer, a timeout or a refused
 * connection retried (settleRetry) until the attempts or the age run out. Leased like the other outboxes: several
 * processes may run side by side, and a crash means the message is sent again (the same control ids).
 * Logs name ids, message types, statuses and acknowledgement codes, never the message or what the receiver wrote.
 */
export class Hl7ReturnDispatcher extends LeasedQueueRunner<Hl7ReturnEntry> {
  readonly workerId = `h7_${ulid()}`;
  protected readonly opts: Hl7ReturnOptions;
  protected readonly kind = 'hl7-return';
  private shutdown = new AbortController();

  constructor(
    private readonly db: Db,
    private readonly deps: Hl7ReturnDeps,
    opts: Partial<Hl7ReturnOptions> = {}
  ) {
    super();
    this.opts = withDefaults(HL7_RETURN_DEFAULTS, opts);
  }

  start(): void {
    if (this.running) return;
    this.shutdown = new AbortController();
    // Read the tables now: a broken table stops start-up instead of dead-lettering every message.
    this.tables();
    this.startLoop();
  }

  /** Stops taking messages; exchanges in flight get `stopGraceMs`, then are aborted (not counted, sent again after the restart). */
  async stop(): Promise<void> {
    await this.stopWithGrace(this.opts.stopGraceMs, () => this.shutdown.abort());
    await leasedQueue.releaseLeases(this.db, hl7ReturnQueue, this.workerId).catch(() => undefined);
  }

  protected claim(free: number): Promise<Hl7ReturnEntry[]> {
    return leasedQueue.claim(this.db, hl7ReturnQueue, this.workerId, free, this.opts.timeoutMs * 3 + 10_000);
  }

  private tables(): { tables: StatusTables; v2Tables: V2Tables } {
    return { tables: this.deps.tables ?? defaultStatusTables(), v2Tables: this.deps.v2Tables ?? defaultV2Tables() };
  }

  protected async process(entry: Hl7ReturnEntry): Promise<void> {
    const attempts = entry.attempts + 1;
    const ids = { hl7Id: entry.id, referralId: entry.referralId, seq: entry.seq, message: entry.message, status: entry.status, family: entry.family };
    const started = Date.now();
    const result = await this.attempt(entry);
    const durationMs = Date.now() - started;
    let applied = true;
    switch (result.kind) {
      case 'aborted':
        // Shutdown: not counted; stop() releases the lease.
        return;
      case 'acknowledged':
        applied = await this.settle(entry, { state: 'done', attempts });
        hl7Attempts.inc({ result: 'acknowledged' });
        logger.info('HL7 v2 status sent back', { ...ids, attempts, messages: result.messages, durationMs });
        if (applied && result.reportLeftOut) await this.noteReportLeftOut(entry, result.reportLeftOut);
        break;
      case 'fail':
        applied = await this.settle(entry, { state: 'failed', attempts, lastError: result.reason });
        hl7Attempts.inc({ result: 'failed' });
        logger.error('HL7 v2 status message failed permanently', { ...ids, attempts, ack: result.ack });
        break;
      case 'retry': {
        const settled = settleRetry(attempts, Date.parse(entry.createdAt), result.reason, this.opts);
        if (settled.kind === 'dead-letter') {
          applied = await this.settle(entry, { state: 'failed', attempts, lastError: settled.reason });
          hl7Attempts.inc({ result: 'failed' });
          logger.error('HL7 v2 status message failed permanently', { ...ids, attempts, ack: result.ack });
          break;
        }
        applied = await this.settle(entry, { state: 'retry', attempts, nextAttemptAt: new Date(settled.at).toISOString(), lastError: result.reason });
        hl7Attempts.inc({ result: 'retry' });
        logger.warn('HL7 v2 status message will be retried', { ...ids, attempts, ack: result.ack, delayMs: settled.delayMs, durationMs });
        break;
      }
    }
    if (!applied) logger.warn('HL7 v2 status message lease was lost before the outcome was recorded', { ...ids, attempts });
  }

  private settle(entry: Hl7ReturnEntry, outcome: Settled): Promise<boolean> {
    return leasedQueue.settle(this.db, hl7ReturnQueue, entry.id, this.workerId, outcome);
  }

  /** One attempt: the messages of the change, built from the stored referral, each sent and acknowledged in turn. */
  private async attempt(entry: Hl7ReturnEntry): Promise<Attempt> {
    const [origin, referral] = await Promise.all([hl7Origin(this.db, entry.referralId), getReferral(this.db, entry.referralId)]);
    if (!origin || !referral) return { kind: 'fail', reason: 'the referral or where it came from is no longer stored' };
    let report: ReportAttachment | undefined;
    let reportLeftOut: string | undefined;
    if (entry.message === 'status' && entry.status === 'completed' && referral.report) {
      try {
        const maxBytes = this.deps.maxReportBytes ?? reportBytesWithin(DEFAULT_MAX_MESSAGE_BYTES);
        report = await collectReport(await this.deps.readReport(referral, { signal: this.shutdown.signal }), maxBytes);
      } catch (err) {
        reportLeftOut = (err as Error).message.slice(0, 300) || 'the report could not be read';
      }
    }
    const { tables, v2Tables } = this.tables();
    const messages = statusMessages({ origin, referral, change: entry, report, tables, v2Tables });
    for (const m of messages) {
      let reply: Buffer;
      try {
        reply = await sendMllp(entry.channel.host, entry.channel.port, m.text, { timeoutMs: this.opts.timeoutMs, signal: this.shutdown.signal });
      } catch (err) {
        if (this.shutdown.signal.aborted) return { kind: 'aborted' };
        return { kind: 'retry', reason: `${m.type}: ${sendProblem(err)}` };
      }
      const verdict = readAck(reply, m.controlId);
      if (verdict.kind === 'error') return { kind: 'fail', reason: `${m.type} refused by the receiver: ${verdict.reason}`, ack: verdict.code };
      if (verdict.kind === 'retry') return { kind: 'retry', reason: `${m.type}: ${verdict.reason}`, ack: verdict.code };
    }
    return { kind: 'acknowledged', messages: messages.length, ...(reportLeftOut ? { reportLeftOut } : {}) };
  }

  /** The status went back without the report, which could not be read: said in the referral's history. */
  private async noteReportLeftOut(entry: Hl7ReturnEntry, why: string): Promise<void> {
    const current = await getReferral(this.db, entry.referralId, { payload: false });
    if (!current) return;
    await noteStatus(this.db, entry.referralId, current.status, `HL7 v2 status ${entry.status} sent back without the report: ${why}`, { hl7Id: entry.id });
    logger.warn('HL7 v2 status sent back without the report', { hl7Id: entry.id, referralId: entry.referralId });
  }
}

/** Why an exchange failed, without the reply: a timeout, a close, a refused connection (node's error code). */
function sendProblem(err: unknown): string {
  if (err instanceof MllpError) return err.message;
  const code = (err as { code?: unknown }).code;
  return `connection failed: ${typeof code === 'string' ? code : (err as Error).name}`;
}
