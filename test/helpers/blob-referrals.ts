// Referrals whose documents are in the blob store (streamed documents), for the delivery tests, before the HTTP
// intake of streamed documents exists. createBlobReferral is the one place that makes them: switch it to the HTTP
// path (POST /referrals with a file part, or PUT .../content) when that exists, and every test follows.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import type { BlobStore } from '../../src/blobs';
import { type BlobRef, documentSchema, type Referral, type ReferralDocument, referralSchema } from '../../src/model';
import { type Db, insertReferral, queueDocuments } from '../../src/store';
import { newReferralId, nowIso } from '../../src/store/ids';

const MIB = 1024 * 1024;

/** Generated document bytes: `bytes` long, deterministic for a `seed`, produced 1 MiB at a time (never held whole). */
export interface GeneratedDocument {
  bytes: number;
  seed: number;
  contentType: string;
}

/** The i-th MiB of a generated document (the last one cut to size). */
function piece(doc: Pick<GeneratedDocument, 'bytes' | 'seed'>, i: number): Buffer {
  const b = Buffer.alloc(Math.min(MIB, doc.bytes - i * MIB));
  // Varies within the MiB and from one MiB to the next, so a misplaced or repeated piece changes the digest.
  for (let k = 0; k < b.length; k += 4096) b.fill((i * 131 + k / 4096 + doc.seed * 7) % 251, k, Math.min(k + 4096, b.length));
  if (b.length >= 4) b.writeUInt32BE(i, 0);
  return b;
}

/** A generated document's bytes as a stream; `seen` is shown each piece as it goes. */
export function generatedStream(doc: Pick<GeneratedDocument, 'bytes' | 'seed'>, seen: (piece: Buffer) => void = () => undefined): Readable {
  return Readable.from(
    (function* () {
      for (let i = 0; i * MIB < doc.bytes; i++) {
        const p = piece(doc, i);
        seen(p);
        yield p;
      }
    })()
  );
}

/** A generated document's bytes whole (small ones: to compare what a centre holds with what was sent). */
export function generatedBytes(doc: Pick<GeneratedDocument, 'bytes' | 'seed'>): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i * MIB < doc.bytes; i++) parts.push(piece(doc, i));
  return Buffer.concat(parts);
}

/** What the store recorded for a document: its BlobRef (SHA-256, size, SHA-1 as the intake hashes them). */
export async function storeGenerated(blobs: BlobStore, doc: GeneratedDocument): Promise<BlobRef> {
  const sha1 = createHash('sha1');
  const stored = await blobs.put(
    generatedStream(doc, (p) => sha1.update(p)),
    { maxBytes: doc.bytes }
  );
  return { sha256: stored.sha256, bytes: stored.bytes, sha1: sha1.digest('base64') };
}

/** The sample referral (fixtures/referrals/breast-second-opinion.json) as stored, without its callbackUrl. */
export function sampleReferral(): Referral {
  const { callbackUrl: _none, ...body } = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, unknown>;
  return referralSchema.parse(body) as Referral;
}

export interface BlobReferral {
  id: string;
  /** The blob documents' refs, in order (the referral's own documents come first: these are numbered after them). */
  blobs: BlobRef[];
  /** Index of the first blob document in the referral's documents. */
  firstBlobIndex: number;
}

/**
 * Stores a referral with the sample's documents plus one streamed document per entry of `documents`: the bytes go
 * into the gateway's blob store, the referral (its documents naming their blobs, no `data`) into the store through
 * insertReferral, which queues its delivery. Nothing of it is held whole in memory.
 */
export async function createBlobReferral(
  gateway: { db: Db; blobs: BlobStore },
  opts: {
    /** Generated documents to store; a BlobRef is named as it is, not stored (a test of bytes gone from the store). */
    documents: Array<GeneratedDocument | BlobRef>;
    clientId?: string;
    destination?: string;
    externalId?: string;
    /** Called once the bytes are in the blob store, before the referral is stored and queued. */
    stored?: () => void | Promise<void>;
  }
): Promise<BlobReferral> {
  const refs: BlobRef[] = [];
  for (const doc of opts.documents) refs.push('sha256' in doc ? doc : await storeGenerated(gateway.blobs, doc));
  await opts.stored?.();
  const payload = sampleReferral();
  const firstBlobIndex = payload.documents.length;
  opts.documents.forEach((doc, k) => {
    const stored: ReferralDocument = {
      ...documentSchema.parse({
        kind: 'pathology-report',
        title: `Whole-slide image ${k + 1}`,
        contentType: 'contentType' in doc ? doc.contentType : 'application/octet-stream',
        upload: true,
      }),
      blob: refs[k],
    };
    payload.documents.push(stored);
  });
  const id = newReferralId();
  const created = await insertReferral(gateway.db, {
    id,
    clientId: opts.clientId ?? 'city-hospital',
    externalId: opts.externalId ?? `EHR-BLOB-${id.slice(-10)}`,
    idempotencyKey: null,
    requestHash: `blob-${id}`,
    destination: opts.destination ?? 'centre',
    payload,
    at: nowIso(),
  });
  if (!created) throw new Error('the referral was not stored (duplicate externalId?)');
  return { id, blobs: refs, firstBlobIndex };
}

/**
 * Adds streamed documents to a referral already queued or sent (a `documents` delivery): the bytes into the blob
 * store, the documents through queueDocuments. `baseCount` is how many documents the referral had when submitted.
 * Returns their refs and the number of the first one.
 */
export async function addBlobDocuments(
  gateway: { db: Db; blobs: BlobStore },
  referralId: string,
  documents: GeneratedDocument[],
  baseCount: number
): Promise<{ blobs: BlobRef[]; firstNumber: number }> {
  const refs: BlobRef[] = [];
  for (const doc of documents) refs.push(await storeGenerated(gateway.blobs, doc));
  const stored: ReferralDocument[] = documents.map((doc, k) => ({
    ...documentSchema.parse({ kind: 'pathology-report', title: `Added image ${k + 1}`, contentType: doc.contentType, upload: true }),
    blob: refs[k],
  }));
  const { startIndex } = await queueDocuments(gateway.db, referralId, stored, baseCount);
  return { blobs: refs, firstNumber: startIndex + 1 };
}

/** The SHA-256 (hex) of bytes. */
export function sha256(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}
