import type { DocumentReference, DiagnosticReport, Reference, Task } from '@medplum/fhirtypes';
import { schedule, type ScheduledTask } from 'node-cron';
import type { Destination } from '../config/destinations';
import type { FhirClients } from '../delivery/clients';
import { GATEWAY_TAG, REFERRAL_IDENTIFIER_SYSTEM } from '../mapping/constants';
import { logger } from '../observability/logger';
import type { DestinationDirectory } from '../referral/service';
import type { ReferralStatus, ReportInfo, StoredReferral } from '../referral/types';
import type { ReferralStore } from '../store/referral-store';
import { decideTransition } from './state';

export interface PollerOptions {
  /** Default schedule (cron, 5 or 6 fields); a destination's own `pollCron` wins. */
  cron: string;
  /** Look back this far before the watermark, against clock skew and late commits. */
  overlapMs: number;
  pageSize: number;
}

export type StatusEvent = { referralId: string; status: ReferralStatus; previous: ReferralStatus; reason?: string };

export interface CycleStats {
  destination: string;
  searches: number;
  tasksSeen: number;
  changes: number;
  error?: string;
}

/**
 * Tracks the centre's Tasks. Per destination and cycle it makes one delta search for the gateway's
 * Tasks changed since the watermark (server time, minus an overlap), following `next` links; it never
 * asks once per referral.
 */
export class Poller {
  private tasks: ScheduledTask[] = [];
  private running = new Map<string, Promise<CycleStats>>();

  constructor(
    private readonly store: ReferralStore,
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
  async pollOnce(): Promise<CycleStats[]> {
    return Promise.all(this.destinations.ids().map((id) => this.pollDestination(this.destinations.get(id) as Destination)));
  }

  /** One cycle for one destination; a second call while one runs joins it instead of overlapping. */
  pollDestination(dest: Destination): Promise<CycleStats> {
    const existing = this.running.get(dest.id);
    if (existing) return existing;
    const p = this.cycle(dest)
      .catch((err: Error): CycleStats => {
        logger.warn('poll cycle failed', { destination: dest.id, error: err.message });
        return { destination: dest.id, searches: 0, tasksSeen: 0, changes: 0, error: err.message };
      })
      .finally(() => this.running.delete(dest.id));
    this.running.set(dest.id, p);
    return p;
  }

  private async cycle(dest: Destination): Promise<CycleStats> {
    const stats: CycleStats = { destination: dest.id, searches: 0, tasksSeen: 0, changes: 0 };
    let watermark = await this.store.getWatermark(dest.id);
    if (!watermark) {
      const open = await this.store.openAtDestination(dest.id);
      if (open.length === 0) return stats;
      watermark = open.map((r) => r.createdAt).sort()[0];
    }
    const since = new Date(new Date(watermark).getTime() - this.opts.overlapMs).toISOString();
    const client = this.clients.get(dest);
    const { resources, requests } = await client.searchAll<Task>('Task', {
      _tag: `${GATEWAY_TAG.system}|${GATEWAY_TAG.code}`,
      _lastUpdated: `gt${since}`,
      _sort: '_lastUpdated',
      _count: String(this.opts.pageSize),
    });
    stats.searches = requests;
    stats.tasksSeen = resources.length;
    let newest = watermark;
    for (const task of resources) {
      const lu = task.meta?.lastUpdated;
      if (lu && lu > newest) newest = lu;
      try {
        if (await this.apply(dest, task)) stats.changes++;
      } catch (err) {
        logger.warn('could not apply a Task update', { destination: dest.id, task: task.id, error: (err as Error).message });
      }
    }
    await this.store.setWatermark(dest.id, newest);
    if (stats.changes > 0) logger.info('poll cycle', { ...stats });
    return stats;
  }

  private async findReferral(dest: Destination, task: Task): Promise<StoredReferral | null> {
    const ident = task.identifier?.find((i) => i.system === REFERRAL_IDENTIFIER_SYSTEM)?.value;
    if (!ident) return null;
    const referral = await this.store.getById(ident);
    return referral && referral.destination === dest.id ? referral : null;
  }

  /** Applies one Task version to its referral. Returns whether the referral's status changed. */
  private async apply(dest: Destination, task: Task): Promise<boolean> {
    const referral = await this.findReferral(dest, task);
    if (!referral) return false;
    const version = task.meta?.versionId ?? null;
    if (version && version === referral.taskVersion) return false; // seen already (overlap window)
    if (referral.status === 'queued') return false; // delivery has not recorded the ids yet
    const decision = decideTransition(referral.status, String(task.status));
    const reason = statusReasonOf(task);
    switch (decision.kind) {
      case 'unknown':
      case 'impossible':
        await this.store.note(referral.id, referral.status, `warning: ${decision.why} (Task version ${version ?? '?'}); not applied`, { taskVersion: version });
        await this.store.changeStatus(referral.id, { status: referral.status, taskVersion: version });
        logger.warn('Task change not applied', { referralId: referral.id, destination: dest.id, why: decision.why, taskVersion: version });
        return false;
      case 'same':
        await this.store.changeStatus(referral.id, { status: referral.status, taskVersion: version, reason: reason ?? referral.statusReason });
        return false;
      case 'move': {
        let report: ReportInfo | null | undefined;
        if (decision.to === 'completed') {
          report = await this.readReport(dest, task).catch((err: Error) => {
            logger.warn('could not read the report', { referralId: referral.id, error: err.message });
            return null;
          });
        }
        const changed = await this.store.changeStatus(referral.id, {
          status: decision.to,
          reason: reason ?? null,
          taskVersion: version,
          ...(report !== undefined ? { report } : {}),
          detail: { taskStatus: task.status, taskVersion: version, ...(task.businessStatus ? { businessStatus: task.businessStatus.text ?? task.businessStatus.coding?.[0]?.code } : {}) },
        });
        if (changed) {
          logger.info('referral status changed', { referralId: referral.id, from: changed.previous, to: decision.to, taskVersion: version });
          this.onStatusChange({ referralId: referral.id, status: decision.to, previous: changed.previous, reason: reason ?? undefined });
        }
        return true;
      }
    }
  }

  /** The opinion report: the first Task.output that references a DocumentReference or DiagnosticReport. */
  private async readReport(dest: Destination, task: Task): Promise<ReportInfo | null> {
    const refs: Reference[] = (task.output ?? []).map((o) => o.valueReference).filter((r): r is Reference => !!r?.reference);
    const ref = refs.find((r) => /^(DocumentReference|DiagnosticReport)\//.test(r.reference as string));
    if (!ref) return null;
    const [type, id] = (ref.reference as string).split('/');
    const client = this.clients.get(dest);
    const res = await client.read<DocumentReference | DiagnosticReport>(type as 'DocumentReference', id);
    if (res.resourceType === 'DocumentReference') {
      const att = res.content?.[0]?.attachment;
      return { reference: `${type}/${id}`, title: att?.title ?? res.description, contentType: att?.contentType, url: '' };
    }
    const att = (res as DiagnosticReport).presentedForm?.[0];
    return { reference: `${type}/${id}`, title: att?.title ?? (res as DiagnosticReport).code?.text, contentType: att?.contentType, url: '' };
  }
}

function statusReasonOf(task: Task): string | undefined {
  const parts = [task.businessStatus?.text ?? task.businessStatus?.coding?.[0]?.display, task.statusReason?.text ?? task.statusReason?.coding?.[0]?.display].filter(
    (s): s is string => typeof s === 'string' && s.length > 0
  );
  return parts.length > 0 ? parts.join(' — ') : undefined;
}
