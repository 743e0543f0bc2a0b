// Documents whose bytes are in the blob store (`blob`, no `data`: streamed at intake). They are never held whole:
// a large one is streamed from the store into the request that carries it (a raw Binary body, or its base64 inside
// the transaction's JSON); a small one (at or under the destination's maxInlineBytes) is read and sent inline.
import { base64Chunks, base64Length, type BlobAddress, type BlobStore, BlobUnreadable, readBlob, verifiedBlob } from '../../blobs';
import { StreamedString } from '../../json';
import type { ReferralDocument } from '../../model';
import type { StreamedBytes } from './client';

/**
 * The reads of one delivery attempt: a blob whose bytes turned out not to be the ones stored is recorded here, so
 * the request that failed with it (a network error to the transport) is told apart from a network failure.
 */
export class BlobReads {
  failure: BlobUnreadable | undefined;

  constructor(readonly store: Pick<BlobStore, 'open' | 'stat'>) {}

  /** The bytes of a blob, as a raw request body: Content-Length, and a fresh stream from the store for each request. */
  body(blob: BlobAddress): StreamedBytes {
    return { length: blob.bytes, stream: () => ReadableStream.from(this.watched(verifiedBlob(this.store, blob))) };
  }

  /** The base64 of a blob, as a JSON string streamed when the request is sent (3-byte aligned pieces). */
  base64(blob: BlobAddress): StreamedString {
    return new StreamedString(base64Length(blob.bytes), () => this.watched(base64Chunks(verifiedBlob(this.store, blob))));
  }

  private async *watched(source: AsyncIterable<Buffer>): AsyncGenerator<Uint8Array> {
    try {
      for await (const piece of source) yield piece;
    } catch (err) {
      if (err instanceof BlobUnreadable) this.failure ??= err;
      throw err;
    }
  }
}

/**
 * The documents as delivery sends them: a blob document at or under `maxInlineBytes` is read from the store and
 * becomes an inline one (base64 `data`, as today); a larger one stays as it is (streamed when sent). `missing`
 * names the first document whose bytes the store does not hold: nothing can be sent then.
 */
export async function resolveBlobDocuments(
  store: Pick<BlobStore, 'open' | 'stat'>,
  documents: ReadonlyArray<ReferralDocument>,
  maxInlineBytes: number,
  startIndex: number
): Promise<{ documents: ReferralDocument[] } | { missing: string }> {
  const out: ReferralDocument[] = [];
  for (const [i, doc] of documents.entries()) {
    if (doc.data !== undefined || !doc.blob) {
      out.push(doc);
      continue;
    }
    const n = startIndex + i + 1;
    const size = await store.stat(doc.blob.sha256);
    if (size !== doc.blob.bytes) {
      return {
        missing: `the bytes of document ${n} are not in the blob store${size === undefined ? '' : ` (${size} bytes where ${doc.blob.bytes} were stored)`}`,
      };
    }
    if (doc.blob.bytes > maxInlineBytes) {
      out.push(doc);
      continue;
    }
    let bytes: Buffer;
    try {
      bytes = await readBlob(store, doc.blob);
    } catch (err) {
      if (err instanceof BlobUnreadable) return { missing: `the bytes of document ${n} in the blob store are not the ones stored: ${err.message}` };
      throw err;
    }
    const { blob: _blob, ...rest } = doc;
    out.push({ ...rest, data: bytes.toString('base64') });
  }
  return { documents: out };
}
