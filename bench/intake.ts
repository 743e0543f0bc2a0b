/**
 * bench/intake: POST /referrals throughput and p99 latency of the gateway (SQLite, delivery
 * running to a sandbox FHIR server in its own process) next to a bare Express route that parses the same JSON and
 * answers 202, measured in the same run. Each request carries a new externalId, so every one is a
 * real submission, not an idempotent replay.
 *
 *   npm run bench:intake                 # 10 s per target, 20 connections
 *   DURATION=30 CONNECTIONS=50 npm run bench:intake
 *   PAYLOAD=large npm run bench:intake   # only one of the two payloads (small | large)
 *
 * BENCH_CPU_PROF=<dir> writes a CPU profile of the gateway (src/index.ts) to that directory.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon from 'autocannon';
import { startScript, stopScripts } from './processes';
import { loadFhirDefinitions } from '../src/mapping/definitions';
import { mapReferralToBundle } from '../src/mapping/bundle';
import { checkCodes } from '../src/mapping/codes';
import { routeReferral } from '../src/mapping/routing';
import { validateBundle } from '../src/mapping/validate';
import { checkReferral, destinationDirectory } from '../src/referral/check';
import { sandboxDestination } from '../src/sandbox';
import { referralSchema } from '../src/model';
import { canonicalHash } from '../src/json';
import { openDb } from '../src/store/db';
import { migrate } from '../src/store/migrations';
import { insertReferral } from '../src/store';

const DURATION = Number(process.env.DURATION ?? 10);
const CONNECTIONS = Number(process.env.CONNECTIONS ?? 20);
const small = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, any>;
/** The same referral carrying a 1 MB pathology PDF, as real referrals do. */
const large = structuredClone(small);
large.documents[0].data = Buffer.alloc(1024 * 1024, 0x25).toString('base64');
let body: Record<string, unknown> = small;

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

/**
 * Where a submission's time goes, stage by stage, timed in this process on one core (no HTTP): the
 * work the gateway does per referral on top of what the bare route does (read and parse the body).
 */
async function stages(payload: Record<string, any>, dir: string): Promise<Array<[string, number]>> {
  loadFhirDefinitions();
  const db = openDb(`sqlite:${join(dir, `stages-${Date.now()}.db`)}`);
  await migrate(db.kysely);
  const directory = destinationDirectory([sandboxDestination('http://127.0.0.1:1/fhir/R4')]);
  const text = JSON.stringify(payload);
  const n = text.length > 100_000 ? 60 : 1500;
  const time = async (f: (i: number) => unknown): Promise<number> => {
    for (let i = 0; i < Math.ceil(n / 10); i++) await f(-1 - i); // warm-up
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) await f(i);
    return Number(process.hrtime.bigint() - t0) / 1000 / n;
  };
  const checked = checkReferral(payload, directory, { withDocumentData: false });
  if (!checked.ok) throw new Error('the bench referral does not pass the intake check');
  const parse = await time(() => JSON.parse(text));
  const hash = await time(() => canonicalHash(payload, async () => undefined));
  const schema = await time(() => referralSchema.safeParse(payload));
  const validate = await time(() => validateBundle(checked.bundle));
  const parsed = referralSchema.parse(payload);
  // As the intake check maps it: document bytes left out (they were checked as base64 by the schema).
  const placeholder = { ...parsed, documents: parsed.documents.map((d) => (d.data !== undefined ? { ...d, data: 'AAAA' } : d)) };
  const mapping = await time(() => {
    checkCodes(parsed);
    const route = routeReferral(parsed, directory.ids());
    return mapReferralToBundle({
      referralId: 'ref_bench',
      clientId: 'bench',
      referral: placeholder,
      destination: checked.destination,
      specialty: route?.specialty,
      createdAt: new Date().toISOString(),
    });
  });
  const write = await time((i) =>
    insertReferral(db, {
      id: `ref_stage_${i}`,
      clientId: 'bench',
      externalId: `STAGE-${i}`,
      idempotencyKey: null,
      requestHash: 'x',
      destination: 'sandbox',
      payload: checked.referral,
      at: new Date().toISOString(),
    })
  );
  await db.close();
  return [
    ['JSON.parse of the body (the bare route)', parse],
    ['idempotency hash (canonical SHA-256)', hash],
    ['schema (zod, incl. base64 check)', schema],
    ['codes, routing, FHIR mapping', mapping],
    ['FHIR R4 validation (@medplum/core)', validate],
    ['SQLite transaction (4 rows, synchronous=FULL)', write],
  ];
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-'));
  const start = (script: string, env: Record<string, string>, ready: RegExp) =>
    startScript(script, env, ready, script === 'src/index.ts' ? process.env.BENCH_CPU_PROF : undefined);
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
      FHIR_BASE_URL: process.env.BENCH_NO_DELIVERY ? 'http://127.0.0.1:9/fhir/R4' : `http://127.0.0.1:${centre.port}/fhir/R4`,
    },
    /listening on http:\/\/127\.0\.0\.1:(\d+)/
  );
  try {
    const row = (name: string, r: { rps: number; p99: number; total: number; non2xx: number }): string =>
      `  ${name.padEnd(34)} ${r.rps.toFixed(0).padStart(8)} req/s   p99 ${String(r.p99).padStart(5)} ms   ${r.total} requests, ${r.non2xx} non-2xx`;
    process.stdout.write(`\nPOST /referrals, ${CONNECTIONS} connections, ${DURATION} s each, Node ${process.version}\n`);
    const only = process.env.PAYLOAD; // 'small' or 'large' to run one of the two
    for (const [label, payload, key] of [
      ['3 KB referral (2 small documents)', small, 'small'],
      ['1.4 MB referral (1 MB PDF inline)', large, 'large'],
    ] as const) {
      if (only && only !== key) continue;
      body = payload;
      // Warm both up, then measure one after the other.
      await load(bare.port, 'warm-bare', 1);
      const b = await load(bare.port, 'bare');
      await load(gateway.port, 'warm-gw', 1);
      const g = await load(gateway.port, 'gw');
      process.stdout.write(`${label}\n${row('bare Express (parse JSON, 202)', b)}\n${row('referral-gateway (SQLite)', g)}\n`);
      process.stdout.write(`  ratio gateway/bare: ${(g.rps / b.rps).toFixed(2)} (target >= 0.5)\n`);
      const st = await stages(payload, dir);
      const extra = st.slice(1).reduce((a, [, us]) => a + us, 0);
      const bareUs = 1e6 / b.rps;
      process.stdout.write(`  per submission, in process on one core (microseconds):\n`);
      for (const [name, us] of st) process.stdout.write(`    ${name.padEnd(48)} ${us.toFixed(0).padStart(7)}\n`);
      process.stdout.write(
        `  the bare route costs ${bareUs.toFixed(0)} us a request; the gateway's own work adds ${extra.toFixed(0)} us, so its ratio cannot exceed ${(bareUs / (bareUs + extra)).toFixed(2)} on this machine\n`
      );
    }
  } finally {
    await stopScripts(bare, gateway, centre);
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.message}\n`);
  process.exit(1);
});
