import type { Attachment, DiagnosticReport, DocumentReference, Reference, ServiceRequest, Task } from '@medplum/fhirtypes';
import { schedule, type ScheduledTask } from 'node-cron';
import type { Destination, DestinationDirectory } from '../config';
import type { FhirClients } from '../destinations';
import { nextDelay } from '../queue';
import { FhirRequestError } from '../fhir';
import { GATEWAY_TAG_SEARCH, REFERRAL_IDENTIFIER_SYSTEM } from '../mapping';
import { logger, pollCycles } from '../observability';
import type { ReferralStatus, ReportInfo, StoredReferral } from '../model';
import { changeStatus, type Db, getReferral, getWatermark, noteStatus, openAtDestination, setWatermark } from '../store';
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
  failures: number;
  nextAttemptAt: number;
  /** The server refused `_lastUpdated` searches: read open Tasks by id instead. */
  idsOnly: boolean;
  lastSweepAt: number;
}

/**
 * Tracks the centre's Tasks. Per destination and cycle: one delta search for the gateway's Tasks
 * changed since the watermark (server time, minus an overlap), following `next` links, plus one for
 * its ServiceRequests (revoked or completed at the centre). It never asks once per referral: servers
 * that cannot search by `_lastUpdated` get batched `_id=a,b,c` reads of the open Tasks.
 */
export class Poller {
  private tasks: ScheduledTask[] = [];
  private running = new Map<string, Promise<CycleStats>>();
  private state = new Map<string, DestinationState>();

  constructor(
    private readonly db: Db,
    private readonly destinations: DestinationDirectory,
    private readonly clients: FhirClients,
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

  /** Polls every destination once, concurrently: a slow one does not delay the others. */
  async pollOnce(opts: { force?: boolean } = {}): Promise<CycleStats[]> {
    return Promise.all(this.destinations.ids().map((id) => this.pollDestination(this.destinations.get(id) as Destination, opts)));
  }

  private stateOf(id: string): DestinationState {
    let s = this.state.get(id);
    if (!s) {
      s = { failures: 0, nextAttemptAt: 0, idsOnly: false, lastSweepAt: Date.now() };
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
        return stats;
      })
      .catch((err: Error): CycleStats => {
        st.failures++;
        // The same exponential curve as delivery, without jitter: one poller per destination.
        const delay = nextDelay(st.failures, { baseMs: this.opts.backoffBaseMs ?? 30_000, capMs: this.opts.backoffCapMs ?? 30 * 60_000 }, () => 1);
        st.nextAttemptAt = Date.now() + delay;
        logger.warn('poll cycle failed; backing off', { destination: dest.id, failures: st.failures, retryInMs: delay, error: err.message });
        return { destination: dest.id, mode: st.idsOnly ? 'ids' : 'delta', searches: 0, tasksSeen: 0, changes: 0, error: err.message };
      })
      .finally(() => {
        end();
        this.running.delete(dest.id);
      });
    this.running.set(dest.id, p);
    return p;
  }

  private async cycle(dest: Destination, st: DestinationState): Promise<CycleStats> {
    const stats: CycleStats = { destination: dest.id, mode: st.idsOnly ? 'ids' : 'delta', searches: 0, tasksSeen: 0, changes: 0 };
    // Several instances of the service on one PostgreSQL database: one of them polls each destination.
    if (!(await this.db.holdLock(`poll:${dest.id}`))) {
      return { ...stats, mode: 'skipped', reason: 'another instance polls this destination' };
    }
    if (!st.idsOnly) {
      try {
        await this.deltaCycle(dest, stats);
      } catch (err) {
        if (err instanceof FhirRequestError && (err.status === 400 || err.status === 501 || err.status === 422)) {
          st.idsOnly = true;
          stats.mode = 'ids';
          logger.warn('destination refuses _lastUpdated searches: polling open Tasks by id instead', { destination: dest.id, status: err.status });
        } else {
          throw err;
        }
      }
    }
    const sweepDue = Date.now() - st.lastSweepAt >= (this.opts.sweepEveryMs ?? 3600_000);
    if (st.idsOnly || sweepDue) {
      await this.idsCycle(dest, stats);
      st.lastSweepAt = Date.now();
    }
    if (stats.changes > 0) logger.info('poll cycle', { ...stats });
    return stats;
  }

  private async deltaCycle(dest: Destination, stats: CycleStats): Promise<void> {
    let watermark = await getWatermark(this.db, dest.id);
    if (!watermark) {
      const open = await openAtDestination(this.db, dest.id);
      if (open.length === 0) return;
      watermark = open.map((r) => r.createdAt).sort()[0];
    }
    const since = new Date(new Date(watermark).getTime() - this.opts.overlapMs).toISOString();
    const tasks = await this.delta<Task>(dest, 'Task', since);
    const srs = await this.delta<ServiceRequest>(dest, 'ServiceRequest', since);
    stats.searches += tasks.requests + srs.requests;
    stats.tasksSeen += tasks.resources.length;
    let newest = watermark;
    for (const r of [...tasks.resources, ...srs.resources]) {
      const lu = r.meta?.lastUpdated;
      if (lu && lu > newest) newest = lu;
    }
    for (const task of tasks.resources) {
      if (await this.safely(dest, task.id, () => this.applyTask(dest, task))) stats.changes++;
    }
    for (const sr of srs.resources) {
      if (await this.safely(dest, sr.id, () => this.applyServiceRequest(dest, sr))) stats.changes++;
    }
    await setWatermark(this.db, dest.id, newest);
  }

  /**
   * The gateway's resources of one type changed since `since`, oldest first, following `next` links.
   * When the client's page cap stops a long walk, it resumes from the last time seen instead of
   * starting over next cycle (repeats at that instant are skipped by their version).
   */
  private async delta<T extends Task | ServiceRequest>(
    dest: Destination,
    type: T['resourceType'],
    since: string
  ): Promise<{ resources: T[]; requests: number }> {
    const client = this.clients.get(dest);
    let bound = `gt${since}`;
    const resources: T[] = [];
    let requests = 0;
    for (;;) {
      const r = await client.searchAll<T>(type, { _tag: GATEWAY_TAG_SEARCH, _lastUpdated: bound, _sort: '_lastUpdated', _count: String(this.opts.pageSize) });
      requests += r.requests;
      resources.push(...r.resources);
      const last = r.resources.at(-1)?.meta?.lastUpdated;
      if (!r.truncated || !last || bound === `ge${last}`) break;
      bound = `ge${last}`;
    }
    return { resources, requests };
  }

  /** Reads the open referrals' Tasks in batches of ids (as many as fit in one URL); a missing Task is gone. */
  private async idsCycle(dest: Destination, stats: CycleStats): Promise<void> {
    const open = (await openAtDestination(this.db, dest.id)).filter((r) => r.fhir?.task);
    const client = this.clients.get(dest);
    const maxLen = this.opts.maxUrlLength ?? 4000;
    const batches: StoredReferral[][] = [];
    let cur: StoredReferral[] = [];
    let len = client.baseUrl.length + 40;
    for (const r of open) {
      const id = (r.fhir?.task as string).split('/')[1];
      if (cur.length > 0 && (len + id.length + 1 > maxLen || cur.length >= 100)) {
        batches.push(cur);
        cur = [];
        len = client.baseUrl.length + 40;
      }
      cur.push(r);
      len += id.length + 1;
    }
    if (cur.length > 0) batches.push(cur);
    for (const batch of batches) {
      const ids = batch.map((r) => (r.fhir?.task as string).split('/')[1]);
      const found = await client.searchAll<Task>('Task', { _id: ids.join(','), _count: String(Math.max(ids.length, 1)) });
      stats.searches += found.requests;
      stats.tasksSeen += found.resources.length;
      const byId = new Map(found.resources.map((t) => [t.id, t]));
      for (const r of batch) {
        const task = byId.get((r.fhir?.task as string).split('/')[1]);
        if (task) {
          if (await this.safely(dest, task.id, () => this.applyTask(dest, task))) stats.changes++;
        } else if (await this.safely(dest, r.fhir?.task, () => this.confirmGone(dest, r))) {
          stats.changes++;
        }
      }
    }
  }

  private async safely(dest: Destination, id: string | undefined, fn: () => Promise<boolean>): Promise<boolean> {
    try {
      return await fn();
    } catch (err) {
      logger.warn('could not apply a change from the centre', { destination: dest.id, resource: id, error: (err as Error).message });
      return false;
    }
  }

  /** A Task missing from an id search is read once more; 404 or 410 closes the referral with a clear reason. */
  private async confirmGone(dest: Destination, referral: StoredReferral): Promise<boolean> {
    const [type, id] = (referral.fhir?.task as string).split('/');
    try {
      await this.clients.get(dest).read<Task>(type as 'Task', id);
      return false;
    } catch (err) {
      if (!(err instanceof FhirRequestError) || (err.status !== 404 && err.status !== 410)) throw err;
      const reason = `the centre's Task ${referral.fhir?.task} no longer exists (HTTP ${err.status}: ${err.status === 410 ? 'deleted' : 'not found'})`;
      return this.move(referral, 'cancelled', reason, { taskGone: err.status });
    }
  }

  private async findReferral(dest: Destination, identifiers: Array<{ system?: string; value?: string }> | undefined): Promise<StoredReferral | null> {
    const ident = identifiers?.find((i) => i.system === REFERRAL_IDENTIFIER_SYSTEM)?.value;
    if (!ident) return null;
    const referral = await getReferral(this.db, ident, { payload: false });
    return referral && referral.destination === dest.id ? referral : null;
  }

  private async move(
    referral: StoredReferral,
    to: ReferralStatus,
    reason: string | null,
    detail: Record<string, unknown>,
    extra: { taskVersion?: string | null; report?: ReportInfo | null } = {}
  ): Promise<boolean> {
    const changed = await changeStatus(this.db, referral.id, { status: to, reason, detail, ...extra }, (cur) => cur.status === referral.status);
    if (!changed) return false;
    logger.info('referral status changed', { referralId: referral.id, from: changed.previous, to, ...detail });
    this.onStatusChange({ referralId: referral.id, status: to, previous: changed.previous, reason: reason ?? undefined });
    return true;
  }

  /** Applies one Task version to its referral. Returns whether the referral's status changed. */
  private async applyTask(dest: Destination, task: Task): Promise<boolean> {
    const referral = await this.findReferral(dest, task.identifier);
    if (!referral) return false;
    const version = task.meta?.versionId ?? null;
    if (version && version === referral.taskVersion) return false; // seen already (overlap window)
    if (referral.status === 'queued' || referral.status === 'delivery-failed') return false; // ids not recorded yet
    const decision = decideTransition(referral.status, String(task.status));
    const reason = statusReasonOf(task);
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
        await changeStatus(this.db, referral.id, { status: referral.status, taskVersion: version, reason: reason ?? null });
        return false;
      case 'move': {
        let report: ReportInfo | null | undefined;
        if (decision.to === 'completed') {
          report = await this.readReport(dest, task, referral).catch((err: Error) => {
            logger.warn('could not read the report', { referralId: referral.id, error: err.message });
            return null;
          });
        }
        const detail: Record<string, unknown> = { taskStatus: task.status, taskVersion: version };
        if (task.businessStatus) detail.businessStatus = task.businessStatus.text ?? task.businessStatus.coding?.[0]?.code;
        const voided = task.status === 'entered-in-error' ? 'voided at the centre (entered-in-error)' : null;
        return this.move(referral, decision.to, voided ?? reason ?? null, detail, { taskVersion: version, ...(report !== undefined ? { report } : {}) });
      }
    }
  }

  /** A ServiceRequest revoked (or entered in error) at the centre cancels the referral; completion is noted. */
  private async applyServiceRequest(dest: Destination, sr: ServiceRequest): Promise<boolean> {
    const referral = await this.findReferral(dest, sr.identifier);
    if (!referral || referral.status === 'queued' || terminalStatuses.has(referral.status)) return false;
    if (sr.status === 'revoked' || sr.status === 'entered-in-error') {
      return this.move(referral, 'cancelled', `the centre ${sr.status === 'revoked' ? 'revoked' : 'voided'} the ServiceRequest`, {
        serviceRequestStatus: sr.status,
      });
    }
    return false;
  }

  /**
   * The opinion report: the first Task.output that references a DocumentReference or DiagnosticReport,
   * or an inline attachment; without outputs, a DocumentReference related to the ServiceRequest.
   */
  private async readReport(dest: Destination, task: Task, referral: StoredReferral): Promise<ReportInfo | null> {
    const report = await this.findReport(dest, task, referral);
    return report && { ...report, title: centreText(report.title, MAX_REPORT_TITLE_CHARS), contentType: centreContentType(report.contentType) };
  }

  private async findReport(dest: Destination, task: Task, referral: StoredReferral): Promise<ReportInfo | null> {
    const client = this.clients.get(dest);
    const outputs = task.output ?? [];
    const ref = outputs
      .map((o) => o.valueReference)
      .find((r): r is Reference => typeof r?.reference === 'string' && /^(DocumentReference|DiagnosticReport)\/[^/]+$/.test(r.reference));
    if (ref) {
      const [type, id] = (ref.reference as string).split('/');
      const res = await client.read<DocumentReference | DiagnosticReport>(type as 'DocumentReference', id);
      return describe(`${type}/${id}`, res);
    }
    const inline = outputs.findIndex((o) => o.valueAttachment);
    if (inline >= 0) {
      const att = outputs[inline].valueAttachment as Attachment;
      return { reference: `Task/${task.id}/output/${inline}`, title: att.title, contentType: att.contentType, url: '' };
    }
    if (referral.fhir?.serviceRequest) {
      const found = await client.search<DocumentReference>('DocumentReference', { related: referral.fhir.serviceRequest, _sort: '-_lastUpdated', _count: '1' });
      const doc = found.entry?.[0]?.resource;
      if (doc?.id) return describe(`DocumentReference/${doc.id}`, doc);
    }
    return null;
  }
}

function describe(reference: string, res: DocumentReference | DiagnosticReport): ReportInfo {
  if (res.resourceType === 'DocumentReference') {
    const att = res.content?.[0]?.attachment;
    return { reference, title: att?.title ?? res.description, contentType: att?.contentType, url: '' };
  }
  const att = res.presentedForm?.[0];
  return { reference, title: att?.title ?? res.code?.text, contentType: att?.contentType, url: '' };
}

function statusReasonOf(task: Task): string | undefined {
  const parts = [
    task.businessStatus?.text ?? task.businessStatus?.coding?.[0]?.display,
    task.statusReason?.text ?? task.statusReason?.coding?.[0]?.display,
  ].filter((s): s is string => typeof s === 'string' && s.length > 0);
  return parts.length > 0 ? centreText(parts.join(' — '), MAX_STATUS_REASON_CHARS) : undefined;
}
