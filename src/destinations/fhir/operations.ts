import type { Bundle, BundleEntry, Resource, ServiceRequest, Task } from '@medplum/fhirtypes';
import { destinationSettings } from '../../config';
import type { Destination } from '../../config';
import {
  FhirRequestError,
  conditionalIndexes,
  KeyedMutex,
  locationOf,
  searchCriteria,
  withoutConditionalEntries,
  classifyError,
  parseLocation,
  sendTransaction,
} from './client';
import type { FhirClient, Matches, TransactionLocation } from './client';
import {
  mapAddedDocumentsToBundle,
  mapReferralToBundle,
  serviceRequestWithDocuments,
  taskWithDocuments,
  DOCUMENT_IDENTIFIER_SYSTEM,
  documentIdentifierValue,
  REFERRAL_IDENTIFIER_SYSTEM,
} from '../../mapping';
import { logger, deliveryLatency } from '../../observability';
import type { StreamedString } from '../../json';
import type { BlobRef, CancelTask, DocumentsTask, FhirRefs, ReferralDocument } from '../../model';
import { changeStatus, type Db, getReferral, noteStatus, nowIso } from '../../store';
import { documentsToMoveOut, estimateJsonBytes, planBinaries } from './attachments';
import { BlobReads, resolveBlobDocuments } from './blob-documents';
import type { DeliveryContext, Outcome } from '../adapter';
import { checkPatient, patientEntryIndex } from './patient-match';
import type { PatientCheck } from './patient-match';
import { uploadRawDocuments } from './raw-binaries';
import { verifyDelivered } from './verify';
import type { DeliveredRefs } from './verify';

/** A delivery attempt at a FHIR destination: the generic context and this destination's client. */
export interface OperationContext extends DeliveryContext {
  client: FhirClient;
}

/** Task states in which the referrer may still withdraw the request (FHIR Task state machine: not yet started). */
export const CANCELLABLE_TASK_STATES: ReadonlySet<string> = new Set(['draft', 'requested', 'received', 'accepted', 'ready']);
/** ServiceRequest states that need no revoking. */
const CLOSED_REQUEST_STATES: ReadonlySet<string> = new Set(['revoked', 'completed', 'entered-in-error']);
/** Read-modify-write attempts on a 412 (someone else updated the resource in between). */
const IF_MATCH_TRIES = 3;

// ------------------------------------------------------------------------------------------------
// submit

/**
 * The referral's transaction: every entry a conditional create (or, with `transactionMode: resolve-first`,
 * resolved by searching first); large documents uploaded raw before it or carried as Binary entries; then,
 * with `verifyDelivery`, what the centre holds is read back and repaired before the referral is `sent`.
 */
export async function deliverSubmit(ctx: OperationContext): Promise<Outcome> {
  const { referral, destination, db } = ctx;
  if (ctx.entry.attempts > 0) {
    const failed = await readBeforeRetry(ctx, 'Task', REFERRAL_IDENTIFIER_SYSTEM, referral.id);
    if (failed) return failed;
  }
  const payload = ctx.takePayload();
  const written = await writeDocumentsBundle(ctx, payload.documents, 0, (attachmentUrls, documents) =>
    mapReferralToBundle({
      referralId: referral.id,
      clientId: referral.clientId,
      referral: { ...payload, documents },
      destination,
      createdAt: referral.createdAt,
      attachmentUrls,
    })
  );
  if (written.kind !== 'ok') return written.outcome;
  // From here on nothing refers to the payload or the bundle any more (the intended attachments aside).
  const fhir = collectRefs(destination, written.types, written.locations);
  if (mustVerify(ctx, written)) {
    const verified = await verifyDelivered(ctx.client, { task: fhir.task, serviceRequest: fhir.serviceRequest, documents: written.documents }, ctx.signal);
    if (verified.outcome.kind !== 'done') return verified.outcome;
    if (verified.repaired.length > 0) written.repaired.push(...verified.repaired);
  }
  const changed = await changeStatus(
    db,
    referral.id,
    { status: 'sent', fhir, reason: null, detail: { attempts: ctx.attempt, ...(written.repaired.length > 0 ? { repaired: written.repaired } : {}) } },
    (cur) => cur.status === 'queued' || cur.status === 'delivery-failed'
  );
  logger.info('referral delivered', {
    referralId: referral.id,
    destination: destination.id,
    attempts: ctx.attempt,
    task: fhir.task,
    binaries: written.binaries,
    rawUploads: written.rawUploads,
    ...(written.repaired.length > 0 ? { repaired: written.repaired } : {}),
  });
  if (changed && written.repaired.length > 0) {
    // The operator sees in the timeline that the centre held a broken referral and what was mended.
    await noteStatus(db, referral.id, 'sent', `repaired at the centre before it was reported sent: ${written.repaired.join(', ')}`);
  }
  // ...and that the referral was given a Patient of its own (patientMismatch: new-patient).
  if (changed) for (const note of written.notes) await noteStatus(db, referral.id, 'sent', note);
  if (changed) {
    deliveryLatency.observe({ destination: destination.id }, Math.max(0, Date.now() - Date.parse(referral.createdAt)) / 1000);
    ctx.emit({ referralId: referral.id, status: 'sent', previous: changed.previous });
  }
  return { kind: 'done' };
}

/**
 * Whether to read back what the centre holds: with `verifyDelivery: true`, unless this very attempt's one
 * transaction created every one of the referral's own entries new (201 each; the shared Patient,
 * Practitioner and Organizations may match what is there), which leaves nothing half-written or stale to find.
 */
function mustVerify(ctx: OperationContext, written: Extract<Written, { kind: 'ok' }>): boolean {
  const v = destinationSettings(ctx.destination).verifyDelivery;
  if (v === false) return false;
  if (v === 'always') return true;
  return !(written.allCreated && ctx.entry.attempts === 0);
}

function entryTypes(bundle: Bundle): Array<string | undefined> {
  return (bundle.entry ?? []).map((e) => e.resource?.resourceType);
}

type Written =
  | {
      kind: 'ok';
      /** Resource type of each entry of the bundle as mapped, and its server id (same index). */
      types: Array<string | undefined>;
      locations: TransactionLocation[];
      /** The DocumentReferences written, each with the attachment it was meant to carry. */
      documents: DeliveredRefs['documents'];
      binaries: number;
      rawUploads: number;
      repaired: string[];
      /** One transaction created every entry new (201 each) and nothing was resolved or confirmed by search. */
      allCreated: boolean;
      /** For the referral's history once it is sent (the patient check's decision). */
      notes: string[];
    }
  | { kind: 'not-ok'; outcome: Outcome };

/**
 * Plans the documents (raw uploads before the transaction, Binary entries in it, inline data), maps the
 * bundle with `build`, moves more documents out while the bundle is over the server's `maxJsonBytes`, uploads
 * the raw ones, and writes the bundle (writeBundle). A referral's Patient is checked (patient-match.ts) before
 * anything is written: before the raw uploads when there are any, else as part of the write.
 *
 * Documents whose bytes are in the blob store (`blob`): one at or under `maxInlineBytes` is read and sent inline
 * like any other (`build` gets the documents as sent); a larger one is streamed from the store into the request
 * that carries it, a raw Binary upload (binaryMode raw, or moved out for maxJsonBytes) or its base64 inside the
 * transaction (put, conditional-create), and never held whole. Its bytes missing from the store, or not the ones
 * stored, fail the delivery (a resend would not help).
 */
async function writeDocumentsBundle(
  ctx: OperationContext,
  submitted: ReadonlyArray<ReferralDocument>,
  startIndex: number,
  build: (attachmentUrls: Record<number, string>, documents: ReferralDocument[]) => Bundle
): Promise<Written> {
  const { referral, destination, client, signal } = ctx;
  const settings = destinationSettings(destination);
  const resolved = await resolveBlobDocuments(ctx.blobs, submitted, destination.maxInlineBytes, startIndex);
  if ('missing' in resolved) return { kind: 'not-ok', outcome: { kind: 'fail', reason: resolved.missing } };
  const documents = resolved.documents;
  const reads = new BlobReads(ctx.blobs);
  const blobData = (blob: BlobRef): StreamedString => reads.base64(blob);
  let plan = planBinaries({ referralId: referral.id, documents, startIndex, destination, blobData });
  /** The bundle mapped with stand-ins for the raw uploads, while it is the one the plan gives. */
  let draft: Bundle | undefined;
  if (settings.maxJsonBytes !== undefined) {
    // Estimated as the bundle will be sent: raw documents as URLs, Binary entries with their data.
    const estimate = build({ ...plan.attachmentUrls, ...placeholders(plan.raw) }, documents);
    draft = estimate;
    const withEntries = { ...estimate, entry: [...(estimate.entry ?? []), ...plan.entries] };
    const more = documentsToMoveOut(documents, new Set(plan.raw), estimateJsonBytes(withEntries), settings.maxJsonBytes);
    if (more === undefined) {
      return {
        kind: 'not-ok',
        outcome: {
          kind: 'fail',
          reason: `the transaction does not fit the destination's maxJsonBytes (${settings.maxJsonBytes}) even with every document uploaded separately`,
        },
      };
    }
    if (more.length > 0) {
      plan = planBinaries({ referralId: referral.id, documents, startIndex, destination, alsoRaw: [...plan.raw, ...more], blobData });
      draft = undefined;
    }
  }
  const resolveFirst = settings.transactionMode === 'resolve-first';
  const finalPlan = plan;
  /** Uploads the raw documents, builds the bundle and writes it (under the caller's locks). */
  const uploadAndWrite = async (prechecked?: Prechecked): Promise<{ bundle: Bundle; raw: { uploaded: number }; result: WriteResult }> => {
    let raw: Awaited<ReturnType<typeof uploadRawDocuments>>;
    try {
      raw = await uploadRawDocuments({
        db: ctx.db,
        client,
        destinationId: destination.id,
        settings,
        referralId: referral.id,
        documents,
        startIndex,
        indexes: finalPlan.raw,
        blobs: reads,
        signal,
      });
    } catch (err) {
      return { bundle: { resourceType: 'Bundle', type: 'transaction' }, raw: { uploaded: 0 }, result: unreadableOr(reads, fromRequestError(err)) };
    }
    const bundle = build({ ...finalPlan.attachmentUrls, ...raw.urls }, documents);
    bundle.entry = [...(bundle.entry ?? []), ...finalPlan.entries];
    // The patient check's decision, taken before the uploads, applies to the bundle as sent.
    if (prechecked?.entry) bundle.entry[prechecked.index] = prechecked.entry;
    // With a pre-check the caller holds the locks already (KeyedMutex is not reentrant).
    return { bundle, raw, result: prechecked ? await writeResolved(ctx, bundle, resolveFirst, prechecked) : await writeBundle(ctx, bundle, resolveFirst) };
  };
  let written: Awaited<ReturnType<typeof uploadAndWrite>>;
  if (finalPlan.raw.length > 0) draft ??= build({ ...finalPlan.attachmentUrls, ...placeholders(finalPlan.raw) }, documents);
  else draft = undefined;
  const patientIndex = draft ? patientEntryIndex(draft.entry ?? []) : undefined;
  if (draft && patientIndex !== undefined) {
    // Raw uploads are writes at the centre: the Patient is checked before them, so that a held referral
    // leaves nothing there. The lock covers the check, the uploads and the transaction.
    written = await sharedEntries.run(lockKeys(ctx, draft, resolveFirst), async () => {
      const checked = await guardPatient(ctx, draft, patientIndex);
      if (checked.kind !== 'ok') return { bundle: draft, raw: { uploaded: 0 }, result: checked };
      return uploadAndWrite({
        index: patientIndex,
        entry: checked.newPatient ? checked.bundle.entry?.[patientIndex] : undefined,
        notes: checked.newPatient ? [checked.newPatient.note] : [],
      });
    });
  } else {
    written = await uploadAndWrite();
  }
  const { bundle, raw, result } = written;
  if (result.kind !== 'ok') return { kind: 'not-ok', outcome: unreadableOr(reads, result) };
  const types = entryTypes(bundle);
  return {
    kind: 'ok',
    types,
    locations: result.locations,
    documents: intendedAttachments(bundle, result.locations),
    binaries: plan.entries.length,
    rawUploads: raw.uploaded,
    repaired: [],
    allCreated: result.allCreated,
    notes: result.notes,
  };
}

/** A request that failed because a document's bytes in the blob store were not the ones stored fails the delivery. */
function unreadableOr(reads: BlobReads, outcome: Exclude<Outcome, { kind: 'done' }>): Exclude<Outcome, { kind: 'done' }> {
  return reads.failure ? { kind: 'fail', reason: `a document's bytes could not be sent: ${reads.failure.message}` } : outcome;
}

/** Stand-in URLs while estimating the size of a bundle whose raw uploads have not happened yet. */
function placeholders(indexes: ReadonlyArray<number>): Record<number, string> {
  return Object.fromEntries(indexes.map((i) => [i, 'Binary/00000000-0000-0000-0000-000000000000']));
}

/** For each DocumentReference entry: its server ref and the attachment it was sent with (placeholders resolved). */
function intendedAttachments(bundle: Bundle, locations: TransactionLocation[]): DeliveredRefs['documents'] {
  const entries = bundle.entry ?? [];
  const byFullUrl = new Map<string, string>();
  entries.forEach((e, i) => {
    const loc = locations[i];
    if (e.fullUrl && loc) byFullUrl.set(e.fullUrl, `${loc.resourceType}/${loc.id}`);
  });
  return entries.flatMap((e, i) => {
    const loc = locations[i];
    if (e.resource?.resourceType !== 'DocumentReference' || !loc) return [];
    const attachment = e.resource.content?.[0]?.attachment ?? {};
    const url = attachment.url && byFullUrl.get(attachment.url);
    return [{ ref: `DocumentReference/${loc.id}`, intended: url ? { ...attachment, url } : attachment }];
  });
}

type WriteResult = { kind: 'ok'; locations: TransactionLocation[]; allCreated: boolean; notes: string[] } | Exclude<Outcome, { kind: 'done' }>;

/**
 * Writes a bundle of conditional creates as the destination wants it, and returns the server id of every
 * entry (same indexes as `bundle.entry`):
 * - `conditional`: sent as it is;
 * - `resolve-first`: the conditional criteria are searched first (one batch request), what exists is left
 *   out and referenced by id, the rest is sent as plain creates (no conditional entries, so no
 *   strict-isolation entry limit; a resend after a partial write creates only what is missing).
 * An empty 2xx answer (Prefer: return=minimal on Medplum) is confirmed by searching every entry's criteria.
 */
async function writeBundle(ctx: OperationContext, bundle: Bundle, resolveFirst: boolean, prechecked?: Prechecked): Promise<WriteResult> {
  const keys = lockKeys(ctx, bundle, resolveFirst);
  if (keys.length === 0) return writeResolved(ctx, bundle, resolveFirst, prechecked);
  return sharedEntries.run(keys, () => writeResolved(ctx, bundle, resolveFirst, prechecked));
}

/**
 * The locks a write takes: one per shared identifier in resolve-first mode, so two referrals from one hospital
 * do not both find "no such Practitioner" and both create one (within this process; across replicas a
 * duplicate is tolerated: the oldest is used). In conditional mode only the Patient's: its check (a search)
 * and the transaction that links to what the search saw are not to be overtaken by another referral's.
 */
function lockKeys(ctx: OperationContext, bundle: Bundle, resolveFirst: boolean): string[] {
  const locked = (type: string): boolean => (resolveFirst ? SHARED_TYPES.has(type) : type === 'Patient');
  return (bundle.entry ?? []).flatMap((e) =>
    e.resource && locked(e.resource.resourceType) && e.request?.ifNoneExist ? [`${ctx.destination.id} ${e.resource.resourceType}?${e.request.ifNoneExist}`] : []
  );
}

/** The patient check done before raw uploads: its decision, already applied to the bundle (`entry` at `index`). */
interface Prechecked {
  index: number;
  /** The Patient entry made a new Patient (patientMismatch: new-patient), or undefined when it stays as mapped. */
  entry?: BundleEntry;
  notes: string[];
}

/** Resources other referrals share (not ours alone): a racing writer may have created a duplicate. */
// An Endpoint (one per PACS) and an ImagingStudy (one per Study Instance UID) may come with more than one referral.
const SHARED_TYPES: ReadonlySet<string> = new Set(['Patient', 'Practitioner', 'PractitionerRole', 'Organization', 'Endpoint', 'ImagingStudy']);
const sharedEntries = new KeyedMutex();

async function writeResolved(ctx: OperationContext, mapped: Bundle, resolveFirst: boolean, prechecked?: Prechecked): Promise<WriteResult> {
  const { client, signal, destination } = ctx;
  const settings = destinationSettings(destination);
  let bundle = mapped;
  let entries = bundle.entry ?? [];
  const notes: string[] = [...(prechecked?.notes ?? [])];
  const patientIndex = patientEntryIndex(entries);
  let matches: Matches = new Map();
  if (resolveFirst) {
    const found = await searchOrOutcome(ctx, entries, conditionalIndexes(entries));
    if (found.kind !== 'ok') return found;
    matches = found.matches;
    if (patientIndex !== undefined) {
      // What the batch search found for the Patient is checked as it is: no extra request.
      const checked = await guardPatient(ctx, bundle, patientIndex, found.found.get(patientIndex) ?? []);
      if (checked.kind !== 'ok') return checked;
      if (checked.newPatient) {
        bundle = checked.bundle;
        entries = bundle.entry ?? [];
        matches.delete(patientIndex);
        if (checked.found[0]) matches.set(patientIndex, locationOf(checked.found[0]));
        notes.push(checked.newPatient.note);
      }
    }
  } else if (patientIndex !== undefined && !prechecked) {
    // The conditional create would link to whatever Patient holds the identifier: look at it first.
    const checked = await guardPatient(ctx, bundle, patientIndex);
    if (checked.kind !== 'ok') return checked;
    if (checked.newPatient) {
      bundle = checked.bundle;
      entries = bundle.entry ?? [];
      notes.push(checked.newPatient.note);
    }
  }
  let toSend = bundle;
  let sentIndexes = entries.map((_, i) => i);
  if (resolveFirst) {
    const resolved = withoutConditionalEntries(bundle, matches);
    toSend = resolved.bundle;
    sentIndexes = resolved.sent;
  }
  const locations: TransactionLocation[] = new Array(entries.length);
  for (const [i, loc] of matches) locations[i] = loc;
  // A shared resource (the Patient, the referring Practitioner...) found or matched is the normal case; one of
  // the referral's own resources found or matched means an earlier attempt got part-way.
  const own = (i: number): boolean => !SHARED_TYPES.has(entries[i]?.resource?.resourceType ?? '');
  let allCreated = ![...matches.keys()].some(own);
  if (sentIndexes.length > 0) {
    let created = false;
    const result = await sendTransaction(client, toSend, {
      signal,
      preferMinimal: settings.preferMinimal,
      onEntryStatuses: (statuses) => {
        created = statuses.length === sentIndexes.length && statuses.every((st, k) => st === 201 || (st === 200 && !own(sentIndexes[k])));
      },
    });
    if (result.kind === 'unconfirmed') {
      const confirmed = await confirmBySearch(ctx, bundle, result.reason);
      return confirmed.kind === 'ok' ? { ...confirmed, notes } : confirmed;
    }
    if (result.kind !== 'ok') return result;
    sentIndexes.forEach((orig, k) => {
      locations[orig] = result.locations[k];
    });
    allCreated = allCreated && created;
  }
  return { kind: 'ok', locations, allCreated, notes };
}

/**
 * The patient check (patient-match.ts) as a delivery outcome: a contradicting Patient at the centre is a
 * permanent failure (`hold`: nothing written, not retried; an operator re-queues it once the identifier or
 * the centre's Patient is put right), a failed search is retried or failed like any request.
 */
async function guardPatient(
  ctx: OperationContext,
  bundle: Bundle,
  index: number,
  found?: Resource[]
): Promise<Extract<PatientCheck, { kind: 'ok' }> | Exclude<Outcome, { kind: 'done' }>> {
  let checked: PatientCheck;
  try {
    checked = await checkPatient({
      client: ctx.client,
      destination: ctx.destination,
      referralId: ctx.referral.id,
      clientId: ctx.referral.clientId,
      bundle,
      index,
      found,
      signal: ctx.signal,
    });
  } catch (err) {
    return fromRequestError(err);
  }
  return checked.kind === 'hold' ? { kind: 'fail', reason: checked.reason } : checked;
}

async function searchOrOutcome(
  ctx: OperationContext,
  entries: ReadonlyArray<BundleEntry>,
  indexes: number[]
): Promise<{ kind: 'ok'; matches: Matches; found: Map<number, Resource[]> } | Exclude<Outcome, { kind: 'done' }>> {
  let found: Awaited<ReturnType<typeof searchCriteria>>;
  try {
    found = await searchCriteria(ctx.client, entries, indexes, ctx.signal, SHARED_TYPES);
  } catch (err) {
    return fromRequestError(err);
  }
  if (found.kind === 'multiple') {
    return {
      kind: 'fail',
      reason: `the centre holds ${found.count} ${found.type} resources with the identifier of bundle entry ${found.index}; resolve the duplicates at the centre`,
    };
  }
  for (const d of found.duplicates) {
    logger.warn('the centre holds duplicates of a shared resource; the oldest is referenced', {
      referralId: ctx.referral.id,
      destination: ctx.destination.id,
      type: d.type,
      count: d.count,
    });
  }
  return found;
}

/**
 * The server accepted the transaction without saying what it wrote: find every entry by its criteria (PUT
 * entries by their URL). All found is a success; anything missing is a retry (the resend creates it).
 */
async function confirmBySearch(ctx: OperationContext, bundle: Bundle, why: string): Promise<WriteResult> {
  const entries = bundle.entry ?? [];
  const found = await searchOrOutcome(ctx, entries, conditionalIndexes(entries));
  if (found.kind !== 'ok') return found;
  const locations: TransactionLocation[] = new Array(entries.length);
  let missing = 0;
  entries.forEach((e, i) => {
    const m = found.matches.get(i);
    const put = e.request?.method === 'PUT' && e.request.url ? parseLocation(e.request.url) : undefined;
    if (m) locations[i] = m;
    else if (put) locations[i] = put;
    else missing++;
  });
  if (missing > 0) {
    return { kind: 'retry', reason: `${why}, and ${missing} of ${entries.length} entries are not at the centre; sending again` };
  }
  logger.info('transaction confirmed by reading back (the server answered with an empty body)', {
    referralId: ctx.referral.id,
    destination: ctx.destination.id,
    entries: entries.length,
  });
  return { kind: 'ok', locations, allCreated: false, notes: [] };
}

// ------------------------------------------------------------------------------------------------
// documents

/**
 * Documents added after submission: one transaction of conditional-create DocumentReferences (large ones
 * uploaded raw first, or as Binary entries) linked to the centre's ServiceRequest, checked at the centre; their
 * refs are appended to the referral, and the ServiceRequest's supportingInfo and the Task's input get them too
 * (read-modify-write with If-Match; a server that refuses the update leaves a warning, the documents stay
 * delivered).
 */
export async function deliverDocuments(ctx: OperationContext, take: () => DocumentsTask): Promise<Outcome> {
  const { referral, destination, client, signal, entry } = ctx;
  const payload = take();
  const refs = referral.fhir;
  if (!refs?.serviceRequest || !refs.patient) {
    return { kind: 'retry', reason: 'the referral has not reached the centre yet', neutral: true };
  }
  if (payload.documents.length === 0) return { kind: 'done' };
  if (entry.attempts > 0) {
    const failed = await readBeforeRetry(ctx, 'DocumentReference', DOCUMENT_IDENTIFIER_SYSTEM, documentIdentifierValue(referral.id, payload.startIndex + 1));
    if (failed) return failed;
  }
  const referralPayload = ctx.takePayload();
  const serviceRequestRef = refs.serviceRequest;
  const patientRef = refs.patient;
  const written = await writeDocumentsBundle(ctx, payload.documents, payload.startIndex, (attachmentUrls, documents) =>
    mapAddedDocumentsToBundle({
      referralId: referral.id,
      referral: referralPayload,
      documents,
      startIndex: payload.startIndex,
      serviceRequestRef,
      patientRef,
      destination,
      attachmentUrls,
      // The entry's own time, so a resend is the same bundle.
      addedAt: entry.createdAt,
    })
  );
  if (written.kind !== 'ok') return written.outcome;
  if (mustVerify(ctx, written)) {
    const verified = await verifyDelivered(client, { documents: written.documents }, signal);
    if (verified.outcome.kind !== 'done') return verified.outcome;
  }

  const added = written.types.flatMap((type, i) => {
    const loc = written.locations[i];
    return type === 'DocumentReference' && loc ? [`DocumentReference/${loc.id}`] : [];
  });
  // ImagingStudies (documents with a `study`) are listed with the documents, as in the submission's bundle.
  const listed = written.types.flatMap((type, i) => {
    const loc = written.locations[i];
    return (type === 'DocumentReference' || type === 'ImagingStudy') && loc ? [`${type}/${loc.id}`] : [];
  });
  // Link first, record after: the referral lists the documents once the centre's ServiceRequest does too. A
  // retryable failure here retries the whole entry (the transaction resend matches what is there).
  const linked = await linkDocuments(client, refs, listed, signal);
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
  const stored = await appendDocumentRefs(ctx.db, referral.id, added);
  if (!stored) return { kind: 'retry', reason: 'the referral changed too often while its document refs were saved', neutral: true };
  logger.info('documents delivered', {
    referralId: referral.id,
    destination: destination.id,
    attempts: ctx.attempt,
    documents: added.length,
    rawUploads: written.rawUploads,
  });
  return { kind: 'done' };
}

/** Appends refs to referral.fhir.documents without changing the status (compare-and-set on updatedAt). */
async function appendDocumentRefs(db: Db, referralId: string, added: string[]): Promise<boolean> {
  for (let i = 0; i < 5; i++) {
    const cur = await getReferral(db, referralId, { payload: false });
    if (!cur?.fhir) return false;
    const documents = [...cur.fhir.documents];
    for (const ref of added) {
      if (!documents.includes(ref)) documents.push(ref);
    }
    if (documents.length === cur.fhir.documents.length) return true;
    const changed = await changeStatus(
      db,
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
export async function deliverCancel(ctx: OperationContext, { reason }: CancelTask): Promise<Outcome> {
  const { referral, client, signal, db, destination } = ctx;

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
    const cur = await getReferral(db, referral.id, { payload: false });
    await noteStatus(db, referral.id, (cur ?? referral).status, `cancel refused by state: Task is ${refusedBy}`);
    logger.info('cancel refused by the Task state', { referralId: referral.id, destination: destination.id, taskStatus: refusedBy });
    return { kind: 'done' };
  }

  const srId =
    refId(referral.fhir?.serviceRequest, 'ServiceRequest') ??
    refId(task?.focus?.reference, 'ServiceRequest') ??
    refId(task?.basedOn?.[0]?.reference, 'ServiceRequest');
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
  const changed = await changeStatus(
    ctx.db,
    ctx.referral.id,
    { status: 'cancelled', reason, detail: why ? { note: why } : undefined },
    (cur) => cur.status !== 'cancelled'
  );
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
      // 412 Precondition Failed, or 409 Conflict as HAPI answers a stale If-Match (ResourceVersionConflictException).
      if (err instanceof FhirRequestError && err.kind === 'http' && (err.status === 412 || err.status === 409) && i < IF_MATCH_TRIES) {
        logger.info('If-Match conflict; reading again', { type, try: i });
        continue;
      }
      return fromRequestError(err);
    }
  }
}

/** Maps a request failure to an Outcome; anything that is not a FhirRequestError is rethrown. */
export function fromRequestError(err: unknown): Exclude<Outcome, { kind: 'done' }> {
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
  const meta = {
    referralId: ctx.referral.id,
    outboxId: ctx.entry.id,
    kind: ctx.entry.kind,
    destination: ctx.destination.id,
    earlierAttempts: ctx.entry.attempts,
  };
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
    logger.info('read-before-retry: the centre already holds it from an earlier attempt; resending (conditional creates match it)', {
      ...meta,
      found: ids,
      status,
    });
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
      default:
        // Patient-side and shared entries (Practitioner, Organization, Condition, Binary...) are not recorded.
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
