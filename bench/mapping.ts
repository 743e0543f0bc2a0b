/**
 * bench/mapping: how many referrals per second one core turns into a validated FHIR transaction
 * Bundle (the intake check: JSON.parse -> schema -> codes -> routing -> mapReferralToBundle ->
 * validateBundle, i.e. checkReferral from src/referral/check.ts), next to a baseline of
 * JSON.parse + JSON.stringify of the same payloads measured in the same run, with the ratio; the
 * stages on their own; and the cold start-up cost (time, RSS, heap) of loading the FHIR R4
 * definitions, measured in fresh child processes.
 *
 *   npx tsx bench/mapping.ts              # 3 s per phase (after 1 s warm-up), 3 cold loads
 *   DURATION=10 COLD_RUNS=5 npx tsx bench/mapping.ts
 *   BENCH_CPU=1 npx tsx bench/mapping.ts  # pin to another CPU (default 0); BENCH_CPU=none: no pinning
 *
 * The measuring process is a child started with --expose-gc (GC between phases) and, when
 * `taskset` exists, pinned to one CPU, so V8's GC helper threads share that core too. All six
 * fixtures in fixtures/referrals are used in rotation, one per operation.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';

const SCRIPT = join(__dirname, 'mapping.ts');
const ROOT = join(__dirname, '..');
const FIXTURES = join(ROOT, 'fixtures/referrals');
const DURATION_S = Number(process.env.DURATION ?? 3);
const WARMUP_S = Number(process.env.WARMUP ?? 1);
const COLD_RUNS = Number(process.env.COLD_RUNS ?? 3);

const MiB = 1024 * 1024;
const gc = (): void => (globalThis as { gc?: () => void }).gc?.();

function payloads(): { name: string; raw: string }[] {
  return readdirSync(FIXTURES)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((name) => ({ name, raw: readFileSync(join(FIXTURES, name), 'utf8') }));
}

// ---------------------------------------------------------------------------------------------
// Child: one cold load of the FHIR definitions in a process that has not touched them.

interface ColdLoad {
  importMs: number;
  loadMs: number;
  loadedHere: boolean;
  /** heapUsed growth during the load (no GC forced), as reported by loadFhirDefinitions. */
  heapDuringLoad: number;
  /** heapUsed after a full GC, minus before the load (what stays). */
  heapRetained: number;
  /** RSS right after the load minus RSS before it. */
  rssDelta: number;
  /** RSS after a full GC minus RSS before the load. */
  rssRetained: number;
  /** Peak RSS of the whole process (getrusage maxrss). */
  rssPeak: number;
  /** First validateBundle after the load (cold code paths) and the median of the next 20. */
  firstValidateMs: number;
  steadyValidateMs: number;
}

async function coldLoad(): Promise<void> {
  gc();
  const t0 = performance.now();
  const { loadFhirDefinitions } = await import('../src/mapping/definitions');
  const { validateBundle } = await import('../src/mapping/validate');
  const { mapReferralToBundle } = await import('../src/mapping/bundle');
  const { referralSchema } = await import('../src/model');
  const { sandboxDestination } = await import('../src/sandbox');
  const importMs = performance.now() - t0;
  gc();
  const before = process.memoryUsage();

  const stats = loadFhirDefinitions();
  const after = process.memoryUsage();
  gc();
  const settled = process.memoryUsage();

  const destination = sandboxDestination('http://localhost:8080/sandbox/fhir/R4');
  const bundle = mapReferralToBundle({
    referralId: 'ref_bench',
    clientId: 'bench',
    referral: referralSchema.parse(JSON.parse(payloads()[0].raw)),
    destination,
    createdAt: '2026-01-01T00:00:00.000Z',
  });
  let t = performance.now();
  if (validateBundle(bundle).length > 0) throw new Error('fixture bundle does not validate');
  const firstValidateMs = performance.now() - t;
  const steady: number[] = [];
  for (let i = 0; i < 20; i++) {
    t = performance.now();
    validateBundle(bundle);
    steady.push(performance.now() - t);
  }

  const out: ColdLoad = {
    importMs,
    loadMs: stats.ms,
    loadedHere: stats.loadedHere,
    heapDuringLoad: stats.heapBytes,
    heapRetained: settled.heapUsed - before.heapUsed,
    rssDelta: after.rss - before.rss,
    rssRetained: settled.rss - before.rss,
    rssPeak: process.resourceUsage().maxRSS * 1024,
    firstValidateMs,
    steadyValidateMs: median(steady),
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

// ---------------------------------------------------------------------------------------------
// Child: throughput phases.

interface Phase {
  name: string;
  ops: number;
  seconds: number;
  p50us: number;
  p99us: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

let sink = 0;

/** Runs fn(i) for i = 0, 1, 2, ... for WARMUP_S, then measures DURATION_S (every call timed; percentiles over the first 2M calls). */
function phase(name: string, fn: (i: number) => number): Phase {
  gc();
  let i = 0;
  const warmEnd = performance.now() + WARMUP_S * 1000;
  while (performance.now() < warmEnd) sink += fn(i++);
  gc();
  const samples = new Float64Array(2_000_000);
  let n = 0;
  const start = performance.now();
  const end = start + DURATION_S * 1000;
  let now = start;
  while (now < end) {
    sink += fn(i++);
    const t = performance.now();
    if (n < samples.length) samples[n] = t - now;
    n++;
    now = t;
  }
  const seconds = (now - start) / 1000;
  const sorted = samples.subarray(0, Math.min(n, samples.length)).sort();
  const pct = (p: number): number => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] * 1000;
  return { name, ops: n, seconds, p50us: pct(0.5), p99us: pct(0.99) };
}

async function throughput(): Promise<void> {
  const { loadFhirDefinitions } = await import('../src/mapping/definitions');
  const { referralSchema } = await import('../src/model');
  const { checkCodes } = await import('../src/mapping/codes');
  const { routeReferral } = await import('../src/mapping/routing');
  const { mapReferralToBundle } = await import('../src/mapping/bundle');
  const { validateBundle } = await import('../src/mapping/validate');
  const { checkReferral, destinationDirectory } = await import('../src/referral/check');
  const { sandboxDestination } = await import('../src/sandbox');

  loadFhirDefinitions();
  const files = payloads();
  const raws = files.map((f) => f.raw);
  const k = raws.length;
  const destination = sandboxDestination('http://localhost:8080/sandbox/fhir/R4');
  const directory = destinationDirectory([destination]);
  const createdAt = '2026-01-01T00:00:00.000Z';
  const referrals = raws.map((r) => referralSchema.parse(JSON.parse(r)));
  const bundles = referrals.map((referral) => mapReferralToBundle({ referralId: 'ref_bench', clientId: 'bench', referral, destination, createdAt }));
  for (const [i, b] of bundles.entries()) {
    const issues = validateBundle(b);
    if (issues.length > 0) throw new Error(`${files[i].name} does not validate: ${JSON.stringify(issues[0])}`);
  }

  const phases: Phase[] = [];
  phases.push(phase('baseline: JSON.parse + JSON.stringify', (i) => JSON.stringify(JSON.parse(raws[i % k])).length));
  phases.push(
    phase('full intake check (parse, schema, codes, route, map, validate)', (i) => {
      const r = checkReferral(JSON.parse(raws[i % k]), directory, { referralId: 'ref_bench', clientId: 'bench', createdAt });
      if (!r.ok) throw new Error(`${files[i % k].name}: ${r.issues[0].message}`);
      return r.bundle.entry?.length ?? 0;
    })
  );
  phases.push(
    phase('  schema + codes + routing only', (i) => {
      const referral = referralSchema.parse(JSON.parse(raws[i % k]));
      return checkCodes(referral).length + (routeReferral(referral, directory.ids())?.destination.length ?? 0);
    })
  );
  phases.push(
    phase(
      '  mapReferralToBundle only',
      (i) => mapReferralToBundle({ referralId: 'ref_bench', clientId: 'bench', referral: referrals[i % k], destination, createdAt }).entry?.length ?? 0
    )
  );
  phases.push(phase('  validateBundle only', (i) => validateBundle(bundles[i % k]).length + 1));

  const sizes = {
    payloadBytes: raws.reduce((a, r) => a + Buffer.byteLength(r), 0) / k,
    bundleBytes: bundles.reduce((a, b) => a + Buffer.byteLength(JSON.stringify(b)), 0) / k,
    entries: bundles.reduce((a, b) => a + (b.entry?.length ?? 0), 0) / k,
    fixtures: files.map((f) => f.name),
  };
  process.stdout.write(`${JSON.stringify({ phases, sizes, sink: sink > 0 })}\n`);
}

// ---------------------------------------------------------------------------------------------
// Parent: start the children, print the table.

function taskset(): string[] {
  const cpu = process.env.BENCH_CPU ?? '0';
  if (cpu === 'none') return [];
  const probe = spawnSync('taskset', ['-c', cpu, 'true']);
  return probe.status === 0 ? ['taskset', '-c', cpu] : [];
}

function runChild(mode: string, pin: string[]): string {
  const cmd = [...pin, process.execPath, '--expose-gc', '--import', 'tsx', SCRIPT, mode];
  const r = spawnSync(cmd[0], cmd.slice(1), { cwd: ROOT, encoding: 'utf8', maxBuffer: 64 * MiB, stdio: ['ignore', 'pipe', 'inherit'] });
  if (r.status !== 0) throw new Error(`${mode} child failed with exit ${r.status}`);
  const last = r.stdout.trim().split('\n').pop();
  if (!last) throw new Error(`${mode} child printed nothing`);
  return last;
}

const fmt = (n: number, digits = 0): string => n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
const mib = (b: number): string => `${fmt(b / MiB, 1)} MiB`;

function parent(): void {
  const pin = taskset();
  const where = pin.length ? `pinned to CPU ${pin[2]} (taskset)` : 'not pinned (taskset unavailable or BENCH_CPU=none)';
  process.stdout.write(`bench/mapping  Node ${process.version}, ${cpus()[0]?.model ?? 'unknown CPU'} (${cpus().length} CPUs), ${where}\n`);

  const colds: ColdLoad[] = [];
  for (let i = 0; i < COLD_RUNS; i++) colds.push(JSON.parse(runChild('--cold-load', pin)) as ColdLoad);
  const t = JSON.parse(runChild('--throughput', pin)) as {
    phases: Phase[];
    sizes: { payloadBytes: number; bundleBytes: number; entries: number; fixtures: string[] };
  };

  const { phases, sizes } = t;
  const base = phases[0].ops / phases[0].seconds;
  const full = phases[1].ops / phases[1].seconds;
  process.stdout.write(
    `\nThroughput on one core, ${DURATION_S} s per phase after ${WARMUP_S} s warm-up; ${sizes.fixtures.length} fixtures in rotation ` +
      `(payload ${fmt(sizes.payloadBytes)} B, bundle ${fmt(sizes.bundleBytes)} B and ${fmt(sizes.entries, 1)} entries on average)\n\n`
  );
  const head = `${'phase'.padEnd(64)} ${'ops/s'.padStart(10)} ${'p50 µs'.padStart(9)} ${'p99 µs'.padStart(9)} ${'vs baseline'.padStart(12)}`;
  process.stdout.write(`${head}\n${'-'.repeat(head.length)}\n`);
  for (const p of phases) {
    const rate = p.ops / p.seconds;
    process.stdout.write(
      `${p.name.padEnd(64)} ${fmt(rate).padStart(10)} ${fmt(p.p50us, 1).padStart(9)} ${fmt(p.p99us, 1).padStart(9)} ${`${fmt(rate / base, 4)}x`.padStart(12)}\n`
    );
  }
  process.stdout.write(
    `\nreferrals mapped and validated per second: ${fmt(full)} (${fmt(1e6 / full)} µs each); baseline ${fmt(base)}/s; ` +
      `ratio full/baseline ${fmt(full / base, 4)} (baseline is ${fmt(base / full, 0)}x faster)\n`
  );

  const med = (f: (c: ColdLoad) => number): number => median(colds.map(f));
  const range = (f: (c: ColdLoad) => number, show: (n: number) => string): string => {
    const xs = colds.map(f);
    return `${show(med(f)).padStart(11)}   (${show(Math.min(...xs))} .. ${show(Math.max(...xs))})`;
  };
  const ms = (n: number): string => `${fmt(n, 1)} ms`;
  process.stdout.write(`\nCold load of the FHIR R4 definitions, ${COLD_RUNS} fresh processes, median (min .. max)\n\n`);
  const rows: [string, string][] = [
    ['import @medplum/core + gateway modules', range((c) => c.importMs, ms)],
    ['loadFhirDefinitions() (read + index)', range((c) => c.loadMs, ms)],
    ['first validateBundle after load', range((c) => c.firstValidateMs, ms)],
    ['next 20 validateBundle calls, median', range((c) => c.steadyValidateMs, ms)],
    ['heap growth during load (no GC)', range((c) => c.heapDuringLoad, mib)],
    ['heap retained after GC', range((c) => c.heapRetained, mib)],
    ['RSS growth during load', range((c) => c.rssDelta, mib)],
    ['RSS retained after GC', range((c) => c.rssRetained, mib)],
    ['peak RSS of the process', range((c) => c.rssPeak, mib)],
  ];
  for (const [label, value] of rows) process.stdout.write(`${label.padEnd(42)} ${value}\n`);
  if (colds.some((c) => !c.loadedHere)) process.stdout.write('WARNING: a child found the definitions already loaded\n');
}

function run(mode: string | undefined): Promise<void> {
  switch (mode) {
    case '--cold-load':
      return coldLoad();
    case '--throughput':
      return throughput();
    default:
      return Promise.resolve(parent());
  }
}

const job = run(process.argv[2]);
job.catch((err: unknown) => {
  process.stderr.write(`bench/mapping failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});
