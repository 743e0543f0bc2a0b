import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client, Pool } from 'undici';
import { fixture } from '../helpers/gateway';

/**
 * Issue 10, point 5: a liveness probe with a 500 ms timeout must not restart a healthy service because it is
 * busy taking referrals. The service runs as users run it (tsx src/index.ts, SQLite, the built-in sandbox as
 * the destination, delivering meanwhile); 32 clients submit the sample referral as fast as it answers while
 * /healthz is probed every 20 ms on a connection of its own. The requirement's own bound: p95 under 100 ms
 * (bench/abuse measures the same for longer; on main before the fix it was 0.2-0.5 s).
 */
const KEY = 'load-test-key-0123456789abcdef';
const SUBMITTERS = 32;
const SECONDS = 4;

describe('liveness under a submission flood', () => {
  let child: ChildProcess;
  let url: string;
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'rg-liveness-'));
    child = spawn(process.execPath, ['--import', 'tsx', 'src/index.ts'], {
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '',
        PORT: '0',
        HOST: '127.0.0.1',
        DATABASE_URL: `sqlite:${join(dir, 'gateway.db')}`,
        DESTINATIONS_FILE: join(dir, 'none.json'),
        API_KEYS: `load:${KEY}`,
        LOG_LEVEL: 'error',
        MAX_CONNECTIONS_PER_ADDRESS: '0', // the test is one address; real submitters are many
      },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    url = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(out);
        if (m) resolve(m[1]);
      });
      child.once('exit', (code) => reject(new Error(`the service exited with ${code}`)));
    });
    child.stdout?.resume();
  }, 60_000);
  afterAll(async () => {
    if (child.exitCode === null) {
      child.kill('SIGKILL');
      await once(child, 'exit');
    }
    rmSync(dir, { recursive: true, force: true });
  });

  test(`/healthz answers within 100 ms (p95) while ${SUBMITTERS} clients submit referrals`, async () => {
    const sample = fixture();
    delete sample.callbackUrl;
    const submit = (pool: Pool, externalId: string) =>
      pool.request({
        method: 'POST',
        path: '/referrals',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${KEY}` },
        body: JSON.stringify({ ...sample, externalId }),
      });
    const pool = new Pool(url, { connections: SUBMITTERS });
    // Warm-up: the first referral loads the FHIR definitions.
    const first = await submit(pool, 'LOAD-warm-up');
    await first.body.text();
    expect(first.statusCode).toBe(202);

    const statuses = new Map<number, number>();
    const probes: number[] = [];
    const end = Date.now() + SECONDS * 1000;
    const probe = new Client(url);
    const probing = (async () => {
      while (Date.now() < end) {
        const t0 = performance.now();
        const res = await probe.request({ method: 'GET', path: '/healthz' });
        await res.body.text();
        expect(res.statusCode).toBe(200);
        probes.push(performance.now() - t0);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    let n = 0;
    await Promise.all(
      Array.from({ length: SUBMITTERS }, async () => {
        while (Date.now() < end) {
          const res = await submit(pool, `LOAD-${n++}`);
          await res.body.text();
          statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
        }
      })
    );
    await probing;
    await probe.close();
    await pool.close();

    const sorted = [...probes].sort((a, b) => a - b);
    const p95 = sorted[Math.floor(0.95 * (sorted.length - 1))];
    process.stdout.write(
      `liveness: ${probes.length} probes, p50 ${sorted[Math.floor(sorted.length / 2)].toFixed(1)} ms, p95 ${p95.toFixed(1)} ms, max ${sorted[sorted.length - 1].toFixed(1)} ms; submissions ${JSON.stringify(Object.fromEntries(statuses))}\n`
    );
    // The flood was real: every submission accepted, many of them.
    expect([...statuses.keys()]).toEqual([202]);
    expect(statuses.get(202)).toBeGreaterThan(SUBMITTERS * 2);
    expect(p95).toBeLessThan(100);
  }, 60_000);
});
