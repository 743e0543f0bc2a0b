import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { logger } from '../observability';
import { type Db, nowIso } from '../store';
import { BlobRefused, type BlobStore, type ListedBlob, type PutOptions, type StoredBlob } from './types';

/** The size of a stored chunk: the most an upload or a reader holds at a time (plus what the source hands over). */
export const CHUNK_BYTES = 1024 * 1024;

/** A source's piece as a Buffer (a view, not a copy, of bytes; a string as UTF-8). */
function toBuffer(piece: unknown): Buffer {
  if (Buffer.isBuffer(piece)) return piece;
  if (typeof piece === 'string') return Buffer.from(piece);
  if (piece instanceof Uint8Array) return Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
  throw new TypeError('a blob source must yield bytes or strings');
}

/** How many addresses `list()` reads per query. */
const LIST_PAGE = 1000;

const SHA256_HEX = /^[0-9a-f]{64}$/;

/**
 * Blobs in the database (PostgreSQL, when replicas share it; the tables exist on SQLite too): `put` writes the bytes as
 * they arrive as 1 MiB `blob_chunks` rows of a new upload, each its own short statement, hashing as they pass; once
 * the digest is known, one statement names the upload in `blobs` (or, when that digest is already there, the new
 * chunks are removed and the old blob stays). `open` reads one chunk per `read()`. Neither ever holds a whole blob.
 */
export function createPostgresBlobStore(db: Db): BlobStore {
  const k = db.kysely;

  const removeUpload = async (uploadId: string): Promise<void> => {
    await k.deleteFrom('blob_chunks').where('upload_id', '=', uploadId).execute();
  };

  /** Removes what a refused or failed put wrote; a failure here is logged (the chunks' upload id carries its start time). */
  const discard = async (uploadId: string): Promise<void> => {
    try {
      await removeUpload(uploadId);
    } catch (err) {
      logger.warn('blob store: could not remove the chunks of an unfinished upload', { uploadId, error: (err as Error).message });
    }
  };

  async function put(source: Readable, opts: PutOptions): Promise<StoredBlob> {
    const { maxBytes, signal } = opts;
    const expected = opts.expectedSha256?.toLowerCase();
    if (signal?.aborted) throw new BlobRefused('aborted', 'the upload was aborted');
    const uploadId = `${nowIso()}_${randomBytes(8).toString('hex')}`;
    const hash = createHash('sha256');
    let total = 0;
    let seq = 0;
    let wrote = false;
    let pending: Buffer[] = [];
    let pendingBytes = 0;

    const writeChunk = async (data: Buffer): Promise<void> => {
      wrote = true;
      await k.insertInto('blob_chunks').values({ upload_id: uploadId, seq, data }).execute();
      seq++;
    };

    // The sender went away: the source is destroyed (as pipeline does with a signal), which ends the loop below.
    const onAbort = (): void => {
      source.destroy();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      try {
        // Not destroyed on a refusal (too large): the caller decides what becomes of the rest (answer, then close).
        for await (const piece of source.iterator({ destroyOnReturn: false })) {
          const buf = toBuffer(piece);
          total += buf.length;
          if (total > maxBytes) throw new BlobRefused('too-large', `the blob is more than ${maxBytes} bytes`);
          hash.update(buf);
          pending.push(buf);
          pendingBytes += buf.length;
          if (pendingBytes < CHUNK_BYTES) continue;
          const all = pending.length === 1 ? pending[0] : Buffer.concat(pending, pendingBytes);
          let at = 0;
          for (; all.length - at >= CHUNK_BYTES; at += CHUNK_BYTES) {
            await writeChunk(all.subarray(at, at + CHUNK_BYTES));
            if (signal?.aborted) throw new BlobRefused('aborted', 'the upload was aborted');
          }
          // A copy, so the rest does not keep the whole concatenation alive.
          pending = at < all.length ? [Buffer.from(all.subarray(at))] : [];
          pendingBytes = all.length - at;
        }
        if (signal?.aborted) throw new BlobRefused('aborted', 'the upload was aborted');
        if (pendingBytes > 0) {
          await writeChunk(pending.length === 1 ? pending[0] : Buffer.concat(pending, pendingBytes));
          pending = [];
        }
      } catch (err) {
        if (signal?.aborted && !(err instanceof BlobRefused && err.reason !== 'aborted')) {
          throw new BlobRefused('aborted', 'the upload was aborted');
        }
        throw err;
      }
      const sha256 = hash.digest('hex');
      if (expected !== undefined && expected !== sha256) {
        throw new BlobRefused('digest-mismatch', `the bytes' SHA-256 is ${sha256}, not the declared ${expected}`);
      }
      if (signal?.aborted) throw new BlobRefused('aborted', 'the upload was aborted');
      const inserted = await k
        .insertInto('blobs')
        .values({ sha256, bytes: total, upload_id: uploadId, created_at: nowIso() })
        .onConflict((oc) => oc.column('sha256').doNothing())
        .executeTakeFirst();
      if (Number(inserted.numInsertedOrUpdatedRows ?? 0) === 0) {
        // The same bytes are stored already: keep those, drop these. Their age restarts, so collecting unreferenced
        // blobs (on any instance) leaves them to the request about to link them.
        await k.updateTable('blobs').set({ created_at: nowIso() }).where('sha256', '=', sha256).execute();
        if (wrote) await discard(uploadId);
      }
      return { sha256, bytes: total };
    } catch (err) {
      if (wrote) await discard(uploadId);
      throw err;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  async function open(sha256: string): Promise<Readable | undefined> {
    if (!SHA256_HEX.test(sha256)) return undefined;
    const row = await k.selectFrom('blobs').select(['upload_id', 'bytes']).where('sha256', '=', sha256).executeTakeFirst();
    if (!row) return undefined;
    const size = Number(row.bytes);
    const uploadId = row.upload_id;
    let seq = 0;
    let read = 0;
    return new Readable({
      // One chunk per read(): the stream asks again only once the consumer has taken what it holds.
      read(this: Readable): void {
        if (read >= size) {
          this.push(null);
          return;
        }
        k.selectFrom('blob_chunks')
          .select('data')
          .where('upload_id', '=', uploadId)
          .where('seq', '=', seq)
          .executeTakeFirst()
          .then(
            (chunk) => {
              if (this.destroyed) return;
              if (!chunk) {
                this.destroy(new Error(`blob ${sha256} lost its chunk ${seq} while being read (deleted?)`));
                return;
              }
              const data = Buffer.isBuffer(chunk.data) ? chunk.data : Buffer.from(chunk.data);
              seq++;
              read += data.length;
              if (read > size) {
                this.destroy(new Error(`blob ${sha256} has more bytes than its recorded ${size}`));
                return;
              }
              this.push(data);
              if (read >= size) this.push(null);
            },
            (err: unknown) => this.destroy(err instanceof Error ? err : new Error(String(err)))
          );
      },
    });
  }

  async function stat(sha256: string): Promise<number | undefined> {
    if (!SHA256_HEX.test(sha256)) return undefined;
    const row = await k.selectFrom('blobs').select('bytes').where('sha256', '=', sha256).executeTakeFirst();
    return row ? Number(row.bytes) : undefined;
  }

  async function remove(sha256: string): Promise<boolean> {
    if (!SHA256_HEX.test(sha256)) return false;
    return k.transaction().execute(async (tx) => {
      const row = await tx.deleteFrom('blobs').where('sha256', '=', sha256).returning('upload_id').executeTakeFirst();
      if (!row) return false;
      await tx.deleteFrom('blob_chunks').where('upload_id', '=', row.upload_id).execute();
      return true;
    });
  }

  async function* list(): AsyncIterable<ListedBlob> {
    let after: string | undefined;
    for (;;) {
      let q = k.selectFrom('blobs').select(['sha256', 'created_at']).orderBy('sha256').limit(LIST_PAGE);
      if (after !== undefined) q = q.where('sha256', '>', after);
      const rows = await q.execute();
      for (const r of rows) yield { sha256: r.sha256, storedAt: new Date(r.created_at) };
      if (rows.length < LIST_PAGE) return;
      after = rows[rows.length - 1].sha256;
    }
  }

  /** Chunks of uploads no blob names whose upload began before `before` (upload ids start with that time). */
  async function sweepUnfinished(before: Date): Promise<number> {
    const res = await k
      .deleteFrom('blob_chunks')
      .where('upload_id', '<', before.toISOString())
      .where('upload_id', 'not in', k.selectFrom('blobs').select('upload_id'))
      .executeTakeFirst();
    return Number(res.numDeletedRows);
  }

  return { kind: 'postgres', put, open, stat, delete: remove, list, sweepUnfinished };
}
