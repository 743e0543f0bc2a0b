// binaryMode raw: documents uploaded to the centre as raw Binary resources (their own Content-Type, the bytes
// as the body) before the transaction that references them, idempotently across resends.
import type { DestinationSettings } from '../../config';
import type { FhirClient, StreamedBytes } from './client';
import { logger } from '../../observability';
import type { ReferralDocument } from '../../model';
import { binaryUploadsOf, markUploadDone, markUploadPending } from '../../store';
import type { Db } from '../../store';
import { binaryId } from './attachments';
import type { BlobReads } from './blob-documents';

export interface RawUploadArgs {
  db: Db;
  client: FhirClient;
  destinationId: string;
  settings: Pick<DestinationSettings, 'clientIds'>;
  referralId: string;
  documents: ReadonlyArray<ReferralDocument>;
  /** How many documents came before these (0 for the referral's own). */
  startIndex: number;
  /** Indexes in `documents` to upload. */
  indexes: ReadonlyArray<number>;
  /** Where the bytes of documents with a `blob` (and no `data`) are streamed from. */
  blobs?: BlobReads;
  signal?: AbortSignal;
}

/**
 * Uploads each document once and returns `Binary/<id>` per index. A document already uploaded (recorded by an
 * earlier attempt) is not sent again. With client ids the Binary gets a stable id by `PUT`, which is safe to
 * repeat; otherwise it is a `POST` whose returned id is recorded (durably) before the transaction is sent, so
 * that a resend reuses it. A POST whose answer is lost may leave one unreferenced Binary: the upload is then
 * counted as lost (see possiblyOrphanedUploads), since a server without search on Binary cannot find it.
 * A document in the blob store is streamed from it as the request body (with its Content-Length), never held
 * whole; a resend (a 401's, the next attempt's) opens it again.
 * Request failures are thrown (FhirRequestError) for the caller's retry policy.
 */
export async function uploadRawDocuments(a: RawUploadArgs): Promise<{ urls: Record<number, string>; uploaded: number }> {
  const urls: Record<number, string> = {};
  if (a.indexes.length === 0) return { urls, uploaded: 0 };
  const recorded = await binaryUploadsOf(a.db, a.referralId, a.destinationId);
  let uploaded = 0;
  for (const i of a.indexes) {
    const doc = a.documents[i];
    if (doc === undefined) continue;
    const bytes = bodyOf(doc, a.blobs);
    if (bytes === undefined) continue;
    const n = a.startIndex + i + 1;
    const key = { referralId: a.referralId, destination: a.destinationId, documentN: n };
    const earlier = recorded.get(n);
    if (earlier?.state === 'done' && earlier.binaryId) {
      urls[i] = `Binary/${earlier.binaryId}`;
      continue;
    }
    const started = Date.now();
    let id: string;
    if (a.settings.clientIds) {
      id = (await a.client.uploadBinary(doc.contentType, bytes, { id: binaryId(a.referralId, n), signal: a.signal })).id;
    } else {
      if (earlier?.state === 'pending') {
        logger.warn('raw Binary upload: an earlier upload of this document got no recorded answer; uploading again', {
          referralId: a.referralId,
          destination: a.destinationId,
          document: n,
        });
      }
      await markUploadPending(a.db, key);
      id = (await a.client.uploadBinary(doc.contentType, bytes, { signal: a.signal })).id;
    }
    await markUploadDone(a.db, key, id);
    logger.info('raw Binary uploaded', {
      referralId: a.referralId,
      destination: a.destinationId,
      document: n,
      bytes: bytes.length,
      streamed: !(bytes instanceof Uint8Array),
      durationMs: Date.now() - started,
    });
    urls[i] = `Binary/${id}`;
    uploaded++;
  }
  return { urls, uploaded };
}

/** The request body of a document's upload: its inline bytes decoded, or its blob streamed from the store. */
function bodyOf(doc: ReferralDocument, blobs: BlobReads | undefined): Uint8Array | StreamedBytes | undefined {
  if (doc.data !== undefined) return Buffer.from(doc.data, 'base64');
  if (doc.blob && blobs) return blobs.body(doc.blob);
  if (doc.blob) throw new Error('a document in the blob store was to be uploaded without the blob store');
  return undefined;
}
