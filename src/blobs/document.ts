import { createHash } from 'node:crypto';
import { type Readable, Transform, type TransformCallback } from 'node:stream';
import type { BlobRef } from '../model';
import type { BlobStore, PutOptions } from './types';

/** Hashes SHA-1 as the bytes pass (FHIR Attachment.hash), passing them on unchanged. */
class Sha1 extends Transform {
  readonly hash = createHash('sha1');
  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.hash.update(chunk);
    done(null, chunk);
  }
}

/**
 * A document's bytes into the store (durable when it resolves, refused with BlobRefused keeping nothing), with the
 * SHA-1 FHIR's Attachment.hash wants hashed on the way, so that delivery never reads the bytes just to hash them.
 */
export async function putDocument(store: BlobStore, source: Readable, opts: PutOptions): Promise<BlobRef> {
  const sha1 = new Sha1();
  source.on('error', (err) => sha1.destroy(err));
  source.pipe(sha1);
  const stored = await store.put(sha1, opts);
  return { sha256: stored.sha256, bytes: stored.bytes, sha1: sha1.hash.digest('base64') };
}
