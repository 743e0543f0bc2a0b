import { createHash } from 'node:crypto';
import type { BlobStore } from './types';

/** What a reader checks a blob against: its address (SHA-256, hex) and size, as recorded when it was stored. */
export interface BlobAddress {
  sha256: string;
  bytes: number;
}

/** The bytes read back are not the ones stored (missing, cut short, too long, or another digest): a resend will not help. */
export class BlobUnreadable extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BlobUnreadable';
  }
}

/**
 * A blob's bytes as they stream out of the store, checked against its address: the count as they pass, the SHA-256
 * before the last piece is handed on, so a reader that forwards them (a request body) fails before it completes
 * with wrong bytes. Each iteration opens the blob afresh (a retry reads it again). Rejects with BlobUnreadable.
 */
export async function* verifiedBlob(store: Pick<BlobStore, 'open'>, blob: BlobAddress): AsyncGenerator<Buffer> {
  const source = await store.open(blob.sha256);
  if (!source) throw new BlobUnreadable(`blob ${blob.sha256.slice(0, 12)}… is not in the blob store`);
  const hash = createHash('sha256');
  let total = 0;
  let held: Buffer | undefined;
  try {
    for await (const piece of source) {
      const chunk = Buffer.isBuffer(piece) ? piece : Buffer.from(piece as Uint8Array);
      total += chunk.length;
      if (total > blob.bytes) throw new BlobUnreadable(`blob ${blob.sha256.slice(0, 12)}… holds more than its ${blob.bytes} bytes`);
      hash.update(chunk);
      if (held) yield held;
      held = chunk;
    }
  } finally {
    source.destroy();
  }
  if (total !== blob.bytes) throw new BlobUnreadable(`blob ${blob.sha256.slice(0, 12)}… holds ${total} of its ${blob.bytes} bytes`);
  if (hash.digest('hex') !== blob.sha256) throw new BlobUnreadable(`blob ${blob.sha256.slice(0, 12)}… does not match its SHA-256`);
  if (held) yield held;
}

/** The base64 length of `bytes` bytes (with padding). */
export function base64Length(bytes: number): number {
  return Math.ceil(bytes / 3) * 4;
}

/**
 * Base64 of a stream of bytes, as ASCII bytes, without holding the whole: each piece is encoded up to a multiple of 3
 * bytes and the 0-2 bytes left over go in front of the next one, so the pieces put together are the base64 of the
 * whole (padding only at the very end).
 */
export async function* base64Chunks(bytes: AsyncIterable<Uint8Array>): AsyncGenerator<Buffer> {
  let carry: Buffer = Buffer.alloc(0);
  for await (const piece of bytes) {
    const chunk = carry.length > 0 ? Buffer.concat([carry, piece]) : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
    const aligned = chunk.length - (chunk.length % 3);
    if (aligned > 0) yield Buffer.from(chunk.subarray(0, aligned).toString('base64'), 'latin1');
    carry = Buffer.from(chunk.subarray(aligned)); // a copy of 0-2 bytes: the piece itself may be reused by its source
  }
  if (carry.length > 0) yield Buffer.from(carry.toString('base64'), 'latin1');
}

/** A small blob whole (checked as verifiedBlob checks it): for documents small enough to travel inline. */
export async function readBlob(store: Pick<BlobStore, 'open'>, blob: BlobAddress): Promise<Buffer> {
  const pieces: Buffer[] = [];
  for await (const piece of verifiedBlob(store, blob)) pieces.push(piece);
  return Buffer.concat(pieces, blob.bytes);
}
