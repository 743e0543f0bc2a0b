// Run by test/integration/blob-store.test.ts in a process of its own, so the peak RSS it reports is this round
// trip's alone (not the test runner's heap, whose garbage from other suites delays collection):
//   tsx test/helpers/blob-roundtrip.ts fs <MiB>
//   tsx test/helpers/blob-roundtrip.ts postgres <MiB> <DATABASE_URL of a migrated schema>
// Streams a generated document into a fresh blob store and back out, then prints one JSON line.
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { type BlobStore, createFsBlobStore, createPostgresBlobStore } from '../../src/blobs';
import { openDb } from '../../src/store';

async function main(): Promise<void> {
  const [kind, mibText, url] = process.argv.slice(2);
  const mib = Number(mibText);
  const chunk = (i: number): Buffer => Buffer.alloc(1024 * 1024, (i * 31 + 1) % 251);
  const expected = createHash('sha256');
  for (let i = 0; i < mib; i++) expected.update(chunk(i));
  const sha256 = expected.digest('hex');
  const stream = (): Readable =>
    Readable.from(
      (function* () {
        for (let i = 0; i < mib; i++) yield chunk(i);
      })()
    );

  let store: BlobStore;
  let close: () => Promise<void>;
  if (kind === 'postgres') {
    const db = openDb(url as string);
    store = createPostgresBlobStore(db);
    close = () => db.close();
  } else {
    const dir = mkdtempSync(join(tmpdir(), 'rg-blobs-'));
    store = await createFsBlobStore(dir);
    close = async () => rmSync(dir, { recursive: true, force: true });
  }
  try {
    const before = process.memoryUsage().rss;
    let peak = before;
    const sample = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 5);
    const stored = await store.put(stream(), { maxBytes: (mib + 44) * 1024 * 1024, expectedSha256: sha256 });
    const back = createHash('sha256');
    for await (const c of (await store.open(sha256)) as Readable) back.update(c as Buffer);
    clearInterval(sample);
    process.stdout.write(
      `${JSON.stringify({ expected: { sha256, bytes: mib * 1024 * 1024 }, stored, readBack: back.digest('hex'), stat: await store.stat(sha256), peakGrowth: peak - before })}\n`
    );
  } finally {
    await close();
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`);
  process.exit(1);
});
