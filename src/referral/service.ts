import { z } from 'zod';
import type { Submission } from '../intake';
import { businessRule, capIssues, type DetailedIssue, Failure, idempotencyConflict, invalidInput, notCancellable, referralNotFound } from '../outcomes';
import type { Destination, DestinationDirectory } from '../config';
import { mapAddedDocumentsToBundle, validateBundle } from '../mapping';
import { logger } from '../observability';
import {
  cancelBeforeDelivery,
  changeStatus,
  type Db,
  deliveryQueue,
  findForIdempotency,
  getReferral,
  insertReferral,
  leasedQueue,
  listReferrals,
  type ListFilter,
  newReferralId,
  nowIso,
  queueCancel,
  queueDocuments,
  referralHistory,
} from '../store';
import { checkReferralContent } from './check';
import { identifierPolicyIssues } from './identifier-policy';
import { documentSchema } from '../model';
import { cancellable, terminalStatuses } from '../tracking';
import type { BlobRef, StoredReferral, Referral, ReferralDocument } from '../model';
import { type ReferralView, toView, type UploadDue } from './view';
import { literalCallbackProblem } from '../webhooks';
import { IntakeLane } from './intake-lane';

/** The body of POST /referrals/{id}/cancel. */
export const cancelSchema = z.strictObject({ reason: z.string().trim().min(1, 'a reason is required').max(1000) });
/** The documents of POST /referrals/{id}/documents (bare, or as `{ documents }`). */
export const addDocumentsSchema = z
  .array(documentSchema)
  .min(1, 'at least one document is required')
  .max(100)
  .superRefine((docs, ctx) => {
    docs.forEach((d, i) => {
      const streamed = (['file', 'upload'] as const).find((k) => d[k] !== undefined);
      if (streamed) {
        ctx.addIssue({
          code: 'custom',
          path: [i, streamed],
          message: 'documents added to a sent referral carry data, url or a study; stream large ones by declaring them in the referral (file or upload)',
        });
      }
    });
  });

/** An error answer lists at most this many issues, then one that counts the rest. */
const MAX_ISSUES = 100;

export interface SubmitResult {
  created: boolean;
  view: ReferralView;
}

/** A new submission read and checked, not yet stored (ReferralService.prepare). */
export interface NewSubmission {
  kind: 'new';
  referral: Referral;
  destination: Destination;
  requestHash: string;
  idempotencyKey: string | null;
  origin: Submission['origin'];
  /** The document index each file part fills, by part name. */
  files: ReadonlyMap<string, number>;
  /** Where a location of the referral model is in the submission (for issues about its documents). */
  locate: (modelPath: string) => string;
}

export type Prepared = { kind: 'replay'; result: SubmitResult } | NewSubmission;

export class ReferralService {
  constructor(
    private readonly db: Db,
    private readonly destinations: DestinationDirectory,
    private readonly options: {
      allowPrivateCallbacks?: boolean;
      clientIdentifierSystems?: ReadonlyMap<string, ReadonlyArray<string>>;
      /** The lane submissions and added documents are hashed, checked and stored in (default: width 2). */
      lane?: IntakeLane;
      /** HL7_RETURN_CHANNELS: where each client's HL7 v2 referrals send their status changes back (MLLP host and port). */
      hl7ReturnChannels?: ReadonlyMap<string, { host: string; port: number }>;
    } = {}
  ) {
    this.lane = options.lane ?? new IntakeLane(2);
  }

  /** Keeps the event loop free for probes and other requests while many submissions arrive at once. */
  private readonly lane: IntakeLane;

  /**
   * Checks a referral completely: codes, routing and the FHIR content it maps to, the client's identifier
   * systems, and, unless private networks are allowed, that its callbackUrl does not name a loopback/private
   * address or local host. Issue locations are given in the submission's format (`locate`).
   */
  private check(clientId: string, referral: Referral, locate: (modelPath: string) => string): { referral: Referral; destination: Destination } {
    const refuse = (issues: DetailedIssue[]): Failure => invalidInput(issues.map((i) => located(i, locate)));
    const r = checkReferralContent(referral, this.destinations, { withDocumentData: false });
    if (!r.ok) throw refuse(r.issues);
    const foreign = identifierPolicyIssues(clientId, r.referral.patient.identifiers, this.options.clientIdentifierSystems ?? new Map());
    if (foreign.length > 0) throw refuse(foreign);
    const callback = r.referral.callbackUrl;
    const problem = callback && !this.options.allowPrivateCallbacks ? literalCallbackProblem(callback) : undefined;
    if (problem) throw refuse([{ code: 'invalid', expression: 'callbackUrl', message: `callbackUrl: ${problem}`, detail: problem }]);
    return { referral: r.referral, destination: r.destination };
  }

  /**
   * Takes a submission, in any intake format: a replay (same idempotency key or externalId, same content) is
   * answered as the original, without checking it again; a new one is read, checked, stored and queued for
   * delivery. The steps run in the intake lane, letting the event loop turn between them.
   */
  submit(clientId: string, submission: Submission): Promise<SubmitResult> {
    return this.lane.run(async (pause) => {
      const prepared = await this.prepareIn(clientId, submission, { files: false }, pause);
      return prepared.kind === 'replay' ? prepared.result : this.storeIn(clientId, prepared, new Map());
    });
  }

  /**
   * The first half of a submission whose documents' bytes follow it (multipart/form-data): a replay is answered as
   * the original; a new referral is read and checked completely, and `files` says which documents (indexes) each file
   * part fills. Nothing is stored: `complete` does that once the parts have been received.
   */
  prepare(clientId: string, submission: Submission): Promise<Prepared> {
    return this.lane.run((pause) => this.prepareIn(clientId, submission, { files: true }, pause));
  }

  /** Stores a prepared referral with its documents' bytes (`blobs`, by document index), durably, and queues it. */
  complete(clientId: string, prepared: NewSubmission, blobs: ReadonlyMap<number, BlobRef>): Promise<SubmitResult> {
    return this.lane.run(() => this.storeIn(clientId, prepared, blobs));
  }

  private async prepareIn(clientId: string, submission: Submission, opts: { files: boolean }, pause: () => Promise<void>): Promise<Prepared> {
    const requestHash = await submission.requestHash(pause);
    const { externalId, idempotencyKey } = submission;

    // A replay is answered before validation work, so it is cheap and stable.
    if (externalId || idempotencyKey) {
      const replay = await this.replay(clientId, externalId ?? '', idempotencyKey, requestHash);
      if (replay) return { kind: 'replay', result: replay };
    }
    await pause();
    const read = submission.read();
    if (!read.ok) throw invalidInput(read.issues);
    const { referral, destination } = this.check(clientId, read.referral, (p) => submission.locate(p));
    const files = new Map<string, number>();
    const issues: DetailedIssue[] = [];
    referral.documents.forEach((d, i) => {
      if (d.file === undefined) return;
      const expression = `documents[${i}].file`;
      const issue = (detail: string): DetailedIssue => ({ code: 'invalid', expression, message: `${expression}: ${detail}`, detail });
      if (!opts.files) {
        issues.push(issue('names a file part: send the referral and its files as multipart/form-data'));
      } else if (files.has(d.file)) {
        issues.push(issue(`part "${d.file}" is named by documents[${files.get(d.file)}] too`));
      } else {
        files.set(d.file, i);
      }
    });
    if (issues.length > 0) throw invalidInput(issues.map((i) => located(i, (p) => submission.locate(p))));
    await pause();
    return { kind: 'new', referral, destination, requestHash, idempotencyKey, origin: submission.origin, files, locate: (p) => submission.locate(p) };
  }

  private async storeIn(clientId: string, p: NewSubmission, blobs: ReadonlyMap<number, BlobRef>): Promise<SubmitResult> {
    const id = newReferralId();
    const referral: Referral =
      blobs.size === 0 ? p.referral : { ...p.referral, documents: p.referral.documents.map((d, i) => (blobs.has(i) ? { ...d, blob: blobs.get(i) } : d)) };
    // A v2 referral from a client with a return channel: its status changes go back to the sender (src/hl7return).
    const channel = p.origin && this.options.hl7ReturnChannels?.get(clientId);
    const created = await insertReferral(this.db, {
      id,
      clientId,
      externalId: referral.externalId,
      idempotencyKey: p.idempotencyKey,
      requestHash: p.requestHash,
      destination: p.destination.id,
      payload: referral,
      at: nowIso(),
      ...(p.origin && channel ? { hl7Origin: { ...p.origin, channel } } : {}),
    });
    if (!created) {
      // Lost a race with an identical submission: answer as a replay.
      const replay = await this.replay(clientId, referral.externalId, p.idempotencyKey, p.requestHash);
      if (replay) return replay;
      throw idempotencyConflict('externalId', 'a concurrent submission with this externalId is in progress');
    }
    logger.info(created.status === 'awaiting-documents' ? 'referral stored; awaiting document uploads' : 'referral queued', {
      referralId: id,
      clientId,
      destination: p.destination.id,
      documents: referral.documents.length,
      streamed: blobs.size,
    });
    return { created: true, view: await this.view(created) };
  }

  private async replay(clientId: string, externalId: string, key: string | null, hash: string): Promise<SubmitResult | null> {
    const existing = await findForIdempotency(this.db, clientId, externalId, key);
    if (!existing) return null;
    if (existing.requestHash !== hash) {
      // Blame the key only when it was used before (a new key with a reused externalId is an externalId conflict).
      const byKey = key !== null && (existing.externalId !== externalId || (await findForIdempotency(this.db, clientId, '', key)) !== undefined);
      throw byKey
        ? idempotencyConflict('Idempotency-Key', `Idempotency-Key was already used for referral ${existing.id} with a different body`)
        : idempotencyConflict('externalId', `externalId ${externalId} was already submitted as referral ${existing.id} with a different body`);
    }
    return { created: false, view: await this.view(existing) };
  }

  /** A client's referrals, newest first, as views; `next` is where the following page starts. */
  async list(clientId: string, filter: ListFilter): Promise<{ items: ReferralView[]; next?: { createdAt: string; id: string } }> {
    const { items, next } = await listReferrals(this.db, clientId, filter);
    return { items: await Promise.all(items.map((i) => this.view(i))), next };
  }

  async view(r: StoredReferral): Promise<ReferralView> {
    const [history, outbox] = await Promise.all([referralHistory(this.db, r.id), leasedQueue.forReferral(this.db, deliveryQueue, r.id)]);
    return toView(r, history, outbox, r.status === 'awaiting-documents' ? await this.uploadsDue(r.id) : undefined);
  }

  /** The documents of a referral declared `upload: true`, and whether their bytes have arrived. */
  private async uploadsDue(id: string): Promise<UploadDue[]> {
    const full = await getReferral(this.db, id);
    return (full?.payload.documents ?? []).flatMap((d, i) =>
      d.upload ? [{ n: i + 1, title: d.title, contentType: d.contentType, received: d.blob !== undefined }] : []
    );
  }

  /**
   * Cancels a referral. Before delivery it is cancelled here; once at the centre a cancel is queued
   * (the centre's Task becomes cancelled and the ServiceRequest revoked). After work started at the
   * centre, or in a final state, it answers 409.
   */
  async cancel(clientId: string, id: string, reason: string): Promise<ReferralView> {
    const referral = await this.get(clientId, id, { payload: false });
    if (referral.status === 'cancelled') return this.view(referral);
    if (!cancellable(referral.status)) {
      throw notCancellable(id, referral.status);
    }
    if (referral.status === 'awaiting-documents') {
      // Never queued: it ends here (an upload that completes it meanwhile makes it queued, cancelled below as such).
      const done = await changeStatus(this.db, id, { status: 'cancelled', reason }, (current) => current.status === 'awaiting-documents');
      if (done) {
        logger.info('referral cancelled while awaiting its uploads', { referralId: id });
        return this.view(done.current);
      }
      return this.cancel(clientId, id, reason);
    }
    const pending = await leasedQueue.forReferral(this.db, deliveryQueue, id);
    if (pending.some((e) => e.kind === 'cancel' && e.state === 'pending')) return this.view(referral);
    if (referral.status === 'queued' && (await cancelBeforeDelivery(this.db, id, reason))) {
      logger.info('referral cancelled before delivery', { referralId: id });
      return this.view((await getReferral(this.db, id, { payload: false })) as StoredReferral);
    }
    await queueCancel(this.db, id, { reason });
    logger.info('cancel queued for the centre', { referralId: id });
    return this.view((await getReferral(this.db, id, { payload: false })) as StoredReferral);
  }

  /** Adds documents to a referral; they reach the centre as new DocumentReferences linked to its ServiceRequest. */
  async addDocuments(clientId: string, id: string, documents: ReferralDocument[]): Promise<ReferralView> {
    const referral = await this.get(clientId, id);
    if (terminalStatuses.has(referral.status)) {
      throw businessRule(`referral ${id} is ${referral.status}: documents can no longer be added`);
    }
    const cancel = (await leasedQueue.forReferral(this.db, deliveryQueue, id)).find((e) => e.kind === 'cancel');
    if (cancel) {
      throw businessRule(`referral ${id} has a cancel accepted: documents can no longer be added`);
    }
    const destination = this.destinations.get(referral.destination);
    if (!destination) throw new Failure('conflict', { code: 'business-rule', message: `destination ${referral.destination} is no longer configured` });
    // As at intake, the FHIR content is validated with the bytes left out: the schema checked them as base64,
    // and @medplum/core's validator refuses any base64Binary over 1 MiB, which real documents exceed (the
    // destination's settings decide how large ones travel).
    const view = await this.lane.run(async (pause) => {
      const bundle = mapAddedDocumentsToBundle({
        referralId: id,
        referral: referral.payload,
        documents: documents.map((d) => (d.data !== undefined ? { ...d, data: 'AAAA' } : d)),
        startIndex: referral.payload.documents.length,
        serviceRequestRef: 'ServiceRequest/validation',
        patientRef: 'Patient/validation',
        destination,
        addedAt: nowIso(),
      });
      const fhirIssues = validateBundle(bundle);
      if (fhirIssues.length > 0) {
        throw invalidInput(
          capIssues(
            fhirIssues.map((i) => ({ code: 'invariant', message: `FHIR content: ${i.path}: ${i.message}`, expression: i.path, detail: i.message })),
            MAX_ISSUES
          ).map(({ detail: _detail, ...i }) => i)
        );
      }
      await pause();
      const { startIndex } = await queueDocuments(this.db, id, documents, referral.payload.documents.length);
      logger.info('documents queued', { referralId: id, count: documents.length, startIndex });
      return this.view((await getReferral(this.db, id, { payload: false })) as StoredReferral);
    });
    return view;
  }

  /** A client's referral or a 404; `{ payload: false }` leaves the submission (possibly megabytes) unread. */
  async get(clientId: string, id: string, opts: { payload?: boolean } = {}): Promise<StoredReferral> {
    const r = await getReferral(this.db, id, { ...opts, clientId });
    if (!r) throw referralNotFound(id);
    return r;
  }
}

/** An issue at `locate(expression)`, its message re-prefixed with that location when it differs. */
function located(issue: DetailedIssue, locate: (modelPath: string) => string): DetailedIssue {
  const where = locate(issue.expression);
  return where === issue.expression ? issue : { ...issue, expression: where, message: `${where}: ${issue.detail}` };
}
