/**
 * bench/intake: POST /referrals throughput and p99 latency of the gateway (SQLite, delivery
 * running to a sandbox FHIR server in its own process) next to a bare Express route that parses the same JSON and
 * answers 202, measured in the same run. Each request carries a new externalId, so every one is a
 * real submission, not an idempotent replay.
 *
 *   npm run bench:intake                 # 10 s per target, 20 connections
 *   DURATION=30 CONNECTIONS=50 npm run bench:intake
 *
 * BENCH_CPU_PROF=<dir> writes a CPU profile of the gateway (src/index.ts) to that directory.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon from 'autocannon';

const DURATION = Number(process.env.DURATION ?? 10);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 20);
const small = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, any>;
/** The same referral carrying a 1 MB pathology PDF, as real referrals do. */
const large = structuredClone(small);
large.documents[0].data = Buffer.alloc(1024 * 1024, 0x25).toString('base64');
let body: Record<string, unknown> = small;

function start(script: string, env: Record<string, string>, ready: RegExp): Promise<{ child: ChildProcess; port: number }> {
  return new Promise((resolve, reject) => {
    const prof = process.env.BENCH_CPU_PROF && script === 'src/index.ts' ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [];
    const child = spawn(process.execPath, [...prof, '--import', 'tsx', script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    let buf = '';
    child.stdout?.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = ready.exec(buf);
      if (m) resolve({ child, port: Number(m[1]) });
    });
    child.on('exit', (code) => reject(new Error(`${script} exited with ${code}`)));
  });
}

async function load(port: number, label: string, duration = DURATION): Promise<{ rps: number; p99: number; non2xx: number; total: number }> {
  let n = 0;
  const result = await autocannon({
    url: `http://127.0.0.1:${port}/referrals`,
    connections: CONNECTIONS,
    duration,
    requests: [
      {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: 'Bearer bench-key' },
        setupRequest: (req) => ({ ...req, body: JSON.stringify({ ...body, externalId: `BENCH-${label}-${process.pid}-${Date.now()}-${n++}` }) }),
      },
    ],
  });
  return { rps: result.requests.average, p99: result.latency.p99, non2xx: result.non2xx, total: result.requests.total };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-'));
  const bare = await start('bench/bare-server.ts', { PORT: '0' }, /"port":(\d+)/);
  // The centre's FHIR server runs in its own process, as it would in production.
  const centre = await start('src/cli/sandbox.ts', { PORT: '0', LOG_LEVEL: 'warn' }, /sandbox-listening.*127\.0\.0\.1:(\d+)/);
  const gateway = await start(
    'src/index.ts',
    {
      PORT: '0',
      HOST: '127.0.0.1',
      DATABASE_URL: `sqlite:${join(dir, 'bench.db')}`,
      API_KEYS: 'bench:bench-key',
      LOG_LEVEL: 'warn',
      DESTINATIONS_FILE: join(dir, 'none.json'),
      FHIR_BASE_URL: `http://127.0.0.1:${centre.port}/fhir/R4`,
    },
    /listening on http:\/\/127\.0\.0\.1:(\d+)/
  );
  try {
    const row = (name: string, r: { rps: number; p99: number; total: number; non2xx: number }): string =>
      `  ${name.padEnd(34)} ${r.rps.toFixed(0).padStart(8)} req/s   p99 ${String(r.p99).padStart(5)} ms   ${r.total} requests, ${r.non2xx} non-2xx`;
    process.stdout.write(`\nPOST /referrals, ${CONNECTIONS} connections, ${DURATION} s each, Node ${process.version}\n`);
    for (const [label, payload] of [
      ['3 KB referral (2 small documents)', small],
      ['1.4 MB referral (1 MB PDF inline)', large],
    ] as const) {
      body = payload;
      // Warm both up, then measure one after the other.
      await load(bare.port, 'warm-bare', 1);
      const b = await load(bare.port, 'bare');
      await load(gateway.port, 'warm-gw', 1);
      const g = await load(gateway.port, 'gw');
      process.stdout.write(`${label}\n${row('bare Express (parse JSON, 202)', b)}\n${row('referral-gateway (SQLite)', g)}\n`);
      process.stdout.write(`  ratio gateway/bare: ${(g.rps / b.rps).toFixed(2)} (target >= 0.5)\n`);
    }
  } finally {
    bare.child.kill('SIGTERM');
    gateway.child.kill('SIGTERM');
    centre.child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 500));
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.message}\n`);
  process.exit(1);
});
