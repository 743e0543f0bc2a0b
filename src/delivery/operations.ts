import type { Bundle, OperationOutcome, Resource, ServiceRequest, Task } from '@medplum/fhirtypes';
import type { Destination } from '../config/destinations';
import { FhirRequestError } from '../fhir/client';
import type { FhirClient } from '../fhir/client';
import { classifyError, sendTransaction } from '../fhir/transaction';
import type { TransactionLocation, TransactionResult } from '../fhir/transaction';
import { mapAddedDocumentsToBundle, mapReferralToBundle, serviceRequestWithDocuments, taskWithDocuments } from '../mapping/bundle';
import { DOCUMENT_IDENTIFIER_SYSTEM, documentIdentifierValue, REFERRAL_IDENTIFIER_SYSTEM } from '../mapping/constants';
import { logger } from '../observability/logger';
import { deliveryLatency } from '../observability/metrics';
import type { Referral, ReferralDocument } from '../referral/schema';
import type { FhirRefs, StoredReferral } from '../referral/types';
import { nowIso } from '../store/ids';
import type { OutboxEntry, ReferralStore } from '../store/referral-store';
import { planBinaries } from './attachments';

export type DeliveryEvent = { referralId: string; status: string; previous: string; reason?: string };

/** What one attempt at an outbox entry came to. */
export type Outcome =
  /** Finished: the entry is done. */
  | { kind: 'done' }
  /**
   * Try again later. `neutral` says the destination is not to blame (e.g. the referral has not reached the
   * centre yet), so the circuit breaker does not count it.
   */
  | { kind: 'retry'; reason: string; retryAfterMs?: number; status?: number; outcome?: OperationOutcome; neutral?: boolean }
  /** A resend will not help: dead letter. */
  | { kind: 'fail'; reason: string; status?: number; outcome?: OperationOutcome };

/** A stored referral without its payload (which may carry megabytes of document data). */
export type ReferralSummary = Omit<StoredReferral, 'payload'>;

export interface OperationContext {
  store: ReferralStore;
  /** The entry as claimed (its payload moved to takeEntryPayload): `entry.attempts` is the number of earlier attempts. */
  entry: Omit<OutboxEntry, 'payload'>;
  /** This attempt's number (entry.attempts + 1), already recorded. */
  attempt: number;
  referral: ReferralSummary;
  /**
   * The referral's payload, handed over once: after the call the context no longer holds it, so once the
   * operation has sent it, a large document's data can be collected before the store writes that follow.
   */
  takePayload(): Referral;
  /** The outbox entry's payload, handed over once in the same way. */
  takeEntryPayload(): unknown;
  destination: Destination;
  client: FhirClient;
  /** Aborts when the entry's time budget (within its lease) runs out. */
  signal: AbortSignal;
  emit: (e: DeliveryEvent) => void;
}

/** Task states in which the referrer may still withdraw the request (FHIR Task state machine: not yet started). */
export const CANCELLABLE_TASK_STATES: ReadonlySet<string> = new Set(['draft', 'requested', 'received', 'accepted', 'ready']);
/** ServiceRequest states that need no revoking. */
const CLOSED_REQUEST_STATES: ReadonlySet<string> = new Set(['revoked', 'completed', 'entered-in-error']);
/** Read-modify-write attempts on a 412 (someone else updated the resource in between). */
const IF_MATCH_TRIES = 3;

// ------------------------------------------------------------------------------------------------
// submit

/** The referral's transaction: every entry a conditional create; large documents as Binary entries. */
export async function deliverSubmit(ctx: OperationContext): Promise<Outcome> {
  const { referral, destination, store } = ctx;
  if (ctx.entry.attempts > 0) {
    const failed = await readBeforeRetry(ctx, 'Task', REFERRAL_IDENTIFIER_SYSTEM, referral.id);
    if (failed) return failed;
  }
  const sent = await sendReferralBundle(ctx);
  if (sent.result.kind !== 'ok') return sent.result;
  // From here on nothing refers to the payload or the bundle any more.
  const fhir = collectRefs(destination, sent.types, sent.result.locations);
  const changed = await store.changeStatus(
    referral.id,
    { status: 'sent', fhir, reason: null, detail: { attempts: ctx.attempt } },
    (cur) => cur.status === 'queued' || cur.status === 'delivery-failed'
  );
  logger.info('referral delivered', {
    referralId: referral.id,
    destination: destination.id,
    attempts: ctx.attempt,
    task: fhir.task,
    binaries: sent.binaries,
  });
  if (changed) {
    deliveryLatency.observe({ destination: destination.id }, Math.max(0, Date.now() - Date.parse(referral.createdAt)) / 1000);
    ctx.emit({ referralId: referral.id, status: 'sent', previous: changed.previous });
  }
  return { kind: 'done' };
}

/** Maps and sends the referral's transaction; returns only what the caller needs afterwards (not the bundle). */
async function sendReferralBundle(ctx: OperationContext): Promise<{ result: TransactionResult; types: Array<string | undefined>; binaries: number }> {
  const { referral, destination, client, signal } = ctx;
  const payload = ctx.takePayload();
  const binaries = planBinaries({ referralId: referral.id, documents: payload.documents, startIndex: 0, destination });
  const bundle = mapReferralToBundle({
    referralId: referral.id,
    clientId: referral.clientId,
    referral: payload,
    destination,
    createdAt: referral.createdAt,
    attachmentUrls: binaries.attachmentUrls,
  });
  bundle.entry = [...(bundle.entry ?? []), ...binaries.entries];
  const result = await sendTransaction(client, bundle, { signal, preferMinimal: true });
  return { result, types: entryTypes(bundle), binaries: binaries.entries.length };
}

function entryTypes(bundle: Bundle): Array<string | undefined> {
  return (bundle.entry ?? []).map((e) => e.resource?.resourceType);
}

// ------------------------------------------------------------------------------------------------
// documents

export interface DocumentsPayload {
  documents: ReferralDocument[];
  startIndex: number;
}

function isDocumentsPayload(p: unknown): p is DocumentsPayload {
  const v = p as DocumentsPayload;
  return !!v && Array.isArray(v.documents) && Number.isInteger(v.startIndex) && v.startIndex >= 0;
}

/**
 * Documents added after submission: one transaction of conditional-create DocumentReferences (plus Binary
 * entries for large ones) linked to the centre's ServiceRequest; their refs are appended to the referral, and
 * the ServiceRequest's supportingInfo and the Task's input get them too (read-modify-write with If-Match; a
 * server that refuses the update leaves a warning, the documents stay delivered).
 */
export async function deliverDocuments(ctx: OperationContext): Promise<Outcome> {
  const { referral, destination, client, signal, entry } = ctx;
  const payload = ctx.takeEntryPayload();
  if (!isDocumentsPayload(payload)) {
    return { kind: 'fail', reason: 'malformed documents entry (expected { documents, startIndex })' };
  }
  const refs = referral.fhir;
  if (!refs?.serviceRequest || !refs.patient) {
    return { kind: 'retry', reason: 'the referral has not reached the centre yet', neutral: true };
  }
  if (payload.documents.length === 0) return { kind: 'done' };
  if (entry.attempts > 0) {
    const failed = await readBeforeRetry(ctx, 'DocumentReference', DOCUMENT_IDENTIFIER_SYSTEM, documentIdentifierValue(referral.id, payload.startIndex + 1));
    if (failed) return failed;
  }
  const sent = await sendDocumentsBundle(ctx, payload, refs.serviceRequest, refs.patient);
  const result = sent.result;
  if (result.kind !== 'ok') return result;

  const added = sent.types.flatMap((type, i) => {
    const loc = result.locations[i];
    return type === 'DocumentReference' && loc ? [`DocumentReference/${loc.id}`] : [];
  });
  // Link first, record after: the referral lists the documents once the centre's ServiceRequest does too. A
  // retryable failure here retries the whole entry (the transaction resend matches what is there).
  const linked = await linkDocuments(client, refs, added, signal);
  if (linked.kind === 'retry') return linked;
  if (linked.kind === 'fail') {
    // The documents are at the centre and linked through DocumentReference.context.related; only the
    // ServiceRequest's or Task's list could not be updated (e.g. the server does not let us update it).
    logger.warn('documents delivered; ServiceRequest.supportingInfo or Task.input not updated', {
      referralId: referral.id,
      destination: destination.id,
      reason: linked.reason,
    });
  }
  const stored = await appendDocumentRefs(ctx.store, referral.id, added);
  if (!stored) return { kind: 'retry', reason: 'the referral changed too often while its document refs were saved', neutral: true };
  logger.info('documents delivered', { referralId: referral.id, destination: destination.id, attempts: ctx.attempt, documents: added.length });
  return { kind: 'done' };
}

async function sendDocumentsBundle(
  ctx: OperationContext,
  payload: DocumentsPayload,
  serviceRequestRef: string,
  patientRef: string
): Promise<{ result: TransactionResult; types: Array<string | undefined> }> {
  const { referral, destination, client, signal, entry } = ctx;
  const { documents, startIndex } = payload;
  const binaries = planBinaries({ referralId: referral.id, documents, startIndex, destination });
  const bundle = mapAddedDocumentsToBundle({
    referralId: referral.id,
    referral: ctx.takePayload(),
    documents,
    startIndex,
    serviceRequestRef,
    patientRef,
    destination,
    attachmentUrls: binaries.attachmentUrls,
    // The entry's own time, so a resend is the same bundle.
    addedAt: entry.createdAt,
  });
  bundle.entry = [...(bundle.entry ?? []), ...binaries.entries];
  const result = await sendTransaction(client, bundle, { signal, preferMinimal: true });
  return { result, types: entryTypes(bundle) };
}

/** Appends refs to referral.fhir.documents without changing the status (compare-and-set on updatedAt). */
async function appendDocumentRefs(store: ReferralStore, referralId: string, added: string[]): Promise<boolean> {
  for (let i = 0; i < 5; i++) {
    const cur = await store.getById(referralId, { payload: false });
    if (!cur?.fhir) return false;
    const documents = [...cur.fhir.documents];
    for (const ref of added) {
      if (!documents.includes(ref)) documents.push(ref);
    }
    if (documents.length === cur.fhir.documents.length) return true;
    const changed = await store.changeStatus(
      referralId,
      { status: cur.status, fhir: { ...cur.fhir, documents } },
      (now) => now.status === cur.status && now.updatedAt === cur.updatedAt
    );
    if (changed) return true;
  }
  return false;
}

/** Lists the added documents in the centre's ServiceRequest.supportingInfo and Task.input (If-Match writes). */
async function linkDocuments(client: FhirClient, refs: FhirRefs, added: string[], signal: AbortSignal): Promise<Outcome> {
  const targets: Array<['ServiceRequest' | 'Task', string | undefined]> = [
    ['ServiceRequest', refs.serviceRequest],
    ['Task', refs.task],
  ];
  const failures: string[] = [];
  for (const [type, ref] of targets) {
    if (!ref) continue;
    const id = ref.split('/')[1];
    const result =
      type === 'ServiceRequest'
        ? await readModifyWrite<ServiceRequest>(client, type, id, signal, (sr) => serviceRequestWithDocuments(sr, added))
        : await readModifyWrite<Task>(client, type, id, signal, (task) => taskWithDocuments(task, added, nowIso()));
    if (result.kind === 'retry') return result;
    if (result.kind === 'gone') failures.push(`the ${type} no longer exists at the centre`);
    if (result.kind === 'fail') failures.push(`${type}: ${result.reason}`);
  }
  return failures.length > 0 ? { kind: 'fail', reason: failures.join('; ') } : { kind: 'done' };
}

// ------------------------------------------------------------------------------------------------
// cancel

/**
 * The referrer withdraws the referral: while the centre's Task has not started (draft, requested, received,
 * accepted, ready) it becomes `cancelled` with the reason and the ServiceRequest `revoked`, each by a
 * read-modify-write with If-Match (a 412 re-reads). A Task already started or finished is left alone and the
 * refusal is noted in the history. Resumable: a Task already cancelled (by an earlier attempt) goes straight to
 * the ServiceRequest.
 */
export async function deliverCancel(ctx: OperationContext): Promise<Outcome> {
  const { referral, client, signal, store, destination } = ctx;
  const payload = ctx.takeEntryPayload() as { reason?: unknown } | null;
  const reason = typeof payload?.reason === 'string' ? payload.reason : 'cancelled by the referrer';

  let taskId = refId(referral.fhir?.task, 'Task');
  if (!taskId) {
    // Never recorded as delivered; a transaction the gateway lost the answer to may still have arrived.
    try {
      const found = await findByIdentifier<Task>(client, 'Task', REFERRAL_IDENTIFIER_SYSTEM, referral.id, signal);
      taskId = found[0]?.id;
    } catch (err) {
      return fromRequestError(err);
    }
  }
  if (!taskId) {
    await cancelLocally(ctx, reason, 'nothing had reached the centre');
    return { kind: 'done' };
  }

  let task: Task | undefined;
  let refusedBy: string | undefined;
  const taskResult = await readModifyWrite<Task>(client, 'Task', taskId, signal, (current) => {
    task = current;
    refusedBy = undefined;
    if (current.status === 'cancelled') return undefined;
    if (!CANCELLABLE_TASK_STATES.has(current.status)) {
      refusedBy = safeToken(current.status);
      return undefined;
    }
    return { ...current, status: 'cancelled', statusReason: { text: reason }, lastModified: nowIso() };
  });
  if (taskResult.kind === 'gone') {
    await cancelLocally(ctx, reason, 'the Task no longer exists at the centre');
    return { kind: 'done' };
  }
  if (taskResult.kind !== 'done') return taskResult;
  if (refusedBy) {
    const cur = await store.getById(referral.id, { payload: false });
    await store.note(referral.id, (cur ?? referral).status, `cancel refused by state: Task is ${refusedBy}`);
    logger.info('cancel refused by the Task state', { referralId: referral.id, destination: destination.id, taskStatus: refusedBy });
    return { kind: 'done' };
  }

  const srId = refId(referral.fhir?.serviceRequest, 'ServiceRequest') ?? refId(task?.focus?.reference, 'ServiceRequest') ?? refId(task?.basedOn?.[0]?.reference, 'ServiceRequest');
  if (srId) {
    const srResult = await readModifyWrite<ServiceRequest>(client, 'ServiceRequest', srId, signal, (sr) =>
      CLOSED_REQUEST_STATES.has(sr.status) ? undefined : { ...sr, status: 'revoked' }
    );
    if (srResult.kind === 'retry' || srResult.kind === 'fail') {
      // The Task is cancelled already (the state the centre works from); the entry is retried as a whole.
      return srResult;
    }
  }
  await cancelLocally(ctx, reason);
  logger.info('referral cancelled at the centre', { referralId: referral.id, destination: destination.id, attempts: ctx.attempt, task: `Task/${taskId}` });
  return { kind: 'done' };
}

async function cancelLocally(ctx: OperationContext, reason: string, why?: string): Promise<void> {
  const changed = await ctx.store.changeStatus(ctx.referral.id, { status: 'cancelled', reason, detail: why ? { note: why } : undefined }, (cur) => cur.status !== 'cancelled');
  if (changed) ctx.emit({ referralId: ctx.referral.id, status: 'cancelled', previous: changed.previous, reason });
}

// ------------------------------------------------------------------------------------------------
// shared helpers

type RmwResult = Outcome | { kind: 'gone' };

/**
 * Reads a resource, lets `change` return the new version (or undefined for "nothing to do"), and writes it with
 * If-Match on the version read. A 412 (someone else wrote in between) reads again, up to IF_MATCH_TRIES times.
 * 404/410 on the read are `gone`; other errors are classified as retry or fail.
 */
export async function readModifyWrite<T extends Resource>(
  client: FhirClient,
  type: T['resourceType'],
  id: string,
  signal: AbortSignal,
  change: (current: T) => T | undefined
): Promise<RmwResult> {
  for (let i = 1; ; i++) {
    let current: T;
    try {
      current = await client.read<T>(type, id, { signal });
    } catch (err) {
      if (err instanceof FhirRequestError && err.kind === 'http' && (err.status === 404 || err.status === 410)) {
        return { kind: 'gone' };
      }
      return fromRequestError(err);
    }
    const next = change(current);
    if (!next) return { kind: 'done' };
    const version = current.meta?.versionId;
    if (version === undefined) {
      logger.warn('resource has no meta.versionId; updating without If-Match', { type });
    }
    try {
      await client.update<T>(next, version, { signal });
      return { kind: 'done' };
    } catch (err) {
      if (err instanceof FhirRequestError && err.kind === 'http' && err.status === 412 && i < IF_MATCH_TRIES) {
        logger.info('If-Match conflict; reading again', { type, try: i });
        continue;
      }
      return fromRequestError(err);
    }
  }
}

/** Maps a request failure to an Outcome; anything that is not a FhirRequestError is rethrown. */
export function fromRequestError(err: unknown): Outcome {
  if (err instanceof FhirRequestError) {
    const r = classifyError(err);
    return r.kind === 'retry' ? r : { kind: 'fail', reason: r.reason, status: r.status, outcome: r.outcome };
  }
  throw err;
}

export async function findByIdentifier<T extends Resource>(
  client: FhirClient,
  type: T['resourceType'],
  system: string,
  value: string,
  signal: AbortSignal
): Promise<T[]> {
  const bundle: Bundle<T> = await client.search<T>(type, { identifier: `${system}|${value}`, _count: '10' }, { signal });
  return (bundle.entry ?? []).flatMap((e) => (e.resource?.resourceType === type ? [e.resource] : []));
}

/**
 * Read-before-retry: an earlier attempt's outcome is unknown (a lost answer, a timeout, a crash), so before
 * sending again look for what it would have created, by our business identifier, and log what is there. The
 * resend is safe either way (conditional creates); this makes the unknown visible, and spots duplicates that a
 * server racing conditional creates may have made. A retryable failure of the search is the attempt's outcome
 * (the transaction would fail the same way); any other failure of it is logged and the send goes ahead.
 */
export async function readBeforeRetry(ctx: OperationContext, type: 'Task' | 'DocumentReference', system: string, value: string): Promise<Outcome | undefined> {
  const meta = { referralId: ctx.referral.id, outboxId: ctx.entry.id, kind: ctx.entry.kind, destination: ctx.destination.id, earlierAttempts: ctx.entry.attempts };
  let found: Resource[];
  try {
    found = await findByIdentifier(ctx.client, type, system, value, ctx.signal);
  } catch (err) {
    const outcome = fromRequestError(err);
    if (outcome.kind === 'retry') return outcome;
    logger.warn('read-before-retry: search failed; sending anyway', { ...meta, type, reason: outcome.kind === 'fail' ? outcome.reason : '' });
    return undefined;
  }
  const ids = found.map((r) => `${r.resourceType}/${r.id}`);
  if (found.length === 0) {
    logger.info('read-before-retry: nothing at the centre from an earlier attempt; sending', { ...meta, type });
  } else if (found.length === 1) {
    const status = safeToken((found[0] as { status?: unknown }).status);
    logger.info('read-before-retry: the centre already holds it from an earlier attempt; resending (conditional creates match it)', { ...meta, found: ids, status });
  } else {
    logger.warn('read-before-retry: the centre holds duplicates from earlier attempts', { ...meta, found: ids });
  }
  return undefined;
}

/** Server-assigned ids, by the role each bundle entry plays (`types[i]`: the resource type of request entry i). */
export function collectRefs(destination: Destination, types: ReadonlyArray<string | undefined>, locations: TransactionLocation[]): FhirRefs {
  const refs: FhirRefs = { baseUrl: destination.baseUrl, documents: [] };
  types.forEach((type, i) => {
    const loc = locations[i];
    if (!loc) return;
    const ref = `${loc.resourceType}/${loc.id}`;
    switch (type) {
      case 'ServiceRequest':
        refs.serviceRequest = ref;
        break;
      case 'Task':
        refs.task = ref;
        break;
      case 'Patient':
        refs.patient = ref;
        break;
      case 'DocumentReference':
        refs.documents.push(ref);
        break;
    }
  });
  return refs;
}

function refId(ref: string | undefined, type: string): string | undefined {
  const m = ref ? new RegExp(`^(?:.*/)?${type}/([A-Za-z0-9\\-.]{1,64})(?:/_history/.*)?$`).exec(ref) : null;
  return m ? m[1] : undefined;
}

function safeToken(v: unknown): string {
  return typeof v === 'string' && /^[a-z][a-z-]{0,39}$/.test(v) ? v : 'unknown';
}

