import { createHash, randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, readdir, rename, rm, stat, unlink, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import type { Readable, TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Transform } from 'node:stream';
import { BlobRefused, type BlobStore, type ListedBlob, type PutOptions, type StoredBlob } from './types';

const SHA256 = /^[0-9a-f]{64}$/;

/** Counts and hashes the bytes as they pass; refuses past `maxBytes` without passing the rest on. */
class Measure extends Transform {
  readonly hash = createHash('sha256');
  bytes = 0;
  constructor(private readonly maxBytes: number) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.maxBytes) {
      done(new BlobRefused('too-large', `the document is larger than ${this.maxBytes} bytes`));
      return;
    }
    this.hash.update(chunk);
    done(null, chunk);
  }
}

/**
 * Blobs as files under `dir`: `<dir>/<aa>/<sha256>` (content-addressed, two-character fan-out). A put streams into a
 * temporary file in `<dir>/tmp` while hashing, fsyncs it, checks size and digest, then renames it into place and
 * fsyncs the directory, so a blob is either whole and durable or absent; a refused or interrupted put removes its
 * temporary file. Temporary files left by a crash are removed when the store opens.
 */
export async function createFsBlobStore(dir: string): Promise<BlobStore> {
  const tmp = join(dir, 'tmp');
  await mkdir(tmp, { recursive: true });
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  const pathOf = (sha256: string): string => join(dir, sha256.slice(0, 2), sha256);

  const fsyncPath = async (path: string): Promise<void> => {
    const handle = await open(path, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  };

  return {
    kind: 'fs',

    async put(source: Readable, opts: PutOptions): Promise<StoredBlob> {
      const temporary = join(tmp, randomUUID());
      const measure = new Measure(opts.maxBytes);
      try {
        await pipeline(source, measure, createWriteStream(temporary, { flags: 'wx' }), { signal: opts.signal });
        await fsyncPath(temporary);
        const sha256 = measure.hash.digest('hex');
        if (opts.expectedSha256 !== undefined && opts.expectedSha256.toLowerCase() !== sha256) {
          throw new BlobRefused('digest-mismatch', 'the bytes do not match the declared SHA-256 digest');
        }
        const target = pathOf(sha256);
        await mkdir(join(dir, sha256.slice(0, 2)), { recursive: true });
        // The same bytes again: the blob is already there (content-addressed); the new copy goes.
        if ((await stat(target).catch(() => undefined))?.isFile()) {
          await unlink(temporary);
          // Stored again now: its age restarts, so collecting unreferenced blobs leaves it to the request linking it.
          const now = new Date();
          await utimes(target, now, now);
        } else {
          await rename(temporary, target);
          await fsyncPath(join(dir, sha256.slice(0, 2)));
        }
        return { sha256, bytes: measure.bytes };
      } catch (err) {
        await rm(temporary, { force: true });
        if (err instanceof BlobRefused) throw err;
        if (opts.signal?.aborted) throw new BlobRefused('aborted', 'the upload was interrupted');
        throw err;
      }
    },

    async open(sha256: string): Promise<Readable | undefined> {
      if (!SHA256.test(sha256)) return undefined;
      const path = pathOf(sha256);
      if (!(await stat(path).catch(() => undefined))?.isFile()) return undefined;
      return createReadStream(path);
    },

    async stat(sha256: string): Promise<number | undefined> {
      if (!SHA256.test(sha256)) return undefined;
      const s = await stat(pathOf(sha256)).catch(() => undefined);
      return s?.isFile() ? s.size : undefined;
    },

    async delete(sha256: string): Promise<boolean> {
      if (!SHA256.test(sha256)) return false;
      try {
        await unlink(pathOf(sha256));
        return true;
      } catch {
        return false;
      }
    },

    async *list(): AsyncIterable<ListedBlob> {
      for (const fan of await readdir(dir)) {
        if (!/^[0-9a-f]{2}$/.test(fan)) continue;
        for (const name of await readdir(join(dir, fan))) {
          if (!SHA256.test(name)) continue;
          const s = await stat(join(dir, fan, name)).catch(() => undefined);
          if (s?.isFile()) yield { sha256: name, storedAt: new Date(s.mtimeMs) };
        }
      }
    },

    async sweepUnfinished(before: Date): Promise<number> {
      let removed = 0;
      for (const name of await readdir(tmp)) {
        const s = await stat(join(tmp, name)).catch(() => undefined);
        if (s && s.mtime < before) {
          await rm(join(tmp, name), { force: true });
          removed++;
        }
      }
      return removed;
    },
  };
}
