import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { Readable } from 'node:stream';

// Large documents for the streamed-document tests and bench/documents: bytes made as they are sent (never held whole),
// each 1 MiB chunk different (its number written into a random block), with the SHA-256 of what was sent.

const CHUNK = 1024 * 1024;

/** `bytes` bytes as a stream, 1 MiB at a time; `digest()` gives their SHA-256 (hex) once the stream has ended. */
export function documentStream(bytes: number, seed = randomBytes(CHUNK)): { stream: Readable; digest: () => string } {
  const hash = createHash('sha256');
  let sent = 0;
  let n = 0;
  let hex: string | undefined;
  const stream = new Readable({
    highWaterMark: CHUNK,
    read() {
      if (sent >= bytes) {
        hex ??= hash.digest('hex');
        this.push(null);
        return;
      }
      const size = Math.min(CHUNK, bytes - sent);
      const chunk = Buffer.allocUnsafe(size);
      seed.copy(chunk, 0, 0, size);
      if (size >= 8) chunk.writeBigUInt64BE(BigInt(n), 0);
      n++;
      sent += size;
      hash.update(chunk);
      this.push(chunk);
    },
  });
  return {
    stream,
    digest: () => {
      if (hex === undefined) throw new Error('the document stream has not ended yet');
      return hex;
    },
  };
}

/** The SHA-256 (hex) and size of a stream's bytes, read to its end. */
export async function digestOf(stream: AsyncIterable<Buffer | Uint8Array>): Promise<{ sha256: string; bytes: number }> {
  const hash = createHash('sha256');
  let bytes = 0;
  for await (const chunk of stream) {
    hash.update(chunk);
    bytes += chunk.length;
  }
  return { sha256: hash.digest('hex'), bytes };
}

/** A process's resident memory from /proc (Linux): now and its peak since start or the last resetPeak, in bytes. */
export function rssOf(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

/** Resets a process's peak resident memory (VmHWM) to its current one (Linux: clear_refs 5), so a phase's peak can be read. */
export function resetPeak(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

/** A multipart/form-data body as a stream: the referral part, then one file part per document, each streamed. */
export function multipartStream(boundary: string, referral: unknown, files: Array<{ name: string; type: string; stream: Readable }>): Readable {
  async function* parts(): AsyncGenerator<Buffer> {
    yield Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="referral"\r\nContent-Type: application/json\r\n\r\n${JSON.stringify(referral)}\r\n`
    );
    for (const f of files) {
      yield Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${f.name}"; filename="${f.name}.bin"\r\nContent-Type: ${f.type}\r\n\r\n`);
      for await (const chunk of f.stream) yield chunk as Buffer;
      yield Buffer.from('\r\n');
    }
    yield Buffer.from(`--${boundary}--\r\n`);
  }
  return Readable.from(parts(), { objectMode: false });
}
