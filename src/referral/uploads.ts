import { mediaType } from '../intake';
import type { Readable } from 'node:stream';
import { BlobRefused, type BlobStore, putDocument } from '../blobs';
import type { BlobRef, ReferralDocument } from '../model';
import { logger } from '../observability';
import { Failure, insufficientStorage, invalidInput, notFound, referralNotFound, tooLarge, unsupported, businessRule } from '../outcomes';
import { blobsOf, type Db, expireOverdueUploads, getReferral, storeUpload, unreferencedBlobs } from '../store';

// Documents whose bytes stream in (issue 13): multipart file parts and `upload: true` documents sent by PUT. The bytes
// go to the blob store (src/blobs) as they arrive, hashed on the way; the referral names them once they are durable.

export interface DocumentLimits {
  /** MAX_DOCUMENT_BYTES: one streamed document. */
  maxDocumentBytes: number;
  /** MAX_REFERRAL_DOCUMENT_BYTES: a referral's streamed documents together. */
  maxReferralBytes: number;
  /** UPLOAD_DEADLINE_HOURS, in ms: how long a referral waits for its uploads. */
  uploadDeadlineMs: number;
}

export interface Upload {
  /** The Content-Type the bytes came with. */
  contentType: string | undefined;
  body: Readable;
  /** The SHA-256 (hex) the sender declared in a header (Repr-Digest, Digest), if any. */
  sha256?: string;
  /** Content-Length, when given. */
  length?: number;
  signal?: AbortSignal;
}

/** Errors of a store that has no room: a full or over-quota file system, a database out of disk. */
function outOfSpace(err: unknown): boolean {
  const code = (err as { code?: string } | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' || code === '53100';
}

export class DocumentIntake {
  /** Blobs this process is receiving or linking (by SHA-256, a count): never removed as unreferenced meanwhile. */
  private readonly pins = new Map<string, number>();

  constructor(
    private readonly db: Db,
    readonly blobs: BlobStore,
    readonly limits: DocumentLimits
  ) {}

  /**
   * Streams one document's bytes into the blob store, durably; the blob stays pinned until `release`. Refusals are
   * Failures in the API's terms, naming `expression`: over `maxBytes` 413, a digest mismatch 422, an interrupted
   * upload 400, a full store 507. Nothing of a refused document is kept.
   */
  async receive(
    source: Readable,
    opts: { maxBytes: number; expectedSha256?: string; signal?: AbortSignal; expression: string; limitName: string }
  ): Promise<BlobRef> {
    let ref: BlobRef;
    try {
      ref = await putDocument(this.blobs, source, { maxBytes: opts.maxBytes, expectedSha256: opts.expectedSha256, signal: opts.signal });
    } catch (err) {
      throw this.refusal(err, opts);
    }
    this.pins.set(ref.sha256, (this.pins.get(ref.sha256) ?? 0) + 1);
    return ref;
  }

  private refusal(err: unknown, opts: { maxBytes: number; expression: string; limitName: string }): unknown {
    if (err instanceof BlobRefused) {
      switch (err.reason) {
        case 'too-large':
          return tooLarge(`${opts.expression}: the document is larger than ${opts.maxBytes} bytes (${opts.limitName}); nothing was kept`, opts.expression);
        case 'digest-mismatch':
          return invalidInput({
            code: 'invalid',
            expression: opts.expression,
            message: `${opts.expression}: the bytes received do not match the declared SHA-256; nothing was kept`,
          });
        case 'aborted':
          return new Failure('malformed', {
            code: 'incomplete',
            expression: opts.expression,
            message: `${opts.expression}: the upload was interrupted; nothing was kept`,
          });
      }
    }
    if (outOfSpace(err)) return insufficientStorage(`${opts.expression}: the document store is full; nothing was kept, try again later`, err);
    return err;
  }

  /**
   * How many bytes one more streamed document may hold when the referral's other streamed documents hold `otherBytes`
   * (MAX_DOCUMENT_BYTES, or what MAX_REFERRAL_DOCUMENT_BYTES leaves), and the limit's name for a refusal.
   */
  allowance(otherBytes: number): { maxBytes: number; limitName: string } {
    const room = this.limits.maxReferralBytes - otherBytes;
    return room < this.limits.maxDocumentBytes
      ? { maxBytes: room, limitName: 'MAX_REFERRAL_DOCUMENT_BYTES, with the referral’s other documents' }
      : { maxBytes: this.limits.maxDocumentBytes, limitName: 'MAX_DOCUMENT_BYTES' };
  }

  /**
   * Unpins blobs received by a request; with `discard` (the request was refused), those no referral names and no
   * other request holds are removed at once.
   */
  async release(refs: Iterable<BlobRef>, opts: { discard: boolean }): Promise<void> {
    const shas = [...new Set([...refs].map((r) => r.sha256))];
    for (const sha of shas) {
      const n = (this.pins.get(sha) ?? 1) - 1;
      if (n > 0) this.pins.set(sha, n);
      else this.pins.delete(sha);
    }
    if (!opts.discard) return;
    for (const sha of await unreferencedBlobs(
      this.db,
      shas.filter((s) => !this.pins.has(s))
    )) {
      if (!this.pins.has(sha)) await this.blobs.delete(sha);
    }
  }

  /** Whether this process is receiving or linking the blob now. */
  pinned(sha256: string): boolean {
    return this.pins.has(sha256);
  }

  /**
   * The bytes of document `n` (1-based) of a client's referral awaiting documents (PUT .../documents/{n}/content).
   * The document must be declared `upload: true`; the Content-Type must be its declared type; the bytes are checked
   * against the declared SHA-256 (the document's `sha256`, or a digest header) as they arrive. Sending the same bytes
   * again is answered as the first time (`replay`); other bytes for a document that has its bytes are refused 409.
   * When it was the last upload due, the referral is queued for delivery.
   */
  async upload(clientId: string, referralId: string, n: number, upload: Upload): Promise<{ replay: boolean; referralId: string }> {
    const referral = await getReferral(this.db, referralId, { clientId });
    if (!referral) throw referralNotFound(referralId);
    const expression = `documents[${n - 1}]`;
    const doc: ReferralDocument | undefined = Number.isSafeInteger(n) && n >= 1 ? referral.payload.documents[n - 1] : undefined;
    if (!doc) throw notFound(`Referral ${referralId} has no document ${n} (documents are numbered from 1)`, 'n');
    if (!doc.upload) throw businessRule(`${expression} is not declared "upload": true: its bytes came with the referral`, expression);
    if (!doc.blob && referral.status !== 'awaiting-documents') {
      throw businessRule(`referral ${referralId} is ${referral.status}: it no longer takes uploads`, 'status');
    }
    if (mediaType(upload.contentType) !== mediaType(doc.contentType)) {
      throw unsupported(
        `Content-Type ${mediaType(upload.contentType) || '(none)'} is not the declared ${expression}.contentType ${mediaType(doc.contentType)}`,
        'Content-Type'
      );
    }
    if (upload.sha256 && doc.sha256 && upload.sha256 !== doc.sha256) {
      throw invalidInput({ code: 'invalid', expression: 'Repr-Digest', message: `Repr-Digest: the digest header differs from ${expression}.sha256` });
    }
    const others = (await blobsOf(this.db, referralId)).filter((b) => b.n !== n).reduce((sum, b) => sum + b.bytes, 0);
    const { maxBytes, limitName } = this.allowance(others);
    if (upload.length !== undefined && upload.length > maxBytes) {
      throw tooLarge(`Content-Length ${upload.length} is more than the ${maxBytes} bytes allowed (${limitName}); nothing was read`, 'Content-Length');
    }
    const ref = await this.receive(upload.body, { maxBytes, expectedSha256: upload.sha256 ?? doc.sha256, signal: upload.signal, expression, limitName });
    let keep = false;
    try {
      const stored = await storeUpload(this.db, referralId, n, ref);
      switch (stored.kind) {
        case 'not-found':
          throw referralNotFound(referralId);
        case 'same':
          keep = true;
          return { replay: true, referralId };
        case 'refused':
          throw stored.why === 'other-bytes'
            ? businessRule(
                `${expression} already holds other bytes (sha256 ${doc.blob?.sha256 ?? 'recorded'}); a document's bytes are not replaced`,
                expression
              )
            : businessRule(`referral ${referralId} is ${stored.status}: it no longer takes uploads`, 'status');
        case 'stored':
          keep = true;
          logger.info(stored.waiting === 0 ? 'last document upload stored; referral queued' : 'document upload stored', {
            referralId,
            document: n,
            bytes: ref.bytes,
            waiting: stored.waiting,
          });
          return { replay: false, referralId };
      }
    } finally {
      await this.release([ref], { discard: !keep });
    }
  }

  /**
   * Removes the blobs no referral names (retention stripped or deleted their referrals; a refused request's blob that
   * could not be removed at once; a crash between storing the bytes and the referral) once older than `graceMs`, which
   * covers a multipart request still sending its other parts, and what crashed uploads left half-written.
   */
  async collectUnreferenced(now = new Date(), graceMs = 3_600_000): Promise<number> {
    const before = new Date(now.getTime() - graceMs);
    await this.blobs.sweepUnfinished(before);
    let deleted = 0;
    let batch: string[] = [];
    const flush = async (): Promise<void> => {
      for (const sha of await unreferencedBlobs(this.db, batch)) {
        if (!this.pins.has(sha) && (await this.blobs.delete(sha))) deleted++;
      }
      batch = [];
    };
    for await (const b of this.blobs.list()) {
      if (b.storedAt >= before || this.pins.has(b.sha256)) continue;
      batch.push(b.sha256);
      if (batch.length >= 500) await flush();
    }
    await flush();
    if (deleted > 0) logger.info('unreferenced blobs removed', { deleted });
    return deleted;
  }

  /** Ends the referrals whose uploads did not all arrive within the deadline (status `expired`). */
  async expireOverdue(now = new Date()): Promise<string[]> {
    const hours = this.limits.uploadDeadlineMs / 3_600_000;
    const reason = `not every document declared "upload": true arrived within ${Number(hours.toFixed(3))} h (UPLOAD_DEADLINE_HOURS); the referral was not sent`;
    const expired = await expireOverdueUploads(this.db, new Date(now.getTime() - this.limits.uploadDeadlineMs).toISOString(), reason);
    for (const id of expired) logger.warn('referral expired waiting for its uploads', { referralId: id });
    return expired;
  }
}
