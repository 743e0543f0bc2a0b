// After a delivery: read back what the centre holds and repair what a non-atomic server left broken, so the
// gateway never reports `sent` over a referral the centre cannot open.
import type { Attachment, Bundle, DocumentReference, Resource, Task } from '@medplum/fhirtypes';
import { FhirRequestError } from './client';
import type { FhirClient } from './client';
import { logger } from '../../observability';
import type { Outcome } from '../adapter';
import { fromRequestError, readModifyWrite } from './operations';

export interface DeliveredRefs {
  task?: string;
  serviceRequest?: string;
  /** DocumentReference refs (`DocumentReference/<id>`) with the attachment the gateway meant each to carry. */
  documents: Array<{ ref: string; intended: Attachment }>;
}

export interface VerifyResult {
  outcome: Outcome;
  /** What was repaired (`Task.focus`, `DocumentReference/<id> content`...), for the log and the history. */
  repaired: string[];
  /** Requests made. */
  requests: number;
}

/**
 * Reads the Task, the ServiceRequest and the DocumentReferences back (one batch request; one read each when
 * the server refuses batches) and checks: the ServiceRequest exists; the Task exists and its `focus` and
 * `basedOn` point at that ServiceRequest; every DocumentReference exists and its attachment has data or a URL
 * that is not a bundle placeholder. A Task pointing elsewhere and a DocumentReference without content are
 * repaired (If-Match writes). Something missing is a retry (the resend creates it); a repair the server
 * refuses is a failure with the reason, never `sent`.
 */
export async function verifyDelivered(client: FhirClient, refs: DeliveredRefs, signal: AbortSignal): Promise<VerifyResult> {
  const repaired: string[] = [];
  const wanted = [refs.serviceRequest, refs.task, ...refs.documents.map((d) => d.ref)].filter((r): r is string => !!r);
  let requests = 0;
  let read: Map<string, Resource | 'missing'>;
  try {
    const got = await readAll(client, wanted, signal);
    read = got.resources;
    requests += got.requests;
  } catch (err) {
    return { outcome: fromRequestError(err), repaired, requests: requests + 1 };
  }
  const missing = wanted.filter((r) => read.get(r) === 'missing');
  if (missing.length > 0) {
    const types = [...new Set(missing.map((r) => r.split('/')[0]))].join(', ');
    return {
      outcome: { kind: 'retry', reason: `verification: the centre does not hold the ${types} it answered with (${missing.length} missing); sending again` },
      repaired,
      requests,
    };
  }

  if (refs.task && refs.serviceRequest) {
    const task = read.get(refs.task) as Task;
    const sr = refs.serviceRequest;
    if (!pointsAt(task, sr)) {
      const id = refs.task.split('/')[1];
      const r = await readModifyWrite<Task>(client, 'Task', id, signal, (cur) => (pointsAt(cur, sr) ? undefined : withServiceRequest(cur, sr)));
      requests += 2;
      if (r.kind === 'gone') return { outcome: { kind: 'retry', reason: 'verification: the Task disappeared while it was repaired' }, repaired, requests };
      if (r.kind !== 'done') {
        return { outcome: failLoudly(r, 'the Task points at a ServiceRequest the centre does not hold, and could not be repaired'), repaired, requests };
      }
      repaired.push('Task.focus/basedOn');
    }
  }

  for (const d of refs.documents) {
    const doc = read.get(d.ref) as DocumentReference;
    if (hasContent(doc)) continue;
    const id = d.ref.split('/')[1];
    const r = await readModifyWrite<DocumentReference>(client, 'DocumentReference', id, signal, (cur) =>
      hasContent(cur) ? undefined : { ...cur, content: [{ ...(cur.content?.[0] ?? {}), attachment: d.intended }, ...(cur.content ?? []).slice(1)] }
    );
    requests += 2;
    if (r.kind === 'gone') {
      return { outcome: { kind: 'retry', reason: 'verification: a DocumentReference disappeared while it was repaired' }, repaired, requests };
    }
    if (r.kind !== 'done') return { outcome: failLoudly(r, 'a DocumentReference at the centre has no content and could not be repaired'), repaired, requests };
    repaired.push(`${d.ref} content`);
  }
  if (repaired.length > 0) {
    logger.warn('verification repaired the referral at the centre', { repaired });
  }
  return { outcome: { kind: 'done' }, repaired, requests };
}

function failLoudly(r: Outcome, what: string): Outcome {
  if (r.kind === 'retry') return { ...r, reason: `verification: ${what}: ${r.reason}` };
  if (r.kind === 'fail') return { ...r, reason: `verification: ${what}: ${r.reason}` };
  return { kind: 'fail', reason: `verification: ${what}` };
}

function sameRef(a: string | undefined, b: string): boolean {
  if (!a) return false;
  const tail = (s: string): string => {
    const m = /([A-Z][A-Za-z]+\/[A-Za-z0-9\-.]{1,64})(?:\/_history\/[^/]*)?$/.exec(s);
    return m ? m[1] : s;
  };
  return tail(a) === tail(b);
}

function pointsAt(task: Task, sr: string): boolean {
  const focusOk = sameRef(task.focus?.reference, sr);
  const basedOn = (task.basedOn ?? []).filter((r) => r.reference?.includes('ServiceRequest/'));
  return focusOk && basedOn.length > 0 && basedOn.every((r) => sameRef(r.reference, sr));
}

function withServiceRequest(task: Task, sr: string): Task {
  const others = (task.basedOn ?? []).filter((r) => !r.reference?.includes('ServiceRequest/'));
  return { ...task, focus: { ...task.focus, reference: sr }, basedOn: [{ reference: sr }, ...others] };
}

/** Data, or a URL that names something (a Binary, a presigned or external URL), not a bundle placeholder. */
export function hasContent(doc: DocumentReference | undefined): boolean {
  const a = doc?.content?.[0]?.attachment;
  if (!a) return false;
  if (typeof a.data === 'string' && a.data.length > 0) return true;
  return typeof a.url === 'string' && a.url.length > 0 && !/^urn:(uuid|oid):/i.test(a.url.trim());
}

/** Reads every ref: one batch of GETs; a server that refuses batches (4xx) is read one ref at a time. */
async function readAll(client: FhirClient, refs: string[], signal: AbortSignal): Promise<{ resources: Map<string, Resource | 'missing'>; requests: number }> {
  const out = new Map<string, Resource | 'missing'>();
  if (refs.length === 0) return { resources: out, requests: 0 };
  let answer: Bundle | undefined;
  try {
    answer = await client.batch({ resourceType: 'Bundle', type: 'batch', entry: refs.map((url) => ({ request: { method: 'GET', url } })) }, { signal });
  } catch (err) {
    if (!(err instanceof FhirRequestError) || err.kind !== 'http' || (err.status ?? 500) >= 500 || err.status === 429) throw err;
  }
  const entries = answer?.entry ?? [];
  if (answer && entries.length === refs.length) {
    let complete = true;
    refs.forEach((ref, i) => {
      const e = entries[i];
      const status = Number(/^\s*(\d{3})/.exec(e.response?.status ?? '')?.[1] ?? NaN);
      if (e.resource && e.resource.resourceType === ref.split('/')[0] && (Number.isNaN(status) || (status >= 200 && status < 300))) out.set(ref, e.resource);
      else if (status === 404 || status === 410) out.set(ref, 'missing');
      else complete = false;
    });
    if (complete) return { resources: out, requests: 1 };
  }
  let requests = 1;
  for (const ref of refs) {
    if (out.has(ref)) continue;
    const [type, id] = ref.split('/');
    requests++;
    try {
      out.set(ref, await client.read(type as Resource['resourceType'], id, { signal }));
    } catch (err) {
      if (err instanceof FhirRequestError && err.kind === 'http' && (err.status === 404 || err.status === 410)) out.set(ref, 'missing');
      else throw err;
    }
  }
  return { resources: out, requests };
}
