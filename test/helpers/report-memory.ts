// Run by test/integration/report-stream.test.ts in a process of its own (with --expose-gc), so the memory it
// reports is this transfer's alone:
//   node --expose-gc --import tsx test/helpers/report-memory.ts <MiB>
// The gateway against the sandbox behind a centre proxy whose attachment host sends a generated report of <MiB>
// (one 1 MiB buffer written again and again, with backpressure); a client reads the report through the gateway
// and hashes it. Prints one JSON line: the bytes and hash the client got, the expected hash, and the peak growth
// of the process's live memory (JS heap and Buffers, sampled after young-generation collections) over the
// transfer, and of its RSS (for information: it includes garbage not yet collected).
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DocumentReference } from '@medplum/fhirtypes';
import { startSandboxServer } from '../../src/sandbox/server';
import { changeStatus, getReferral } from '../../src/store';
import { writeDestinationsFile } from './destinations';
import { eventually, fixture, KEY_A, startGateway } from './gateway';
import { startCentre } from './report-centre';

async function main(): Promise<void> {
  const mib = Number(process.argv[2]);
  const chunk = Buffer.alloc(1024 * 1024, 7);
  Buffer.from('%PDF-1.4\n').copy(chunk);
  const expected = createHash('sha256');
  for (let i = 0; i < mib; i++) expected.update(chunk);

  const sandbox = await startSandboxServer(0, { profile: 'default' });
  const centre = await startCentre(sandbox);
  const dir = mkdtempSync(join(tmpdir(), 'rg-report-mem-'));
  const gw = await startGateway({ DESTINATIONS_FILE: writeDestinationsFile(dir, { baseUrl: centre.base }), DELIVERY_BASE_DELAY_MS: '30' });
  try {
    centre.files.set('big', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': String(mib * chunk.length) });
      let sent = 0;
      const more = (): void => {
        while (sent < mib) {
          sent++;
          if (!res.write(chunk)) {
            res.once('drain', more);
            return;
          }
        }
        res.end();
      };
      more();
    });
    const posted = await fetch(`${sandbox.url}/DocumentReference`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({
        resourceType: 'DocumentReference',
        status: 'current',
        content: [{ attachment: { contentType: 'application/pdf', url: 'files/big' } }],
      }),
    });
    const opinion = ((await posted.json()) as DocumentReference).id as string;
    const submitted = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId: 'REPORT-MEMORY-1' }),
    });
    const id = ((await submitted.json()) as { id: string }).id;
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent', 20_000);
    await changeStatus(gw.db, id, { status: 'completed', report: { reference: `DocumentReference/${opinion}`, url: '', contentType: 'application/pdf' } });

    // Live memory, not garbage the collector has not taken yet: each sample follows a young-generation
    // collection (the chunks passing through are young Buffers), and counts the JS heap and Buffer memory.
    const gc = (globalThis as { gc?: (o?: { type: 'minor' | 'major' }) => void }).gc;
    if (!gc) throw new Error('run with --expose-gc');
    const live = (): number => {
      const m = process.memoryUsage();
      return m.heapUsed + m.arrayBuffers;
    };
    gc({ type: 'major' });
    const before = live();
    let peak = before;
    let rssPeak = process.memoryUsage().rss;
    const rssBefore = rssPeak;
    const sample = setInterval(() => {
      rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
      gc({ type: 'minor' });
      peak = Math.max(peak, live());
    }, 10);
    const res = await fetch(`${gw.url}/referrals/${id}/report/content`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    const got = createHash('sha256');
    let bytes = 0;
    for await (const c of res.body as unknown as AsyncIterable<Uint8Array>) {
      got.update(c);
      bytes += c.byteLength;
    }
    clearInterval(sample);
    gc({ type: 'minor' });
    peak = Math.max(peak, live());
    process.stdout.write(
      `${JSON.stringify({ status: res.status, contentLength: res.headers.get('content-length'), bytes, sha256: got.digest('hex'), expected: expected.digest('hex'), peakGrowth: peak - before, rssGrowth: rssPeak - rssBefore })}\n`
    );
  } finally {
    await gw.stop();
    await centre.close();
    await sandbox.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: Error) => {
    process.stderr.write(`${err.stack ?? err.message}\n`);
    process.exit(1);
  }
);
