/**
 * bench/abuse: the service under hostile load, next to its own idle figures in the same run (issue 10,
 * points 4 and 5). The real service is started as a child process (src/index.ts, as `npm start` runs it)
 * with its defaults (SQLite in a temporary directory; MAX_CONNECTIONS_PER_ADDRESS=0, since the bench is one
 * address where real submitters are many). Everything is measured from this process:
 *
 *   idle     GET /healthz latency p50/p95/p99/max over IDLE_PROBES sequential requests; the service's RSS.
 *   flood    SUBMITTERS (32) concurrent submitters POST the sample referral (fixtures/referrals/
 *            breast-second-opinion.json, a new externalId each) for FLOOD_SECONDS while /healthz is probed every
 *            20 ms: healthz latency next to idle, submissions/s, and how many were delivered by the end (a service
 *            that accepts fast while its delivery starves is not faster). Destination: the built-in sandbox, in
 *            the service's process, as `npm start` runs it (--flood-centre process: a sandbox of its own).
 *   plain    UPLOADS (20) concurrent UPLOAD_MB (20 MB) referrals (one inline PDF-like base64 document each),
 *            spread over 4 API keys so the per-client share does not limit them: peak RSS above idle, as a
 *            ratio of the configured MAX_INTAKE_BYTES_IN_FLIGHT (issue target <= 1.5), status counts, healthz.
 *            Destination: the standalone sandbox (src/cli/sandbox.ts) in a process of its own, as a centre is in
 *            production: the built-in sandbox keeps every delivered document in the service's heap, which is
 *            no intake memory (--upload-centre builtin measures that).
 *   gzip     the same, each body sent with Content-Encoding: gzip.
 *
 * RSS is VmRSS of the child sampled every 50 ms from /proc/<pid>/status, and its peak is VmHWM, reset through
 * /proc/<pid>/clear_refs just before the scenario (so start-up's peak does not count). "Above idle" is that
 * peak minus VmRSS right before the scenario. Each upload scenario has a fresh service; the peak is taken until
 * the last answer and over SETTLE_SECONDS (3) more, while the accepted referrals are being delivered.
 *
 *   npx tsx bench/abuse.ts                          # 3 runs of every scenario (about 3 minutes)
 *   npx tsx bench/abuse.ts --runs 1 --only flood    # scenarios: idle, flood, plain, gzip (comma-separated)
 *   npx tsx bench/abuse.ts --node-args "--cpu-prof --cpu-prof-dir=/tmp/prof"   # flags for the service's node
 *   npx tsx bench/abuse.ts --env MAX_INTAKE_BYTES_IN_FLIGHT=134217728 --env INTAKE_WAIT_MS=20000
 *   npx tsx bench/abuse.ts --centre builtin         # both kinds of scenario against the built-in sandbox
 *
 * The service gets GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072, as `npm start` and the Docker image give it
 * (src/memory/allocator.ts); `--env GLIBC_TUNABLES=` measures glibc's default instead.
 *
 * SERVICE_LOG=<file> appends the service's stdout and stderr there (e.g. with --node-args --trace-gc).
 * Other settings: FLOOD_SECONDS (10), UPLOADS (20), UPLOAD_MB (20), SUBMITTERS (32), IDLE_PROBES (300).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { gzip as gzipCb } from 'node:zlib';
import { Client, Pool } from 'undici';
import { GLIBC_TUNABLES_RECOMMENDED } from '../src/memory';
import { prng } from '../test/helpers/prng';

const gzip = promisify(gzipCb);

// ---- settings ----

type Centre = 'builtin' | 'process';

function args(): { runs: number; only: Set<string>; nodeArgs: string[]; env: Record<string, string>; floodCentre: Centre; uploadCentre: Centre } {
  const argv = process.argv.slice(2);
  let runs = 3;
  let floodCentre: Centre = 'builtin';
  let uploadCentre: Centre = 'process';
  let only = new Set(['idle', 'flood', 'plain', 'gzip']);
  const nodeArgs: string[] = [];
  const env: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--runs') runs = Math.max(1, Number(value()));
    else if (a === '--only') only = new Set(value().split(','));
    else if (a === '--centre' || a === '--flood-centre' || a === '--upload-centre') {
      const c = value();
      if (c !== 'builtin' && c !== 'process') throw new Error(`${a} is builtin or process`);
      if (a !== '--upload-centre') floodCentre = c;
      if (a !== '--flood-centre') uploadCentre = c;
    } else if (a === '--node-args') nodeArgs.push(...value().split(/\s+/).filter(Boolean));
    else if (a === '--env') {
      const [k, ...v] = value().split('=');
      env[k] = v.join('=');
    } else throw new Error(`unknown argument ${a} (see the comment at the top of bench/abuse.ts)`);
  }
  return { runs, only, nodeArgs, env, floodCentre, uploadCentre };
}

const ARGS = args();
const FLOOD_SECONDS = Number(process.env.FLOOD_SECONDS ?? 10);
const UPLOADS = Number(process.env.UPLOADS ?? 20);
const UPLOAD_BYTES = Number(process.env.UPLOAD_MB ?? 20) * 1_000_000;
const SUBMITTERS = Number(process.env.SUBMITTERS ?? 32);
const IDLE_PROBES = Number(process.env.IDLE_PROBES ?? 300);
const SETTLE_SECONDS = Number(process.env.SETTLE_SECONDS ?? 3);
const PROBE_EVERY_MS = 20;
const CLIENTS = ['bench-a', 'bench-b', 'bench-c', 'bench-d'];
const keyOf = (client: string): string => `${client}-key-0123456789abcdef`;
const MiB = 1024 * 1024;

// ---- the service ----

interface Service {
  child: ChildProcess;
  pid: number;
  url: string;
  budget: number;
  stop(): Promise<void>;
}

/** The standalone sandbox FHIR server (src/cli/sandbox.ts) in a process of its own, as a centre is in production. */
async function startCentre(): Promise<{ url: string; stop(): Promise<void> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/sandbox.ts'], {
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1' },
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  const url = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout?.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /"event":"sandbox-listening","url":"([^"]+)"/.exec(buf);
      if (m) resolve(m[1]);
    });
    child.once('exit', (code) => reject(new Error(`the sandbox exited with ${code}`)));
  });
  child.stdout?.resume();
  return {
    url,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await once(child, 'exit');
      clearTimeout(timer);
    },
  };
}

async function startService(dir: string, centre: Centre): Promise<Service> {
  const external = centre === 'process' ? await startCentre() : undefined;
  const env: Record<string, string> = {
    PORT: '0',
    HOST: '127.0.0.1',
    DATABASE_URL: `sqlite:${join(dir, `abuse-${Date.now()}.db`)}`,
    DESTINATIONS_FILE: join(dir, 'none.json'), // no destinations file: the built-in sandbox
    API_KEYS: CLIENTS.map((c) => `${c}:${keyOf(c)}`).join(','),
    LOG_LEVEL: 'warn',
    // The bench is one address; real submitters are many. The per-address cap is not what is measured here.
    MAX_CONNECTIONS_PER_ADDRESS: '0',
    ...(external ? { FHIR_BASE_URL: external.url } : {}),
    // As npm start and the Docker image run it (src/memory/allocator.ts); --env GLIBC_TUNABLES= measures without.
    GLIBC_TUNABLES: process.env.GLIBC_TUNABLES ?? GLIBC_TUNABLES_RECOMMENDED,
    ...ARGS.env,
  };
  const child = spawn(process.execPath, [...ARGS.nodeArgs, '--import', 'tsx', 'src/index.ts'], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  const url = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout?.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(buf);
      if (m) resolve(m[1]);
    });
    child.once('exit', (code) => reject(new Error(`the service exited with ${code}: ${stderr}`)));
  });
  if (process.env.SERVICE_LOG) {
    const log = createWriteStream(process.env.SERVICE_LOG, { flags: 'a' });
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
  } else {
    child.stdout?.resume();
  }
  // Warm-up: one referral, so the first measured one does not load the FHIR R4 definitions (the first validation
  // does, ~2.5 s and ~150 MiB of heap, when no built-in sandbox loaded them at start-up).
  const warm = await fetch(`${url}/referrals`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${keyOf(CLIENTS[0])}` },
    body: JSON.stringify({ ...sample(), externalId: `WARM-UP-${process.pid}` }),
  });
  if (warm.status !== 202) throw new Error(`the warm-up referral was answered ${warm.status}: ${(await warm.text()).slice(0, 300)}`);
  const budget = Number(env.MAX_INTAKE_BYTES_IN_FLIGHT ?? 256 * MiB);
  return {
    child,
    pid: child.pid as number,
    url,
    budget,
    async stop() {
      if (child.exitCode === null) {
        // Its data is thrown away: no need to wait for a clean shutdown (which lets deliveries in flight finish).
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 1000);
        await once(child, 'exit');
        clearTimeout(timer);
      }
      await external?.stop();
    },
  };
}

// ---- memory of the child ----

function procStatus(pid: number): { rss: number; hwm: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** Samples the child's RSS every 50 ms; `stop` gives the idle RSS, the sampled peak and VmHWM since `start`. */
function memoryWatch(pid: number): { stop(): { idle: number; peak: number; hwm: number }; mark(): number } {
  const idle = procStatus(pid).rss;
  let hwmReset = false;
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5'); // resets VmHWM to the current RSS
    hwmReset = true;
  } catch {
    // not permitted here: the sampled peak is all there is
  }
  let peak = idle;
  const sample = (): void => {
    try {
      peak = Math.max(peak, procStatus(pid).rss);
    } catch {
      // the child is gone
    }
  };
  const timer = setInterval(sample, 50);
  return {
    mark() {
      sample();
      return Math.max(peak, hwmReset ? procStatus(pid).hwm : 0);
    },
    stop() {
      clearInterval(timer);
      sample();
      const hwm = hwmReset ? procStatus(pid).hwm : peak;
      return { idle, peak, hwm: Math.max(hwm, peak) };
    },
  };
}

// ---- /healthz ----

interface Latencies {
  p50: number;
  p95: number;
  p99: number;
  max: number;
  n: number;
  failed: number;
}

function summarise(ms: number[], failed = 0): Latencies {
  const s = [...ms].sort((a, b) => a - b);
  const at = (q: number): number => s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
  return { p50: at(0.5), p95: at(0.95), p99: at(0.99), max: s[s.length - 1] ?? NaN, n: s.length, failed };
}

async function probeOnce(client: Client): Promise<number> {
  const t0 = performance.now();
  const res = await client.request({ method: 'GET', path: '/healthz' });
  await res.body.text();
  if (res.statusCode !== 200) throw new Error(`healthz ${res.statusCode}`);
  return performance.now() - t0;
}

/** Probes /healthz on its own connection every `everyMs` (after the previous answer) until `stop` is called. */
function prober(url: string, everyMs: number): { stop(): Promise<Latencies> } {
  const client = new Client(url, { headersTimeout: 60_000, bodyTimeout: 60_000 });
  const ms: number[] = [];
  let failed = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      try {
        ms.push(await probeOnce(client));
      } catch {
        failed++;
      }
      await new Promise((r) => setTimeout(r, everyMs));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      await client.close();
      return summarise(ms, failed);
    },
  };
}

async function idleHealthz(url: string): Promise<Latencies> {
  const client = new Client(url);
  const ms: number[] = [];
  for (let i = 0; i < 20; i++) await probeOnce(client); // warm-up
  for (let i = 0; i < IDLE_PROBES; i++) {
    ms.push(await probeOnce(client));
    await new Promise((r) => setTimeout(r, 2));
  }
  await client.close();
  return summarise(ms);
}

// ---- bodies ----

function sample(): Record<string, any> {
  const body = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, any>;
  delete body.callbackUrl; // no webhooks leave the machine
  return body;
}

/**
 * Base64 of about `bytes` characters of a PDF-like document: a header, then pages of text drawn from a small
 * vocabulary (compressible, as text PDFs are) with runs of pseudo-random bytes (as embedded images are).
 */
function pdfLikeBase64(chars: number): string {
  const rand = prng(20261202);
  const words = ['tumour', 'margin', 'biopsy', 'grade', 'ductal', 'carcinoma', 'lymph', 'node', 'HER2', 'ER+', 'stage', 'specimen', 'mm', 'negative'];
  const raw = Buffer.alloc(Math.ceil((chars / 4) * 3));
  let at = raw.write('%PDF-1.7\n%\xe2\xe3\xcf\xd3\n', 'latin1');
  while (at < raw.length) {
    if (rand() < 0.5) {
      const line = `BT /F1 10 Tf 72 ${Math.floor(rand() * 700)} Td (${Array.from({ length: 8 }, () => words[Math.floor(rand() * words.length)]).join(' ')}) Tj ET\n`;
      at += raw.write(line, at, 'latin1');
    } else {
      const end = Math.min(raw.length, at + 64);
      for (; at < end; at++) raw[at] = Math.floor(rand() * 256);
    }
  }
  return raw.toString('base64').slice(0, chars - (chars % 4));
}

/** A valid referral of about `total` bytes as JSON: the sample with one inline document filling it. */
function uploadParts(total: number): { head: Buffer; data: Buffer; tail: (externalId: string) => Buffer } {
  const body = sample();
  body.documents = [{ kind: 'pathology-report', title: 'Whole-slide pathology report', contentType: 'application/pdf', date: '2026-01-10', data: '@@DATA@@' }];
  body.externalId = '@@ID@@';
  // The externalId goes last, after the document, so the large part is shared by every body.
  const { externalId: _id, ...rest } = body;
  const text = `${JSON.stringify(rest).slice(0, -1)},"externalId":"@@ID@@"}`;
  const [head, after] = text.split('"@@DATA@@"');
  const data = Buffer.from(`"${pdfLikeBase64(total - text.length)}"`, 'latin1');
  return { head: Buffer.from(head), data, tail: (externalId) => Buffer.from(after.replace('@@ID@@', externalId)) };
}

// ---- scenarios ----

interface FloodResult {
  healthz: Latencies;
  perSecond: number;
  statuses: Record<string, number>;
  /** Referrals by status when the flood ended (from /metrics): how far delivery kept up. */
  byStatus: Record<string, number>;
}

/** Referrals by status, from the service's /metrics (referral_referrals). */
async function referralsByStatus(url: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^referral_referrals\{status="([^"]+)"\} (\d+)/gm)) out[m[1]] = Number(m[2]);
  return out;
}

async function flood(url: string): Promise<FloodResult> {
  const base = sample();
  const pool = new Pool(url, { connections: SUBMITTERS, headersTimeout: 120_000, bodyTimeout: 120_000 });
  const statuses: Record<string, number> = {};
  let accepted = 0;
  let n = 0;
  const probe = prober(url, PROBE_EVERY_MS);
  const t0 = performance.now();
  const end = t0 + FLOOD_SECONDS * 1000;
  await Promise.all(
    Array.from({ length: SUBMITTERS }, async (_, s) => {
      const client = CLIENTS[s % CLIENTS.length];
      while (performance.now() < end) {
        const body = JSON.stringify({ ...base, externalId: `FLOOD-${process.pid}-${Date.now()}-${n++}` });
        try {
          const res = await pool.request({
            method: 'POST',
            path: '/referrals',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${keyOf(client)}` },
            body,
          });
          await res.body.text();
          statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1;
          if (res.statusCode === 202) accepted++;
        } catch (err) {
          const k = `error ${(err as Error).message.slice(0, 40)}`;
          statuses[k] = (statuses[k] ?? 0) + 1;
        }
      }
    })
  );
  const seconds = (performance.now() - t0) / 1000;
  const healthz = await probe.stop();
  await pool.close();
  return { healthz, perSecond: accepted / seconds, statuses, byStatus: await referralsByStatus(url) };
}

interface UploadResult {
  mode: 'plain' | 'gzip';
  idleRss: number;
  peakAboveIdle: number;
  peakAboveIdleAnswered: number;
  budget: number;
  statuses: Record<string, number>;
  seconds: number;
  bodyBytes: number;
  wireBytes: number;
  healthz: Latencies;
  delivered: number;
}

interface UploadBodies {
  plain: Buffer[][];
  gzip: Buffer[][];
}

/** The upload bodies, made once: each scenario has a fresh service (and database), so the externalIds can repeat. */
async function uploadBodies(): Promise<UploadBodies> {
  const parts = uploadParts(UPLOAD_BYTES);
  const plain = Array.from({ length: UPLOADS }, (_, i) => [parts.head, parts.data, parts.tail(`UPLOAD-${process.pid}-${i}`)]);
  // Level 1: compressing should not be what takes the bench's time.
  const gzipped = ARGS.only.has('gzip') ? await Promise.all(plain.map(async (p) => [await gzip(Buffer.concat(p), { level: 1 })])) : [];
  return { plain, gzip: gzipped };
}

async function uploads(svc: Service, mode: 'plain' | 'gzip', all: UploadBodies): Promise<UploadResult> {
  const bodies = all[mode];
  const bodyBytes = all.plain[0].reduce((a, b) => a + b.length, 0);
  const wireBytes = bodies[0].reduce((a, b) => a + b.length, 0);
  const pool = new Pool(svc.url, { connections: UPLOADS, headersTimeout: 300_000, bodyTimeout: 300_000 });
  // Settle, then the baseline.
  await new Promise((r) => setTimeout(r, 500));
  const mem = memoryWatch(svc.pid);
  const idleRss = procStatus(svc.pid).rss;
  const probe = prober(svc.url, PROBE_EVERY_MS);
  const statuses: Record<string, number> = {};
  const accepted: string[] = [];
  const t0 = performance.now();
  await Promise.all(
    bodies.map(async (chunks, i) => {
      const client = CLIENTS[i % CLIENTS.length];
      try {
        const res = await pool.request({
          method: 'POST',
          path: '/referrals',
          headers: {
            'content-type': 'application/json',
            'content-length': String(chunks.reduce((a, b) => a + b.length, 0)),
            authorization: `Bearer ${keyOf(client)}`,
            ...(mode === 'gzip' ? { 'content-encoding': 'gzip' } : {}),
          },
          body: Readable.from(chunks, { objectMode: false }),
        });
        const text = await res.body.text();
        statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1;
        if (res.statusCode === 202) accepted.push((JSON.parse(text) as { id: string }).id);
        else if (res.statusCode >= 400 && res.statusCode !== 503 && process.env.BENCH_VERBOSE) {
          process.stderr.write(`${res.statusCode}: ${text.slice(0, 300)}\n`);
        }
      } catch (err) {
        const k = `error ${(err as Error).message.slice(0, 40)}`;
        statuses[k] = (statuses[k] ?? 0) + 1;
      }
    })
  );
  const seconds = (performance.now() - t0) / 1000;
  const answeredPeak = mem.mark();
  // The accepted referrals are being delivered meanwhile (and go on being): SETTLE_SECONDS more of that count too.
  await new Promise((r) => setTimeout(r, SETTLE_SECONDS * 1000));
  const delivered = (await referralsByStatus(svc.url)).sent ?? 0;
  const healthz = await probe.stop();
  const m = mem.stop();
  await pool.close();
  return {
    mode,
    idleRss,
    peakAboveIdle: m.hwm - idleRss,
    peakAboveIdleAnswered: answeredPeak - idleRss,
    budget: svc.budget,
    statuses,
    seconds,
    bodyBytes,
    wireBytes,
    healthz,
    delivered,
  };
}

// ---- report ----

const ms = (x: number): string => {
  if (!Number.isFinite(x)) return '-';
  return x >= 100 ? x.toFixed(0) : x.toFixed(1);
};
const mb = (x: number): string => `${(x / MiB).toFixed(0)} MiB`;
const range = (xs: number[], f: (x: number) => string): string => {
  const lo = Math.min(...xs);
  const hi = Math.max(...xs);
  return lo === hi || xs.length === 1 ? f(lo) : `${f(lo)}–${f(hi)}`;
};
const statusText = (s: Record<string, number>): string =>
  Object.entries(s)
    .map(([k, v]) => `${k}: ${v}`)
    .join(', ');

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'rg-abuse-'));
  if (!existsSync('/proc/self/status')) throw new Error('bench/abuse reads /proc/<pid>/status: Linux only');
  const started = Date.now();
  const parts = ARGS.only.has('plain') || ARGS.only.has('gzip') ? await uploadBodies() : undefined;
  const idle: Latencies[] = [];
  const idleRss: number[] = [];
  const floods: FloodResult[] = [];
  const ups: UploadResult[] = [];
  process.stdout.write(
    `bench/abuse: ${ARGS.runs} run(s), Node ${process.version}, ${new Date().toISOString().slice(0, 10)}, destination: ${ARGS.floodCentre} sandbox for the flood, ${ARGS.uploadCentre} sandbox for uploads, GLIBC_TUNABLES=${ARGS.env.GLIBC_TUNABLES ?? process.env.GLIBC_TUNABLES ?? GLIBC_TUNABLES_RECOMMENDED}` +
      `${ARGS.nodeArgs.length ? `, service node args: ${ARGS.nodeArgs.join(' ')}` : ''}${Object.keys(ARGS.env).length ? `, env: ${JSON.stringify(ARGS.env)}` : ''}\n`
  );
  try {
    for (let run = 1; run <= ARGS.runs; run++) {
      if (ARGS.only.has('idle') || ARGS.only.has('flood')) {
        const svc = await startService(dir, ARGS.floodCentre);
        try {
          await new Promise((r) => setTimeout(r, 500));
          const i = await idleHealthz(svc.url);
          idle.push(i);
          idleRss.push(procStatus(svc.pid).rss);
          process.stdout.write(
            `run ${run} idle: healthz p50 ${ms(i.p50)} p95 ${ms(i.p95)} p99 ${ms(i.p99)} max ${ms(i.max)} ms; RSS ${mb(idleRss[idleRss.length - 1])}\n`
          );
          if (ARGS.only.has('flood')) {
            const f = await flood(svc.url);
            floods.push(f);
            process.stdout.write(
              `run ${run} flood: healthz p50 ${ms(f.healthz.p50)} p95 ${ms(f.healthz.p95)} p99 ${ms(f.healthz.p99)} max ${ms(f.healthz.max)} ms (${f.healthz.n} probes, ${f.healthz.failed} failed); ${f.perSecond.toFixed(0)} submissions/s; ${statusText(f.statuses)}; at the end: ${statusText(f.byStatus)}\n`
            );
          }
        } finally {
          await svc.stop();
        }
      }
      for (const mode of ['plain', 'gzip'] as const) {
        if (!ARGS.only.has(mode) || !parts) continue;
        const svc = await startService(dir, ARGS.uploadCentre);
        try {
          await new Promise((r) => setTimeout(r, 1000));
          const u = await uploads(svc, mode, parts);
          ups.push(u);
          process.stdout.write(
            `run ${run} ${mode}: ${UPLOADS} x ${mb(u.bodyBytes)} (${mb(u.wireBytes)} on the wire) in ${u.seconds.toFixed(1)} s; ${statusText(u.statuses)}; delivered ${u.delivered}; ` +
              `RSS idle ${mb(u.idleRss)}, peak +${mb(u.peakAboveIdle)} (until answered +${mb(u.peakAboveIdleAnswered)}) = ${(u.peakAboveIdle / u.budget).toFixed(2)} x budget ${mb(u.budget)}; ` +
              `healthz p95 ${ms(u.healthz.p95)} max ${ms(u.healthz.max)} ms\n`
          );
        } finally {
          await svc.stop();
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  // Summary: min–max over the runs, ratios against idle measured in the same run.
  process.stdout.write(`\nsummary over ${ARGS.runs} run(s) (min–max), ${((Date.now() - started) / 1000).toFixed(0)} s in all\n`);
  if (idle.length) {
    process.stdout.write(
      `  idle   /healthz p50 ${range(
        idle.map((i) => i.p50),
        ms
      )}  p95 ${range(
        idle.map((i) => i.p95),
        ms
      )}  p99 ${range(
        idle.map((i) => i.p99),
        ms
      )}  max ${range(
        idle.map((i) => i.max),
        ms
      )} ms; RSS ${range(idleRss, mb)}\n`
    );
  }
  if (floods.length) {
    const h = floods.map((f) => f.healthz);
    process.stdout.write(
      `  flood  /healthz p50 ${range(
        h.map((i) => i.p50),
        ms
      )}  p95 ${range(
        h.map((i) => i.p95),
        ms
      )}  p99 ${range(
        h.map((i) => i.p99),
        ms
      )}  max ${range(
        h.map((i) => i.max),
        ms
      )} ms` +
        ` (target p95 < 100 ms); ${range(
          floods.map((f) => f.perSecond),
          (x) => x.toFixed(0)
        )} submissions/s with ${SUBMITTERS} submitters\n`
    );
    if (idle.length === floods.length) {
      process.stdout.write(
        `         p95 flood / p95 idle: ${range(
          floods.map((f, i) => f.healthz.p95 / idle[i].p95),
          (x) => `${x.toFixed(0)}×`
        )}\n`
      );
    }
  }
  for (const mode of ['plain', 'gzip'] as const) {
    const u = ups.filter((x) => x.mode === mode);
    if (!u.length) continue;
    process.stdout.write(
      `  ${mode.padEnd(6)} ${UPLOADS} x ${mb(u[0].bodyBytes)}: peak RSS above idle ${range(
        u.map((x) => x.peakAboveIdle),
        mb
      )} = ${range(
        u.map((x) => x.peakAboveIdle / x.budget),
        (x) => x.toFixed(2)
      )} × budget (${mb(u[0].budget)}; target ≤ 1.5)` +
        `; until answered ${range(
          u.map((x) => x.peakAboveIdleAnswered / x.budget),
          (x) => x.toFixed(2)
        )} ×; healthz p95 ${range(
          u.map((x) => x.healthz.p95),
          ms
        )} ms; ${u.map((x) => statusText(x.statuses)).join(' | ')}\n`
    );
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench/abuse failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
);
