/**
 * bench/documents (issue 13): a large document streamed through the gateway, next to bare Node doing the same I/O in
 * the same run.
 *
 *   upload    PUT /referrals/{id}/documents/1/content (and multipart POST /referrals) of a SIZE_MIB document, against a
 *             bare Node route that streams the same bytes to a file and fsyncs it (bench/bare-upload.ts): MB/s, ratio.
 *   delivery  from the upload's 202 until the referral is `sent` (the raw Binary streamed from the blob store, then the
 *             transaction) to a standalone sandbox, against a bare streaming PUT of the same bytes to that sandbox's
 *             Binary endpoint: MB/s, ratio.
 *   memory    the gateway's peak resident memory above idle (Linux VmHWM, reset per phase) while 1 x SIZE_MIB and then
 *             4 x SIZE_MIB/4 concurrent documents are uploaded and delivered.
 *
 * The gateway and the sandbox run as processes of their own (src/index.ts on SQLite and the file-system blob store in
 * a temporary directory; src/cli/sandbox.ts). Run: npm run bench:documents [SIZE_MIB=1024 RUNS=3]
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { documentStream, multipartStream, resetPeak, rssOf } from '../test/helpers/document-bytes';
import { startScript, stopScripts } from './processes';

const MIB = 1024 * 1024;
const SIZE = Number(process.env.SIZE_MIB ?? 1024) * MIB;
const RUNS = Number(process.env.RUNS ?? 3);
const KEY = 'bench-key-0001';
const auth = { authorization: `Bearer ${KEY}` };

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]): string => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
const mbps = (bytes: number, ms: number): number => bytes / 1e6 / (ms / 1000);

function referral(externalId: string, doc: Record<string, unknown>): Record<string, unknown> {
  return {
    externalId,
    kind: 'second-opinion',
    patient: {
      identifiers: [{ system: 'urn:oid:2.16.840.1.113883.19.5', value: `B-${externalId}` }],
      name: { given: ['Bench'], family: 'Patient' },
      birthDate: '1970-01-01',
      gender: 'female',
    },
    referrer: {
      practitioner: { identifier: { system: 'http://hl7.org/fhir/sid/us-npi', value: '1234567893' }, name: { given: ['A'], family: 'Doctor' } },
      organization: { identifier: { system: 'urn:oid:2.16.840.1.113883.19.5', value: 'org-1' }, name: 'City Hospital' },
    },
    diagnosis: { code: { system: 'http://snomed.info/sct', code: '254837009', display: 'Malignant neoplasm of breast' } },
    documents: [{ kind: 'imaging-study', title: 'CT study', contentType: 'application/dicom', ...doc }],
    consent: { patientAgreed: true },
  };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-documents-'));
  const centre = await startScript('src/cli/sandbox.ts', { PORT: '0', LOG_LEVEL: 'warn' }, /sandbox-listening.*127\.0\.0\.1:(\d+)/);
  const bare = await startScript('bench/bare-upload.ts', { PORT: '0' }, /"port":(\d+)/);
  const gateway = await startScript(
    'src/index.ts',
    {
      NODE_ENV: 'test',
      PORT: '0',
      HOST: '127.0.0.1',
      DATABASE_URL: `sqlite:${join(dir, 'bench.db')}`,
      BLOB_DIR: join(dir, 'blobs'),
      API_KEYS: `bench:${KEY}`,
      LOG_LEVEL: 'warn',
      HL7_MLLP_PORT: '0',
      DESTINATIONS_FILE: join(dir, 'none.json'),
      FHIR_BASE_URL: `http://127.0.0.1:${centre.port}/fhir/R4`,
      FHIR_TIMEOUT_MS: '120000',
      DELIVERY_CONCURRENCY: '4',
    },
    /listening on http:\/\/127\.0\.0\.1:(\d+)/
  );
  const api = `http://127.0.0.1:${gateway.port}`;
  const fhir = `http://127.0.0.1:${centre.port}/fhir/R4`;
  const pid = gateway.child.pid as number;
  const seed = randomBytes(MIB);
  let serial = 0;

  /** Creates a referral awaiting one upload; returns its id. */
  const awaiting = async (): Promise<string> => {
    const res = await request(`${api}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify(referral(`BENCH-${Date.now()}-${serial++}`, { upload: true })),
    });
    const view = (await res.body.json()) as { id: string };
    if (res.statusCode !== 202) throw new Error(`referral not accepted: ${res.statusCode} ${JSON.stringify(view)}`);
    return view.id;
  };
  /** PUTs `bytes` to the referral's upload URL; returns the milliseconds until the 202. */
  const upload = async (id: string, bytes: number): Promise<number> => {
    const doc = documentStream(bytes, seed);
    const t0 = performance.now();
    const res = await request(`${api}/referrals/${id}/documents/1/content`, {
      method: 'PUT',
      headers: { ...auth, 'content-type': 'application/dicom', 'content-length': String(bytes) },
      body: doc.stream,
    });
    await res.body.dump();
    if (res.statusCode !== 202) throw new Error(`upload answered ${res.statusCode}`);
    return performance.now() - t0;
  };
  /** Polls the referral until it is sent; returns the milliseconds since `from`. */
  const sent = async (id: string, from: number): Promise<number> => {
    for (;;) {
      const res = await request(`${api}/referrals/${id}`, { headers: auth });
      const v = (await res.body.json()) as { status: string; delivery: { lastError: string | null } };
      if (v.status === 'sent') return performance.now() - from;
      if (v.status === 'delivery-failed') throw new Error(`delivery failed: ${v.delivery.lastError}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  };
  const bareUpload = async (bytes: number): Promise<number> => {
    const t0 = performance.now();
    const res = await request(`http://127.0.0.1:${bare.port}/upload`, {
      method: 'PUT',
      headers: { 'content-type': 'application/dicom', 'content-length': String(bytes) },
      body: documentStream(bytes, seed).stream,
    });
    await res.body.dump();
    return performance.now() - t0;
  };
  const barePut = async (bytes: number): Promise<number> => {
    const t0 = performance.now();
    const res = await request(`${fhir}/Binary/bench-${serial++}`, {
      method: 'PUT',
      headers: { 'content-type': 'application/dicom', 'content-length': String(bytes) },
      body: documentStream(bytes, seed).stream,
    });
    await res.body.dump();
    if (res.statusCode >= 300) throw new Error(`bare PUT answered ${res.statusCode}`);
    return performance.now() - t0;
  };
  const multipart = async (bytes: number): Promise<{ id: string; ms: number }> => {
    const boundary = `bench-${randomBytes(8).toString('hex')}`;
    const body = multipartStream(boundary, referral(`BENCH-MP-${Date.now()}-${serial++}`, { file: 'scan' }), [
      { name: 'scan', type: 'application/dicom', stream: documentStream(bytes, seed).stream },
    ]);
    const t0 = performance.now();
    const res = await request(`${api}/referrals`, { method: 'POST', headers: { ...auth, 'content-type': `multipart/form-data; boundary=${boundary}` }, body });
    const view = (await res.body.json()) as { id: string };
    if (res.statusCode !== 202) throw new Error(`multipart answered ${res.statusCode}`);
    return { id: view.id, ms: performance.now() - t0 };
  };

  try {
    // Warm-up: every path once with a small document, then the idle level.
    const w = await awaiting();
    await upload(w, 4 * MIB);
    await sent(w, performance.now());
    await bareUpload(4 * MIB);
    await barePut(4 * MIB);
    await sent((await multipart(4 * MIB)).id, performance.now());
    await new Promise((r) => setTimeout(r, 1000));
    const idle = rssOf(pid).rss;

    const up: number[] = [];
    const upBare: number[] = [];
    const mp: number[] = [];
    const del: number[] = [];
    const delBare: number[] = [];
    let peakOne = 0;
    for (let run = 0; run < RUNS; run++) {
      upBare.push(mbps(SIZE, await bareUpload(SIZE)));
      const id = await awaiting();
      resetPeak(pid);
      const ms = await upload(id, SIZE);
      const t = performance.now();
      del.push(mbps(SIZE, await sent(id, t)));
      peakOne = Math.max(peakOne, rssOf(pid).peak - idle);
      up.push(mbps(SIZE, ms));
      delBare.push(mbps(SIZE, await barePut(SIZE)));
      const m = await multipart(SIZE);
      mp.push(mbps(SIZE, m.ms));
      await sent(m.id, performance.now());
      process.stderr.write(`run ${run + 1}/${RUNS} done\n`);
    }

    // Four documents of a quarter of the size at once, uploaded and delivered.
    const quarter = Math.floor(SIZE / 4);
    const ids = await Promise.all([0, 1, 2, 3].map(() => awaiting()));
    resetPeak(pid);
    const t4 = performance.now();
    await Promise.all(ids.map((id) => upload(id, quarter)));
    await Promise.all(ids.map((id) => sent(id, t4)));
    const peakFour = rssOf(pid).peak - idle;

    const sizeMib = SIZE / MIB;
    const row = (name: string, xs: number[], base: number[]): string =>
      `${name.padEnd(44)} ${median(xs).toFixed(0).padStart(6)} MB/s (${spread(xs)})   ratio ${(median(xs) / median(base)).toFixed(2)}`;
    console.log(`\nbench/documents: ${sizeMib} MiB document, ${RUNS} runs, medians (min–max); ${new Date().toISOString().slice(0, 10)}`);
    console.log(`${'bare route: stream to a file + fsync'.padEnd(44)} ${median(upBare).toFixed(0).padStart(6)} MB/s (${spread(upBare)})`);
    console.log(row('gateway PUT .../content (blob store)', up, upBare));
    console.log(row('gateway multipart POST /referrals', mp, upBare));
    console.log(`${'bare streaming PUT Binary to the sandbox'.padEnd(44)} ${median(delBare).toFixed(0).padStart(6)} MB/s (${spread(delBare)})`);
    console.log(row('gateway delivery (upload 202 -> sent)', del, delBare));
    console.log(
      `gateway idle RSS ${(idle / MIB).toFixed(0)} MiB; peak above idle: 1 x ${sizeMib} MiB ${(peakOne / MIB).toFixed(1)} MiB, 4 x ${sizeMib / 4} MiB ${(peakFour / MIB).toFixed(1)} MiB`
    );
  } finally {
    await stopScripts(gateway, centre, bare);
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
