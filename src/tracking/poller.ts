import { schedule, type ScheduledTask } from 'node-cron';
import type { Destination, DestinationDirectory } from '../config';
import type { CentreObservation, DestinationAdapters, ReferralSummary, TrackingContext } from '../destinations';
import { nextDelay } from '../queue';
import { logger, pollCycles } from '../observability';
import type { ReferralStatus, ReportInfo, StoredReferral } from '../model';
import { bookingCode, defaultStatusTables } from '../hl7return';
import { type AppointmentObservation, changeStatus, type Db, getReferral, getWatermark, noteStatus, openAtDestination, setWatermark } from '../store';
import { centreContentType, centreText, MAX_REPORT_TITLE_CHARS, MAX_STATUS_REASON_CHARS } from './centre-text';
import { decideTransition, terminalStatuses } from './state';

export interface PollerOptions {
  /** Default schedule (cron, 5 or 6 fields); a destination's own `pollCron` wins. */
  cron: string;
  /** Look back this far before the watermark, against clock skew and late commits. */
  overlapMs: number;
  pageSize: number;
  /** How often the open referrals are checked by id, to notice Tasks deleted at the centre (default 1 h). */
  sweepEveryMs?: number;
  /** Longest URL for a batched `_id=a,b,c` read (default 4000 characters). */
  maxUrlLength?: number;
  /** Backoff while a destination fails: base and cap (defaults 30 s and 30 min). */
  backoffBaseMs?: number;
  backoffCapMs?: number;
}

export type StatusEvent = { referralId: string; status: ReferralStatus; previous: ReferralStatus; reason?: string };

export interface CycleStats {
  destination: string;
  mode: 'delta' | 'ids' | 'skipped';
  searches: number;
  tasksSeen: number;
  changes: number;
  error?: string;
  /** Why a cycle was skipped. */
  reason?: string;
}

interface DestinationState {
  /** When the last cycle ended, and its error when it failed (the console's destinations view). */
  lastCycleAt?: number;
  lastError?: string;
  failures: number;
  nextAttemptAt: number;
  /** The last cycle's mode (what a failed cycle reports). */
  mode: 'delta' | 'ids';
}

/**
 * Tracks the referrals at the centres: on each destination's schedule, one cycle by its adapter (which reads
 * what changed at the centre, e.g. the FHIR adapter's delta search), whose observations are applied here: the
 * Task state machine decides the referral's new status, which is recorded with its history and webhook. A
 * destination that fails backs off; one instance of the service polls each destination.
 */
export class Poller {
  private tasks: ScheduledTask[] = [];
  private running = new Map<string, Promise<CycleStats>>();
  private state = new Map<string, DestinationState>();

  constructor(
    private readonly db: Db,
    private readonly destinations: DestinationDirectory,
    private readonly adapters: DestinationAdapters,
    private readonly opts: PollerOptions,
    private readonly onStatusChange: (e: StatusEvent) => void = () => undefined
  ) {}

  start(): void {
    for (const id of this.destinations.ids()) {
      const dest = this.destinations.get(id) as Destination;
      const expr = dest.pollCron ?? this.opts.cron;
      this.tasks.push(schedule(expr, () => this.pollDestination(dest).then(() => undefined), { noOverlap: true, name: `poll-${id}` }));
    }
  }

  async stop(): Promise<void> {
    for (const t of this.tasks) await t.destroy();
    this.tasks = [];
    await Promise.allSettled([...this.running.values()]);
  }

  /** What the poller knows of a destination: its last cycle (when, and its error), failures in a row, when it tries next. */
  status(id: string): { lastCycleAt?: string; lastError?: string; failures: number; nextAttemptAt?: string } {
    const st = this.state.get(id);
    if (!st) return { failures: 0 };
    return {
      ...(st.lastCycleAt ? { lastCycleAt: new Date(st.lastCycleAt).toISOString() } : {}),
      ...(st.lastError ? { lastError: st.lastError } : {}),
      failures: st.failures,
      ...(st.nextAttemptAt ? { nextAttemptAt: new Date(st.nextAttemptAt).toISOString() } : {}),
    };
  }

  /** Polls every destination once, concurrently: a slow one does not delay the others. */
  async pollOnce(opts: { force?: boolean } = {}): Promise<CycleStats[]> {
    return Promise.all(this.destinations.ids().map((id) => this.pollDestination(this.destinations.get(id) as Destination, opts)));
  }

  private stateOf(id: string): DestinationState {
    let s = this.state.get(id);
    if (!s) {
      s = { failures: 0, nextAttemptAt: 0, mode: 'delta' };
      this.state.set(id, s);
    }
    return s;
  }

  /** One cycle for one destination; a second call while one runs joins it instead of overlapping. */
  pollDestination(dest: Destination, opts: { force?: boolean } = {}): Promise<CycleStats> {
    const existing = this.running.get(dest.id);
    if (existing) return existing;
    const st = this.stateOf(dest.id);
    if (!opts.force && Date.now() < st.nextAttemptAt) {
      return Promise.resolve({ destination: dest.id, mode: 'skipped', searches: 0, tasksSeen: 0, changes: 0 });
    }
    const end = pollCycles.startTimer({ destination: dest.id });
    const p = this.cycle(dest, st)
      .then((stats) => {
        st.failures = 0;
        st.nextAttemptAt = 0;
        st.lastError = undefined;
        if (stats.mode !== 'skipped') st.lastCycleAt = Date.now();
        return stats;
      })
      .catch((err: Error): CycleStats => {
        st.failures++;
        // The same exponential curve as delivery, without jitter: one poller per destination.
        const delay = nextDelay(st.failures, { baseMs: this.opts.backoffBaseMs ?? 30_000, capMs: this.opts.backoffCapMs ?? 30 * 60_000 }, () => 1);
        st.nextAttemptAt = Date.now() + delay;
        st.lastCycleAt = Date.now();
        st.lastError = err.message;
        logger.warn('poll cycle failed; backing off', { destination: dest.id, failures: st.failures, retryInMs: delay, error: err.message });
        return { destination: dest.id, mode: st.mode, searches: 0, tasksSeen: 0, changes: 0, error: err.message };
      })
      .finally(() => {
        end();
        this.running.delete(dest.id);
      });
    this.running.set(dest.id, p);
    return p;
  }

  private async cycle(dest: Destination, st: DestinationState): Promise<CycleStats> {
    const stats: CycleStats = { destination: dest.id, mode: st.mode, searches: 0, tasksSeen: 0, changes: 0 };
    // Several instances of the service on one PostgreSQL database: one of them polls each destination.
    if (!(await this.db.holdLock(`poll:${dest.id}`))) {
      return { ...stats, mode: 'skipped', reason: 'another instance polls this destination' };
    }
    const ctx: TrackingContext = {
      destination: dest,
      options: {
        overlapMs: this.opts.overlapMs,
        pageSize: this.opts.pageSize,
        sweepEveryMs: this.opts.sweepEveryMs ?? 3600_000,
        maxUrlLength: this.opts.maxUrlLength ?? 4000,
      },
      openReferrals: () => openAtDestination(this.db, dest.id),
      watermark: () => getWatermark(this.db, dest.id),
      advanceWatermark: (to) => setWatermark(this.db, dest.id, to),
      observe: async (o, resource) => {
        if (await this.safely(dest, resource, () => this.apply(dest, o))) stats.changes++;
      },
      counted: ({ requests = 0, seen = 0 }) => {
        stats.searches += requests;
        stats.tasksSeen += seen;
      },
    };
    st.mode = await this.adapters.for(dest).track(ctx);
    stats.mode = st.mode;
    if (stats.changes > 0) logger.info('poll cycle', { ...stats });
    return stats;
  }

  private async safely(dest: Destination, id: string | undefined, fn: () => Promise<boolean>): Promise<boolean> {
    try {
      return await fn();
    } catch (err) {
      logger.warn('could not apply a change from the centre', { destination: dest.id, resource: id, error: (err as Error).message });
      return false;
    }
  }

  /** The referral an observation is of, when it is one of this destination's. */
  private async referralOf(dest: Destination, referralId: string | undefined): Promise<StoredReferral | null> {
    if (!referralId) return null;
    const referral = await getReferral(this.db, referralId, { payload: false });
    return referral && referral.destination === dest.id ? referral : null;
  }

  /** Applies what the centre says of a referral. Returns whether the referral's status changed. */
  private async apply(dest: Destination, o: CentreObservation): Promise<boolean> {
    const referral = await this.referralOf(dest, o.referralId);
    if (!referral) return false;
    switch (o.kind) {
      case 'task':
        return this.applyTask(dest, referral, o);
      case 'withdrawn':
        if (referral.status === 'queued' || terminalStatuses.has(referral.status)) return false;
        return this.move(referral, 'cancelled', o.reason, o.detail);
    }
  }

  private async move(
    referral: StoredReferral,
    to: ReferralStatus,
    reason: string | null,
    detail: Record<string, unknown>,
    extra: { taskVersion?: string | null; report?: ReportInfo | null; appointment?: AppointmentObservation } = {}
  ): Promise<boolean> {
    const changed = await changeStatus(this.db, referral.id, { status: to, reason, detail, ...extra }, (cur) => cur.status === referral.status);
    if (!changed) return false;
    logger.info('referral status changed', { referralId: referral.id, from: changed.previous, to, ...detail });
    this.onStatusChange({ referralId: referral.id, status: to, previous: changed.previous, reason: reason ?? undefined });
    return true;
  }

  /** Applies one version of the centre's Task to its referral. */
  private async applyTask(dest: Destination, referral: StoredReferral, task: Extract<CentreObservation, { kind: 'task' }>): Promise<boolean> {
    const version = task.version;
    if (version && version === referral.taskVersion) return false; // seen already (overlap window)
    if (referral.status === 'queued' || referral.status === 'delivery-failed') return false; // ids not recorded yet
    const decision = decideTransition(referral.status, task.taskStatus);
    const reason = centreText(task.reason, MAX_STATUS_REASON_CHARS);
    // Whether the centre has booked the board: recorded with the version, a 360X sender is sent SIU^S12 once per booking.
    const appointment = appointmentOf(task);
    switch (decision.kind) {
      case 'unknown':
      case 'impossible':
        await noteStatus(this.db, referral.id, referral.status, `warning: ${decision.why} (Task version ${version ?? '?'}); not applied`, {
          taskVersion: version,
        });
        await changeStatus(this.db, referral.id, { status: referral.status, taskVersion: version });
        logger.warn('Task change not applied', { referralId: referral.id, destination: dest.id, why: decision.why, taskVersion: version });
        return false;
      case 'same':
        // Same status, new version: keep the centre's latest business status and reason.
        await changeStatus(this.db, referral.id, { status: referral.status, taskVersion: version, reason: reason ?? null, appointment });
        return false;
      case 'move': {
        let report: ReportInfo | null | undefined;
        if (decision.to === 'completed') {
          report = await this.readReport(task, referral).catch((err: Error) => {
            logger.warn('could not read the report', { referralId: referral.id, error: err.message });
            return null;
          });
        }
        const detail: Record<string, unknown> = { taskStatus: task.taskStatus, taskVersion: version };
        if (task.businessStatus !== undefined) detail.businessStatus = task.businessStatus;
        const voided = task.taskStatus === 'entered-in-error' ? 'voided at the centre (entered-in-error)' : null;
        return this.move(referral, decision.to, voided ?? reason ?? null, detail, {
          taskVersion: version,
          appointment,
          ...(report !== undefined ? { report } : {}),
        });
      }
    }
  }

  /** The opinion report as the adapter found it, its title and content type bounded and cleaned. */
  private async readReport(task: Extract<CentreObservation, { kind: 'task' }>, referral: ReferralSummary): Promise<ReportInfo | null> {
    const report = await task.report(referral);
    return report && { ...report, title: centreText(report.title, MAX_REPORT_TITLE_CHARS), contentType: centreContentType(report.contentType) };
  }
}

/** A FHIR dateTime (a year to an instant with its zone); anything else from the centre is not used. */
const FHIR_DATE_TIME = /^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2}))?)?)?$/;

/**
 * What a Task version says of the booking of the board: booked when a code of its business status is a booking one
 * (mappings/hl7v2-status.json `appointment`), with the start it gives. Undefined when it has no business status: that
 * leaves the booking as it was (a version that drops the business status is not a new booking when it comes back).
 */
function appointmentOf(task: Extract<CentreObservation, { kind: 'task' }>): AppointmentObservation | undefined {
  const codes = task.businessStatusCodes ?? [];
  if (task.businessStatus === undefined && codes.length === 0) return undefined;
  const booking = bookingCode(defaultStatusTables(), codes);
  const start = task.appointmentStart && FHIR_DATE_TIME.test(task.appointmentStart) ? task.appointmentStart : null;
  return { booked: booking !== undefined, code: booking?.code ?? '', start };
}
