/**
 * bench/profiles: the referral loop on the sandbox in each server profile, next to the default sandbox in the
 * same run: requests the gateway makes per referral delivered and per poll cycle, and the time from submit to
 * `sent`.
 *
 *   npx tsx bench/profiles.ts                 # N=20 referrals per profile (1 in 4 with a 2 MB PDF), ROUNDS=3
 *   N=50 ROUNDS=5 npx tsx bench/profiles.ts
 *
 * Each round starts a fresh sandbox (startSandboxServer, in this process) and a fresh gateway (in-process,
 * SQLite in memory, the destination's profile as the row says), submits N referrals through the API with
 * DELIVERY_CONCURRENCY=4, waits until all are `sent`, then runs two poll cycles: one with nothing changed and
 * one after the centre accepted every Task. Requests are counted at the sandbox (every HTTP request that
 * reached it, the presigned storage server excepted). Figures: medians over the rounds, with min–max.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Bundle, Task } from '@medplum/fhirtypes';
import { loadConfig } from '../src/config/config';
import { startSandboxServer } from '../src/sandbox/server';
import { Gateway } from '../src/gateway';
import { setLogLevel } from '../src/observability/logger';
import { writeDestinationsFile } from '../test/helpers/destinations';
import { fixture } from '../test/helpers/gateway';
import { getReferral } from '../src/store';

const N = Math.max(1, Number(process.env.N ?? 20));
const ROUNDS = Math.max(1, Number(process.env.ROUNDS ?? 3));
const KEY = 'bench-key-000000000001';

const ROWS: Array<{ sandbox: string; traits?: string; destination: string; label: string }> = [
  { sandbox: 'default', destination: 'generic', label: 'default sandbox, generic' },
  { sandbox: 'medplum', destination: 'medplum', label: 'medplum sandbox, profile medplum' },
  { sandbox: 'medplum', traits: 'nonAtomic=false,strictIsolationMaxEntries=8', destination: 'medplum', label: 'medplum atomic project, profile medplum' },
  { sandbox: 'hapi', destination: 'hapi', label: 'hapi sandbox, profile hapi' },
  { sandbox: 'strict', destination: 'medplum', label: 'strict sandbox, profile medplum' },
];

interface Round {
  perReferral: number;
  pollIdle: number;
  pollChanged: number;
  msToSent: number[];
}

async function round(row: (typeof ROWS)[number]): Promise<Round> {
  const sandbox = await startSandboxServer(0, { profile: row.sandbox, traits: row.traits });
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-profiles-'));
  const file = writeDestinationsFile(dir, { baseUrl: sandbox.url, profile: row.destination });
  const config = loadConfig({
    NODE_ENV: 'test',
    PORT: '0',
    HOST: '127.0.0.1',
    DATABASE_URL: 'sqlite::memory:',
    DESTINATIONS_FILE: file,
    API_KEYS: `bench:${KEY}`,
    LOG_LEVEL: 'error',
    DELIVERY_CONCURRENCY: '4',
  });
  const gw = new Gateway(config, { startPoller: false, deliveryIdleMs: 20, webhookFetch: async () => new Response(null, { status: 204 }) });
  await gw.start();
  setLogLevel('error');
  try {
    const big = Buffer.alloc(2 * 1024 * 1024, 0x25).toString('base64');
    const before = sandbox.stats.requests;
    const submitted: Array<{ id: string; at: number }> = [];
    for (let i = 0; i < N; i++) {
      const body: Record<string, any> = { ...fixture(), externalId: `BENCH-${row.sandbox}-${i}-${Date.now()}` };
      delete (body as { callbackUrl?: string }).callbackUrl;
      if (i % 4 === 0) body.documents = [...body.documents, { kind: 'pathology-report', title: 'Slide scan', contentType: 'application/pdf', data: big }];
      const at = performance.now();
      const res = await fetch(`${gw.url}/referrals`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      if (res.status !== 202) throw new Error(`submit answered ${res.status}: ${await res.text()}`);
      submitted.push({ id: ((await res.json()) as { id: string }).id, at });
    }
    const msToSent: number[] = new Array(N);
    const pending = new Set(submitted.map((_, i) => i));
    const deadline = Date.now() + 120_000;
    while (pending.size > 0) {
      if (Date.now() > deadline) throw new Error(`${pending.size} referrals not sent within 120 s on ${row.label}`);
      for (const i of [...pending]) {
        const r = await getReferral(gw.db, submitted[i].id, { payload: false });
        if (r?.status === 'sent') {
          msToSent[i] = performance.now() - submitted[i].at;
          pending.delete(i);
        } else if (r?.status === 'delivery-failed') {
          throw new Error(`referral failed on ${row.label}: ${r.statusReason}`);
        }
      }
      await new Promise((res) => setTimeout(res, 10));
    }
    const perReferral = (sandbox.stats.requests - before) / N;

    const idleBefore = sandbox.stats.requests;
    await gw.poller.pollOnce();
    const pollIdle = sandbox.stats.requests - idleBefore;

    // The centre accepts every Task (not counted), then one poll cycle reads the changes.
    const tasks = (await (await fetch(`${sandbox.url}/Task?_count=1000`, { headers: { Accept: 'application/fhir+json' } })).json()) as Bundle<Task>;
    for (const e of tasks.entry ?? []) {
      const t = e.resource as Task;
      await fetch(`${sandbox.url}/Task/${t.id}`, {
        method: 'PUT',
        headers: { 'Content-Type': 'application/fhir+json' },
        body: JSON.stringify({ ...t, status: 'accepted' }),
      });
    }
    const changedBefore = sandbox.stats.requests;
    await gw.poller.pollOnce();
    const pollChanged = sandbox.stats.requests - changedBefore;
    return { perReferral, pollIdle, pollChanged, msToSent };
  } finally {
    await gw.stop();
    await sandbox.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const spread = (xs: number[], digits = 1): string => `${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)}`;

async function main(): Promise<void> {
  process.stdout.write(
    `bench/profiles: N=${N} referrals per round (1 in 4 with a 2 MB PDF), ${ROUNDS} rounds per profile, ${new Date().toISOString().slice(0, 10)}\n\n`
  );
  const results: Array<{ label: string; rounds: Round[] }> = [];
  for (const row of ROWS) {
    const rounds: Round[] = [];
    for (let r = 0; r < ROUNDS; r++) rounds.push(await round(row));
    results.push({ label: row.label, rounds });
  }
  const baseline = results[0];
  const baseReq = median(baseline.rounds.map((r) => r.perReferral));
  const baseMs = median(baseline.rounds.map((r) => median(r.msToSent)));
  const header = ['profile', 'requests/referral', 'vs default', 'poll (idle)', 'poll (N changed)', 'submit→sent p50 ms', 'p95 ms', 'vs default'];
  const lines = results.map(({ label, rounds }) => {
    const req = rounds.map((r) => r.perReferral);
    const p50 = rounds.map((r) => median(r.msToSent));
    const p95 = rounds.map((r) => [...r.msToSent].sort((a, b) => a - b)[Math.floor(0.95 * (r.msToSent.length - 1))]);
    return [
      label,
      `${median(req).toFixed(2)} (${spread(req, 2)})`,
      `${(median(req) / baseReq).toFixed(2)}×`,
      `${median(rounds.map((r) => r.pollIdle))}`,
      `${median(rounds.map((r) => r.pollChanged))}`,
      `${median(p50).toFixed(0)} (${spread(p50, 0)})`,
      `${median(p95).toFixed(0)}`,
      `${(median(p50) / baseMs).toFixed(2)}×`,
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i].length)));
  const fmt = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i])).join('  ');
  process.stdout.write(`${fmt(header)}\n${fmt(widths.map((w) => '-'.repeat(w)))}\n${lines.map(fmt).join('\n')}\n`);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench/profiles failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
);
