import type { Attachment, DiagnosticReport, DocumentReference, Reference, ServiceRequest, Task } from '@medplum/fhirtypes';
import { FhirRequestError } from './client';
import type { FhirClient } from './client';
import { GATEWAY_TAG_SEARCH, REFERRAL_IDENTIFIER_SYSTEM } from '../../mapping';
import type { ReportInfo } from '../../model';
import { logger } from '../../observability';
import type { CentreObservation, ReferralSummary, TrackingContext, TrackingMode } from '../adapter';
import type { FhirClients } from './clients';

/**
 * Tracking at a FHIR centre. Per cycle: one delta search for the gateway's Tasks changed since the watermark
 * (server time, minus an overlap), following `next` links, plus one for its ServiceRequests (revoked or completed
 * at the centre). It never asks once per referral: servers that cannot search by `_lastUpdated` get batched
 * `_id=a,b,c` reads of the open Tasks, and every `sweepEveryMs` the open Tasks are read by id anyway, to notice
 * Tasks deleted at the centre.
 */
export function fhirTracker(clients: FhirClients): (ctx: TrackingContext) => Promise<TrackingMode> {
  /** Per destination: the server refused `_lastUpdated` searches; when the open Tasks were last read by id. */
  const state = new Map<string, { idsOnly: boolean; lastSweepAt: number }>();
  return async (ctx) => {
    const dest = ctx.destination;
    let st = state.get(dest.id);
    if (!st) {
      st = { idsOnly: false, lastSweepAt: Date.now() };
      state.set(dest.id, st);
    }
    const client = clients.get(dest);
    if (!st.idsOnly) {
      try {
        await deltaCycle(client, ctx);
      } catch (err) {
        if (err instanceof FhirRequestError && (err.status === 400 || err.status === 501 || err.status === 422)) {
          st.idsOnly = true;
          logger.warn('destination refuses _lastUpdated searches: polling open Tasks by id instead', { destination: dest.id, status: err.status });
        } else {
          throw err;
        }
      }
    }
    if (st.idsOnly || Date.now() - st.lastSweepAt >= ctx.options.sweepEveryMs) {
      await idsCycle(client, ctx);
      st.lastSweepAt = Date.now();
    }
    return st.idsOnly ? 'ids' : 'delta';
  };
}

/** The referral a resource of the gateway's names (by its referral identifier). */
function referralIdOf(identifiers: Array<{ system?: string; value?: string }> | undefined): string | undefined {
  return identifiers?.find((i) => i.system === REFERRAL_IDENTIFIER_SYSTEM)?.value;
}

async function deltaCycle(client: FhirClient, ctx: TrackingContext): Promise<void> {
  let watermark = await ctx.watermark();
  if (!watermark) {
    const open = await ctx.openReferrals();
    if (open.length === 0) return;
    watermark = open.map((r) => r.createdAt).sort()[0];
  }
  const since = new Date(new Date(watermark).getTime() - ctx.options.overlapMs).toISOString();
  const tasks = await delta<Task>(client, ctx, 'Task', since);
  const srs = await delta<ServiceRequest>(client, ctx, 'ServiceRequest', since);
  ctx.counted({ requests: tasks.requests + srs.requests, seen: tasks.resources.length });
  let newest = watermark;
  for (const r of [...tasks.resources, ...srs.resources]) {
    const lu = r.meta?.lastUpdated;
    if (lu && lu > newest) newest = lu;
  }
  for (const task of tasks.resources) await ctx.observe(taskObservation(client, task), task.id);
  for (const sr of srs.resources) {
    const referralId = referralIdOf(sr.identifier);
    if (referralId && (sr.status === 'revoked' || sr.status === 'entered-in-error')) {
      // A ServiceRequest revoked (or entered in error) at the centre cancels the referral.
      await ctx.observe(
        {
          kind: 'withdrawn',
          referralId,
          reason: `the centre ${sr.status === 'revoked' ? 'revoked' : 'voided'} the ServiceRequest`,
          detail: { serviceRequestStatus: sr.status },
        },
        sr.id
      );
    }
  }
  await ctx.advanceWatermark(newest);
}

/**
 * The gateway's resources of one type changed since `since`, oldest first, following `next` links. When the
 * client's page cap stops a long walk, it resumes from the last time seen instead of starting over next cycle
 * (repeats at that instant are skipped by their version).
 */
async function delta<T extends Task | ServiceRequest>(
  client: FhirClient,
  ctx: TrackingContext,
  type: T['resourceType'],
  since: string
): Promise<{ resources: T[]; requests: number }> {
  let bound = `gt${since}`;
  const resources: T[] = [];
  let requests = 0;
  for (;;) {
    const r = await client.searchAll<T>(type, { _tag: GATEWAY_TAG_SEARCH, _lastUpdated: bound, _sort: '_lastUpdated', _count: String(ctx.options.pageSize) });
    requests += r.requests;
    resources.push(...r.resources);
    const last = r.resources.at(-1)?.meta?.lastUpdated;
    if (!r.truncated || !last || bound === `ge${last}`) break;
    bound = `ge${last}`;
  }
  return { resources, requests };
}

/** Reads the open referrals' Tasks in batches of ids (as many as fit in one URL); a missing Task is gone. */
async function idsCycle(client: FhirClient, ctx: TrackingContext): Promise<void> {
  const open = (await ctx.openReferrals()).filter((r) => r.fhir?.task);
  const maxLen = ctx.options.maxUrlLength;
  const batches: ReferralSummary[][] = [];
  let cur: ReferralSummary[] = [];
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
    ctx.counted({ requests: found.requests, seen: found.resources.length });
    const byId = new Map(found.resources.map((t) => [t.id, t]));
    for (const r of batch) {
      const task = byId.get((r.fhir?.task as string).split('/')[1]);
      if (task) {
        await ctx.observe(taskObservation(client, task), task.id);
      } else {
        const gone = await confirmGone(client, r).catch((err: Error) => {
          logger.warn('could not apply a change from the centre', { destination: ctx.destination.id, resource: r.fhir?.task, error: err.message });
          return undefined;
        });
        if (gone) await ctx.observe(gone, r.fhir?.task);
      }
    }
  }
}

/** A Task missing from an id search is read once more; 404 or 410 closes the referral with a clear reason. */
async function confirmGone(client: FhirClient, referral: ReferralSummary): Promise<CentreObservation | undefined> {
  const [type, id] = (referral.fhir?.task as string).split('/');
  try {
    await client.read<Task>(type as 'Task', id);
    return undefined;
  } catch (err) {
    if (!(err instanceof FhirRequestError) || (err.status !== 404 && err.status !== 410)) throw err;
    const reason = `the centre's Task ${referral.fhir?.task} no longer exists (HTTP ${err.status}: ${err.status === 410 ? 'deleted' : 'not found'})`;
    return { kind: 'withdrawn', referralId: referral.id, reason, detail: { taskGone: err.status } };
  }
}

/** What one Task version says of its referral; the report is read only if the referral completes with it. */
function taskObservation(client: FhirClient, task: Task): CentreObservation {
  return {
    kind: 'task',
    referralId: referralIdOf(task.identifier),
    taskStatus: String(task.status),
    version: task.meta?.versionId ?? null,
    reason: statusReasonOf(task),
    businessStatus: task.businessStatus ? (task.businessStatus.text ?? task.businessStatus.coding?.[0]?.code) : undefined,
    businessStatusCodes: task.businessStatus?.coding
      ?.filter((c) => typeof c.code === 'string' && c.code.length > 0)
      .map((c) => ({ code: c.code as string, ...(c.system ? { system: c.system } : {}) })),
    appointmentStart: task.executionPeriod?.start ?? task.restriction?.period?.start,
    report: (referral) => findReport(client, task, referral),
  };
}

/**
 * The opinion report: the first Task.output that references a DocumentReference or DiagnosticReport, or an inline
 * attachment; without outputs, a DocumentReference related to the ServiceRequest.
 */
async function findReport(client: FhirClient, task: Task, referral: ReferralSummary): Promise<ReportInfo | null> {
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

function describe(reference: string, res: DocumentReference | DiagnosticReport): ReportInfo {
  if (res.resourceType === 'DocumentReference') {
    const att = res.content?.[0]?.attachment;
    return { reference, title: att?.title ?? res.description, contentType: att?.contentType, url: '' };
  }
  const att = res.presentedForm?.[0];
  return { reference, title: att?.title ?? res.code?.text, contentType: att?.contentType, url: '' };
}

/** The centre's business status and status reason, as one line (cleaned and capped by the tracker). */
function statusReasonOf(task: Task): string | undefined {
  const parts = [
    task.businessStatus?.text ?? task.businessStatus?.coding?.[0]?.display,
    task.statusReason?.text ?? task.statusReason?.coding?.[0]?.display,
  ].filter((s): s is string => typeof s === 'string' && s.length > 0);
  return parts.length > 0 ? parts.join(' — ') : undefined;
}
