import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import type { Bundle, Resource, ServiceRequest, Task } from '@medplum/fhirtypes';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { fixture as sampleReferral } from '../helpers/gateway';
import { freePort, spawnTs, startSandboxProcess, waitForHealth } from '../helpers/processes';

/** The sample referral without its callbackUrl: no status webhook may leave this machine during the test. */
function fixture(): Record<string, any> {
  const { callbackUrl: _none, ...body } = sampleReferral();
  return body;
}

/**
 * Exactly-once delivery across crashes. The centre's FHIR server (the standalone sandbox) and the gateway
 * (src/index.ts on SQLite) run as separate processes; 200 referrals are submitted while the gateway is killed
 * with SIGKILL at random moments during delivery and restarted each time. In the end every referral is sent
 * and the centre holds exactly one ServiceRequest and one Task for each.
 */
const REFERRALS = 200;
const KILLS = 5;
const KEY = 'crash-test-key-0001';

jest.setTimeout(60_000);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('SIGKILL during delivery', () => {
  let dir: string;
  let sandbox: ChildProcess;
  let sandboxUrl: string;
  let gateway: ChildProcess | undefined;
  let gatewayUrl: string;
  let env: Record<string, string>;
  let log = '';

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'rg-crash-'));
    ({ child: sandbox, url: sandboxUrl } = await startSandboxProcess());
    const port = await freePort();
    gatewayUrl = `http://127.0.0.1:${port}`;
    env = {
      NODE_ENV: 'development',
      PORT: String(port),
      HOST: '127.0.0.1',
      DATABASE_URL: `sqlite:${join(dir, 'gateway.db')}`,
      DESTINATIONS_FILE: join(dir, 'none.json'),
      FHIR_BASE_URL: sandboxUrl,
      // Per-request timeout 1 s: an attempt's budget is 3 s and the outbox lease 6 s, so entries a killed
      // process held are taken over about 6 s later.
      FHIR_TIMEOUT_MS: '1000',
      API_KEYS: `crash:${KEY}`,
      LOG_LEVEL: 'info',
      DELIVERY_CONCURRENCY: '4',
      DELIVERY_BASE_DELAY_MS: '50',
      DELIVERY_MAX_DELAY_MS: '500',
      POLL_CRON: '0 0 1 1 *',
    };
  });

  afterAll(async () => {
    for (const child of [gateway, sandbox]) {
      if (child && child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await once(child, 'exit');
      }
    }
    rmSync(dir, { recursive: true, force: true });
  });

  async function startGateway(): Promise<void> {
    const child = spawnTs('src/index.ts', env);
    gateway = child;
    child.stdout?.on('data', (d: Buffer) => (log += d.toString()));
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitForHealth(child, gatewayUrl, 20_000, () => stderr);
  }

  async function kill(): Promise<void> {
    const child = gateway as ChildProcess;
    child.kill('SIGKILL');
    await once(child, 'exit');
  }

  function sentCount(): number {
    const db = new DatabaseSync(join(dir, 'gateway.db'), { readOnly: true, timeout: 2000 });
    try {
      return Number((db.prepare(`select count(*) as n from referrals where status = 'sent'`).get() as { n: number }).n);
    } finally {
      db.close();
    }
  }

  /** Submits one referral, again and again while the gateway is down: the same externalId is idempotent. */
  async function submit(i: number): Promise<string> {
    const body = JSON.stringify({ ...fixture(), externalId: `EHR-CRASH-${i}` });
    for (;;) {
      try {
        const res = await fetch(`${gatewayUrl}/referrals`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
          body,
        });
        if (res.status === 202 || res.status === 200) return ((await res.json()) as { id: string }).id;
      } catch {
        // killed in between: try again
      }
      await sleep(50);
    }
  }

  async function all<T extends Resource>(type: string): Promise<T[]> {
    const b = (await (await fetch(`${sandboxUrl}/${type}?_count=1000`)).json()) as Bundle<T>;
    return (b.entry ?? []).map((e) => e.resource as T);
  }

  test(`${REFERRALS} referrals, ${KILLS} SIGKILLs while delivering: all sent, one ServiceRequest and one Task each`, async () => {
    const started = Date.now();
    await startGateway();
    let next = 0;
    const ids: string[] = [];
    const submitting = Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < REFERRALS) {
          const i = next++;
          ids[i] = await submit(i);
        }
      })
    );

    const sentAtKill: number[] = [];
    for (let k = 0; k < KILLS; k++) {
      // Kill it mid-flight: once deliveries have passed the k-th step (plus a random few), whatever the speed
      // of the machine, so that every kill lands while referrals are still being delivered.
      const threshold = Math.floor(((k + 1) * REFERRALS) / (KILLS + 2)) + Math.floor(Math.random() * 10);
      const waitUntil = Date.now() + 20_000;
      while (sentCount() < threshold && Date.now() < waitUntil) await sleep(10);
      await sleep(Math.floor(Math.random() * 40));
      await kill();
      sentAtKill.push(sentCount());
      await startGateway();
    }
    await submitting;

    const deadline = Date.now() + 40_000;
    while (sentCount() < REFERRALS) {
      if (Date.now() > deadline) throw new Error(`only ${sentCount()} of ${REFERRALS} referrals sent`);
      await sleep(100);
    }
    // The kills landed while referrals were being delivered, not before or after.
    expect(sentAtKill.every((n) => n > 0 && n < REFERRALS)).toBe(true);

    const byReferral = (resources: Array<{ identifier?: Array<{ system?: string; value?: string }> }>): Map<string, number> => {
      const m = new Map<string, number>();
      for (const r of resources) {
        const v = r.identifier?.find((i) => i.system === REFERRAL_IDENTIFIER_SYSTEM)?.value as string;
        m.set(v, (m.get(v) ?? 0) + 1);
      }
      return m;
    };
    const tasks = byReferral(await all<Task>('Task'));
    const requests = byReferral(await all<ServiceRequest>('ServiceRequest'));
    expect(new Set(ids).size).toBe(REFERRALS);
    expect([...tasks.keys()].sort()).toEqual([...ids].sort());
    expect([...requests.keys()].sort()).toEqual([...ids].sort());
    expect([...tasks.values()].every((n) => n === 1)).toBe(true);
    expect([...requests.values()].every((n) => n === 1)).toBe(true);
    // Two documents per referral, each once.
    expect((await all('DocumentReference')).length).toBe(2 * REFERRALS);

    const recovered = (log.match(/read-before-retry/g) ?? []).length;
    process.stdout.write(
      `crash test: ${KILLS} kills at ${sentAtKill.join(', ')} sent; ${recovered} read-before-retry after an unknown outcome; ${Date.now() - started} ms\n`
    );
  });
});
