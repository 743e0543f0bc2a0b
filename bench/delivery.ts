/**
 * bench/delivery: delivery throughput of the gateway against posting the same transaction bundles straight to
 * the FHIR server, and the gateway's peak memory while it delivers one 20 MB document.
 *
 *   npx tsx bench/delivery.ts                   # 500 referrals, concurrency 4 (the gateway's default)
 *   N=1000 CONCURRENCY=8 npx tsx bench/delivery.ts
 *
 * Every process is separate, as in production: the sandbox FHIR server (src/cli/sandbox.ts, fresh for each
 * phase) and the gateway (src/index.ts, SQLite in a temp dir). Referrals carry no callbackUrl (no webhook
 * leaves the machine). Phases:
 *  1. gateway delivery: N referrals (two small documents each) are queued in the gateway's database first
 *     (ReferralService.submit, the code behind POST /referrals), then the gateway is started; throughput is
 *     given steady (first to last referral marked sent, from the gateway's history) and including start-up
 *     (from /healthz answering to the last one sent);
 *  2. direct: the same referrals mapped to the same transaction Bundles (mapReferralToBundle, not timed) and
 *     POSTed with fetch at the same concurrency, each answer read and parsed; same two figures;
 *  3. end to end (for reference): the N referrals POSTed to the gateway's API while it delivers;
 *  4. memory: one referral with a 20 MB document (a Binary in the transaction, the destination's maxInlineBytes
 *     being 1 MB), queued before the gateway starts and due 4 s later; idle RSS is read from /proc before it is
 *     due, the peak is the process's high-water mark (VmHWM) once it is sent. The sandbox validates, as in the
 *     other phases (its default): it validates a Binary with its data stubbed (src/sandbox/engine.ts), so
 *     a Binary over the 1 MB that @medplum/core's validator allows a base64Binary is accepted.
 *
 * Phases 1 and 2 also give the CPU time (user + system, from /proc) each process used per referral: in phase 1
 * the gateway's and the sandbox's from /healthz answering to the last delivery, in phase 2 this process's (fetch,
 * JSON) and the sandbox's over the posting. The machine's cores are shared by all of them.
 *
 * BENCH_CPU_PROF=<dir> writes a CPU profile of the gateway; PHASES=gateway,direct,e2e,memory picks phases;
 * ROUNDS=5 (default) pairs of gateway and direct runs, alternating which goes first, and their median ratio;
 * WARMUP=200 (default) referrals delivered by each side before its clock starts (WARMUP=0: cold processes).
 */
import { jsonFormat } from '../src/intake';
import { type ChildProcess, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, spawnTs as spawnChild, startSandboxProcess, waitForHealth } from '../test/helpers/processes';
import { DatabaseSync } from 'node:sqlite';
import type { Bundle } from '@medplum/fhirtypes';
import { loadConfig } from '../src/config/config';
import type { Destination } from '../src/config/destinations';
import { mapReferralToBundle } from '../src/mapping/bundle';
import { referralSchema } from '../src/model';
import { ReferralService } from '../src/referral/service';
import { openDb } from '../src/store/db';
import { newReferralId, nowIso } from '../src/store/ids';
import { migrate } from '../src/store/migrations';
import { setLogLevel } from '../src/observability/logger';

const N = Number(process.env.N ?? 500);
const CONCURRENCY = Number(process.env.CONCURRENCY ?? 4);
/** Referrals each side delivers before the clock starts (JIT warm-up of the gateway, the sandbox and fetch). */
const WARMUP = Math.max(0, Number(process.env.WARMUP ?? 200));
/** Pairs of gateway and direct runs (ROUNDS=1 for a quick look). */
const ROUNDS = Math.max(1, Number(process.env.ROUNDS ?? 5));
const DOC_MB = Number(process.env.DOC_MB ?? 20);
/** Comma-separated subset of gateway,direct,e2e,memory. */
const PHASES = new Set((process.env.PHASES ?? 'gateway,direct,e2e,memory').split(','));
const CLIENT = 'bench';
const KEY = 'bench-key-0001';
const fixture = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, any>;

function referral(i: number, label: string): Record<string, any> {
  // The fixture carries two small documents. No callbackUrl: no status webhook may leave this machine.
  const { callbackUrl: _none, ...body } = structuredClone(fixture);
  return { ...body, externalId: `BENCH-${label}-${i}` };
}

interface Child {
  child: ChildProcess;
  url: string;
  stop(): Promise<void>;
}

function spawnTs(script: string, env: Record<string, string>): ChildProcess {
  // BENCH_CPU_PROF=<dir> writes a V8 CPU profile of the gateway (src/index.ts) to that directory.
  const prof = process.env.BENCH_CPU_PROF && script === 'src/index.ts' ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [];
  return spawnChild(script, env, prof);
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await once(child, 'exit');
  clearTimeout(timer);
}

/**
 * The standalone sandbox FHIR server (src/cli/sandbox.ts, validation on) in its own process; resolves with its
 * base URL when it is listening.
 */
async function startSandbox(): Promise<Child> {
  const { child, url } = await startSandboxProcess();
  child.stdout?.resume();
  return { child, url, stop: () => stopChild(child) };
}

function gatewayEnv(dbFile: string, fhirBase: string, port: number, dir: string): Record<string, string> {
  return {
    NODE_ENV: 'development',
    PORT: String(port),
    HOST: '127.0.0.1',
    DATABASE_URL: `sqlite:${dbFile}`,
    DESTINATIONS_FILE: join(dir, 'none.json'),
    FHIR_BASE_URL: fhirBase,
    API_KEYS: `${CLIENT}:${KEY}`,
    LOG_LEVEL: 'warn',
    DELIVERY_CONCURRENCY: String(CONCURRENCY),
    DELIVERY_BASE_DELAY_MS: '100',
    POLL_CRON: '0 0 1 1 *', // no Task polling during the benchmark
  };
}

/** Starts the gateway (src/index.ts) and resolves once /healthz answers. */
async function startGateway(env: Record<string, string>): Promise<Child> {
  const child = spawnTs('src/index.ts', env);
  child.stdout?.resume();
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const url = `http://127.0.0.1:${env.PORT}`;
  await waitForHealth(child, url, 30_000, () => stderr);
  return { child, url, stop: () => stopChild(child) };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Queues referrals in a gateway database the way POST /referrals does, before the gateway runs. */
async function queueReferrals(dbFile: string, fhirBase: string, bodies: Record<string, any>[], maxInlineBytes = 1_048_576): Promise<void> {
  const db = openDb(`sqlite:${dbFile}`);
  await migrate(db.kysely);
  const destination = defaultDestination(fhirBase, maxInlineBytes);
  const service = new ReferralService(db, { ids: () => ['default'], get: (id) => (id === 'default' ? destination : undefined) });
  for (const body of bodies) {
    const r = await service.submit(CLIENT, jsonFormat.submission(body, {}));
    if (!r.created) throw new Error('referral not created');
  }
  await db.close();
}

/** The destination src/config/config.ts builds from FHIR_BASE_URL (as the gateway child does), with its inline limit. */
function defaultDestination(baseUrl: string, maxInlineBytes = 1_048_576): Destination {
  const [destination] = loadConfig({ FHIR_BASE_URL: baseUrl, DESTINATIONS_FILE: join(tmpdir(), 'rg-bench-no-destinations', 'destinations.json') }).destinations;
  return { ...destination, maxInlineBytes };
}

function sentCount(db: DatabaseSync): number {
  return Number((db.prepare(`select count(*) as n from referrals where status = 'sent'`).get() as { n: number }).n);
}

/** Resolves (with the time it saw them) once n referrals are sent, looking every `pollMs`. */
async function waitAllSent(dbFile: string, n: number, timeoutMs: number, pollMs = 10): Promise<number> {
  const db = new DatabaseSync(dbFile, { readOnly: true });
  try {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (sentCount(db) >= n) return performance.now();
      if (Date.now() > deadline) throw new Error(`only ${sentCount(db)} of ${n} referrals sent`);
      await sleep(pollMs);
    }
  } finally {
    db.close();
  }
}

async function pool<T>(items: T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < items.length) {
        const item = items[next++];
        await fn(item);
      }
    })
  );
}

async function countAtCentre(fhirBase: string, type: string): Promise<number> {
  const b = (await (await fetch(`${fhirBase}/${type}?_count=0`)).json()) as Bundle;
  return b.total ?? -1;
}

// ------------------------------------------------------------------------------------------------

interface Rate {
  /** N / (time from start to the last referral delivered). */
  wall: number;
  /** (N - 1) / (time from the first to the last referral delivered): steady state, start-up excluded. */
  steady: number;
  /** CPU time (user + system) per referral of each process taking part, in ms, from start to the last delivery. */
  cpu?: Record<string, number>;
}

const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** CPU time (user + system) a process has used so far, in ms (Linux /proc; NaN elsewhere). */
function cpuMs(pid: number | undefined): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}

function rates(n: number, start: number, done: number[]): Rate {
  const sorted = [...done].sort((a, b) => a - b);
  return { wall: n / ((sorted[sorted.length - 1] - start) / 1000), steady: (n - 1) / ((sorted[sorted.length - 1] - sorted[0]) / 1000) };
}

let gatewayRuns = 0;

async function phaseGateway(dir: string): Promise<Rate> {
  const sandbox = await startSandbox();
  const dbFile = join(dir, `gateway-${++gatewayRuns}.db`);
  try {
    await queueReferrals(
      dbFile,
      sandbox.url,
      Array.from({ length: WARMUP + N }, (_, i) => referral(i, 'gw'))
    );
    const port = await freePort();
    const gw = await startGateway(gatewayEnv(dbFile, sandbox.url, port, dir));
    // The first WARMUP deliveries warm both processes up (as a long-running service is); the clock starts after them.
    if (WARMUP > 0) await waitAllSent(dbFile, WARMUP, 300_000, 5);
    const t0 = Date.now();
    const cpu0 = { gateway: cpuMs(gw.child.pid), sandbox: cpuMs(sandbox.child.pid), bench: process.cpuUsage() };
    try {
      // The rates come from the gateway's own history, so look seldom: this process shares the cores.
      await waitAllSent(dbFile, WARMUP + N, 300_000, 100);
      const own = process.cpuUsage(cpu0.bench);
      const cpu = {
        gateway: (cpuMs(gw.child.pid) - cpu0.gateway) / N,
        sandbox: (cpuMs(sandbox.child.pid) - cpu0.sandbox) / N,
        'this process (polls the database)': (own.user + own.system) / 1000 / N,
      };
      const tasks = await countAtCentre(sandbox.url, 'Task');
      if (tasks !== WARMUP + N) throw new Error(`the centre holds ${tasks} Tasks for ${WARMUP + N} referrals`);
      // When each referral became sent, as the gateway recorded it (the warm-up ones left out).
      const db = new DatabaseSync(dbFile, { readOnly: true });
      const rows = db.prepare(`select at from referral_history where status = 'sent' order by at`).all() as Array<{ at: string }>;
      db.close();
      return {
        ...rates(
          N,
          t0,
          rows.slice(WARMUP).map((r) => Date.parse(r.at))
        ),
        cpu,
      };
    } finally {
      await gw.stop();
    }
  } finally {
    await sandbox.stop();
  }
}

async function phaseDirect(): Promise<Rate> {
  const sandbox = await startSandbox();
  try {
    const destination = defaultDestination(sandbox.url);
    const createdAt = nowIso();
    const bundles = Array.from({ length: WARMUP + N }, (_, i) =>
      mapReferralToBundle({
        referralId: newReferralId(),
        clientId: CLIENT,
        referral: { ...referralSchema.parse(referral(i, 'direct')), destination: 'default' },
        destination,
        createdAt,
      })
    );
    const post = async (bundle: Bundle): Promise<void> => {
      const res = await fetch(sandbox.url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/fhir+json', Accept: 'application/fhir+json' },
        body: JSON.stringify(bundle),
      });
      const answer = (await res.json()) as Bundle;
      if (!res.ok || answer.type !== 'transaction-response') throw new Error(`direct post: HTTP ${res.status}`);
    };
    // The same warm-up as the gateway's, untimed.
    await pool(bundles.slice(0, WARMUP), CONCURRENCY, post);
    const t0 = Date.now();
    const cpu0 = { bench: process.cpuUsage(), sandbox: cpuMs(sandbox.child.pid) };
    const done: number[] = [];
    await pool(bundles.slice(WARMUP), CONCURRENCY, async (bundle) => {
      await post(bundle);
      done.push(Date.now());
    });
    const own = process.cpuUsage(cpu0.bench);
    const cpu = { 'this process (fetch)': (own.user + own.system) / 1000 / N, sandbox: (cpuMs(sandbox.child.pid) - cpu0.sandbox) / N };
    const tasks = await countAtCentre(sandbox.url, 'Task');
    if (tasks !== WARMUP + N) throw new Error(`the centre holds ${tasks} Tasks for ${WARMUP + N} referrals`);
    return { ...rates(N, t0, done), cpu };
  } finally {
    await sandbox.stop();
  }
}

async function phaseEndToEnd(dir: string): Promise<number> {
  const sandbox = await startSandbox();
  const dbFile = join(dir, 'e2e.db');
  try {
    const port = await freePort();
    const gw = await startGateway(gatewayEnv(dbFile, sandbox.url, port, dir));
    try {
      const bodies = Array.from({ length: N }, (_, i) => JSON.stringify(referral(i, 'e2e')));
      const t0 = performance.now();
      await pool(bodies, CONCURRENCY, async (body) => {
        const res = await fetch(`${gw.url}/referrals`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
          body,
        });
        await res.arrayBuffer();
        if (res.status !== 202) throw new Error(`POST /referrals: HTTP ${res.status}`);
      });
      const t1 = await waitAllSent(dbFile, N, 300_000);
      return N / ((t1 - t0) / 1000);
    } finally {
      await gw.stop();
    }
  } finally {
    await sandbox.stop();
  }
}

function procStatus(pid: number): { rss: number; hwm: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

async function phaseMemory(dir: string): Promise<{ docBytes: number; idle: number; peak: number; sampledPeak: number; binaries: number }> {
  const sandbox = await startSandbox();
  const dbFile = join(dir, 'memory.db');
  const docBytes = DOC_MB * 1024 * 1024;
  try {
    const body = referral(0, 'memory');
    body.documents = [
      {
        kind: 'pathology-report',
        title: 'Whole-slide pathology report',
        contentType: 'application/pdf',
        data: Buffer.alloc(docBytes, 0x25).toString('base64'),
      },
    ];
    await queueReferrals(dbFile, sandbox.url, [body]);
    // Due in 4 s: time for the gateway to start and settle, and for its idle RSS to be read.
    const db = new DatabaseSync(dbFile);
    db.prepare('update outbox set next_attempt_at = ?').run(new Date(Date.now() + 4_000).toISOString());
    db.close();
    const port = await freePort();
    const gw = await startGateway(gatewayEnv(dbFile, sandbox.url, port, dir));
    try {
      const pid = gw.child.pid as number;
      await sleep(2_500);
      const idle = procStatus(pid).rss;
      let sampledPeak = idle;
      const sampler = setInterval(() => {
        sampledPeak = Math.max(sampledPeak, procStatus(pid).rss);
      }, 5);
      await waitAllSent(dbFile, 1, 60_000);
      clearInterval(sampler);
      const { hwm } = procStatus(pid);
      const binaries = await countAtCentre(sandbox.url, 'Binary').catch(() => -1);
      return { docBytes, idle, peak: hwm, sampledPeak, binaries };
    } finally {
      await gw.stop();
    }
  } finally {
    await sandbox.stop();
  }
}

async function main(): Promise<void> {
  setLogLevel('warn');
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-delivery-'));
  const mb = (b: number): string => `${(b / 1024 / 1024).toFixed(1)} MB`;
  try {
    process.stdout.write(
      `bench/delivery: ${N} referrals (2 small documents each), concurrency ${CONCURRENCY}, after ${WARMUP} untimed warm-up referrals per side, Node ${process.version}\n`
    );
    let direct: Rate | undefined;
    const fmt = (r: Rate | undefined): string => {
      if (!r) return 'not run';
      const cpu = Object.entries(r.cpu ?? {})
        .map(([who, ms]) => `${who} ${ms.toFixed(2)}`)
        .join(', ');
      return `${r.steady.toFixed(1).padStart(6)} referrals/s steady, ${r.wall.toFixed(1).padStart(6)} incl. start-up${cpu ? `\n      CPU ms per referral: ${cpu}` : ''}`;
    };
    if (PHASES.has('gateway') || PHASES.has('direct')) {
      // Two cores shared by three processes make one pair of runs noisy (ratios from 0.74 to 0.91 were seen):
      // ROUNDS pairs, alternating which goes first, and the median ratio.
      const ratios: number[] = [];
      for (let round = 1; round <= ROUNDS; round++) {
        if (ROUNDS > 1) process.stdout.write(`  round ${round} of ${ROUNDS}\n`);
        let gateway: Rate | undefined;
        const runGateway = async (): Promise<void> => {
          gateway = PHASES.has('gateway') ? await phaseGateway(dir) : undefined;
          process.stdout.write(`  gateway (child) -> sandbox (child), queued first: ${fmt(gateway)}\n`);
        };
        const runDirect = async (): Promise<void> => {
          direct = PHASES.has('direct') ? await phaseDirect() : undefined;
          process.stdout.write(`  fetch straight to the sandbox, same bundles:      ${fmt(direct)}\n`);
        };
        if (round % 2 === 1) {
          await runGateway();
          await runDirect();
        } else {
          await runDirect();
          await runGateway();
        }
        const g = gateway as Rate | undefined;
        if (g && direct) {
          ratios.push(g.steady / direct.steady);
          process.stdout.write(
            `  ratio gateway/direct: ${(g.steady / direct.steady).toFixed(2)} steady, ${(g.wall / direct.wall).toFixed(2)} incl. start-up (target >= 0.8)\n`
          );
        }
      }
      if (ratios.length > 1) {
        const sorted = [...ratios].sort((a, b) => a - b);
        const median = sorted[Math.floor(sorted.length / 2)];
        process.stdout.write(
          `  median ratio over ${ratios.length} rounds: ${median.toFixed(2)} (range ${sorted[0].toFixed(2)}-${sorted[sorted.length - 1].toFixed(2)}; target >= 0.8)\n`
        );
      }
    }
    if (PHASES.has('e2e')) {
      const e2e = await phaseEndToEnd(dir);
      const share = direct ? ` (${(e2e / direct.wall).toFixed(2)} of direct)` : '';
      process.stdout.write(`  end to end (POST /referrals while delivering):     ${e2e.toFixed(1).padStart(6)} referrals/s${share}\n`);
    }
    if (!PHASES.has('memory')) return;
    const m = await phaseMemory(dir);
    const above = m.peak - m.idle;
    process.stdout.write(
      `memory, one ${mb(m.docBytes)} document (Binary in the transaction; ${m.binaries} Binary at the centre):\n` +
        `  idle RSS ${mb(m.idle)}, peak RSS (VmHWM) ${mb(m.peak)}, sampled peak ${mb(m.sampledPeak)}\n` +
        `  peak above idle: ${mb(above)} = ${(above / m.docBytes).toFixed(2)} x the document (target < 4)\n`
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  process.stderr.write(`bench/delivery failed: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
