import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Bundle, ServiceRequest, Task } from '@medplum/fhirtypes';
import { startSandboxServer } from '../../src/sandbox/server';
import type { Gateway } from '../../src/gateway';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { prng } from '../helpers/prng';
import { writeDestinationsFile } from '../helpers/destinations';

/**
 * The whole loop through a faulty network. Every request from the gateway to the centre's FHIR server
 * (transactions, read-before-retry searches, poll searches) passes a proxy that, at random but
 * reproducibly, answers 503, resets the connection, forwards the request and then drops the answer
 * (the server did the work, the gateway never hears of it), answers with an HTML error page, or
 * delays. The centre works the Tasks directly on its server. In the end every referral reached the
 * centre exactly once, every status the centre set came back, and the referrer's webhook receiver
 * saw each change in order.
 */

const REFERRALS = 40;
jest.setTimeout(90_000);

type Fault = 'none' | '503' | 'reset' | 'lost-answer' | 'html' | 'slow';

class FaultyProxy {
  readonly faults = new Map<Fault, number>();
  private server!: Server;
  url = '';
  constructor(
    private readonly target: URL,
    private readonly random: () => number
  ) {}

  async start(): Promise<this> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  private served = 0;

  private pick(): Fault {
    // The first requests get one fault of each kind, so every kind is exercised whatever the draw.
    const first: Fault[] = ['lost-answer', '503', 'reset', 'html', 'slow'];
    if (this.served < first.length) return first[this.served++];
    const x = this.random();
    if (x < 0.1) return '503';
    if (x < 0.15) return 'reset';
    if (x < 0.22) return 'lost-answer';
    if (x < 0.25) return 'html';
    if (x < 0.3) return 'slow';
    return 'none';
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const fault = this.pick();
    this.faults.set(fault, (this.faults.get(fault) ?? 0) + 1);
    if (fault === '503') {
      res.writeHead(503, { 'Content-Type': 'text/plain' }).end('Service Unavailable');
      req.resume();
      return;
    }
    if (fault === 'reset') {
      req.socket.destroy();
      return;
    }
    if (fault === 'html') {
      res.writeHead(200, { 'Content-Type': 'text/html' }).end('<html><body>Gateway Timeout</body></html>');
      req.resume();
      return;
    }
    const forward = (): void => {
      const upstream = httpRequest(
        { host: this.target.hostname, port: this.target.port, method: req.method, path: req.url, headers: { ...req.headers, host: this.target.host } },
        (answer) => {
          if (fault === 'lost-answer') {
            // The server has done the work; the gateway never hears of it.
            answer.resume();
            answer.on('end', () => req.socket.destroy());
            return;
          }
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        }
      );
      upstream.on('error', () => req.socket.destroy());
      req.pipe(upstream);
    };
    if (fault === 'slow') setTimeout(forward, 300);
    else forward();
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((r) => this.server.close(r));
  }
}

interface Received {
  webhookId: string;
  event: { referralId: string; status: string; previousStatus: string };
}

describe('the referral loop through a network that fails a third of the requests', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let proxy: FaultyProxy;
  let gw: Gateway;
  let receiver: Server;
  let receiverUrl: string;
  const received: Received[] = [];
  let dir: string;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    const target = new URL(sandbox.url);
    proxy = await new FaultyProxy(target, prng(20261125)).start();
    receiver = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        received.push({ webhookId: String(req.headers['webhook-id']), event: JSON.parse(Buffer.concat(chunks).toString('utf8')) });
        res.writeHead(204).end();
      });
    });
    await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
    receiverUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hooks`;
    dir = mkdtempSync(join(tmpdir(), 'rg-chaos-'));
    const file = writeDestinationsFile(dir, {
      name: 'Centre behind a faulty network',
      baseUrl: `${proxy.url}${target.pathname}`,
      timeoutMs: 1000,
      // Faults here are random, not an outage: keep the breaker from pausing the whole test.
      circuitBreaker: { failureThreshold: 1000, cooldownMs: 100, maxCooldownMs: 200 },
    });
    gw = await startGateway(
      { DESTINATIONS_FILE: file, DELIVERY_MAX_ATTEMPTS: '100', DELIVERY_BASE_DELAY_MS: '20', DELIVERY_MAX_DELAY_MS: '200' },
      { webhooks: { baseDelayMs: 20, maxDelayMs: 100, idleMs: 50 } }
    );
  });
  afterAll(async () => {
    await gw.stop();
    await proxy.stop();
    await sandbox.close();
    receiver.closeAllConnections();
    await new Promise((r) => receiver.close(r));
    rmSync(dir, { recursive: true, force: true });
  });

  const api = async (path: string, init: RequestInit = {}): Promise<any> =>
    (await fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' } })).json();
  const centre = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
    const res = await fetch(`${sandbox.url}/${path}`, { ...init, headers: { 'Content-Type': 'application/fhir+json' } });
    if (!res.ok) throw new Error(`${path}: ${res.status}`);
    return (await res.json()) as T;
  };

  test(`${REFERRALS} referrals: each reaches the centre once, every status comes back, every webhook arrives in order`, async () => {
    const ids: string[] = [];
    for (let i = 0; i < REFERRALS; i++) {
      const r = await api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), externalId: `EHR-CHAOS-${i}`, callbackUrl: receiverUrl }) });
      ids.push(r.id);
    }
    const sent = await eventually(
      async () => {
        const views = await Promise.all(ids.map((id) => api(`/referrals/${id}`)));
        return views.every((v) => v.status === 'sent') ? views : undefined;
      },
      60_000,
      200
    );

    // Exactly one ServiceRequest and one Task per referral at the centre, despite lost answers and resends.
    const count = async (type: string): Promise<Map<string, number>> => {
      const b = await centre<Bundle<Task | ServiceRequest>>(`${type}?_count=1000`);
      const m = new Map<string, number>();
      for (const e of b.entry ?? []) {
        const v = e.resource?.identifier?.find((x) => x.system === REFERRAL_IDENTIFIER_SYSTEM)?.value as string;
        m.set(v, (m.get(v) ?? 0) + 1);
      }
      return m;
    };
    for (const type of ['Task', 'ServiceRequest']) {
      const m = await count(type);
      expect([...m.keys()].sort()).toEqual([...ids].sort());
      expect([...m.values()].every((n) => n === 1)).toBe(true);
    }

    // The centre answers: a third accepted, a third rejected with a reason, a third completed (skipping states).
    const expected = new Map<string, string>();
    for (const [i, v] of sent.entries()) {
      const task = await centre<Task>(v.fhir.task);
      const status = (['accepted', 'rejected', 'completed'] as const)[i % 3];
      await centre<Task>(v.fhir.task, {
        method: 'PUT',
        body: JSON.stringify({ ...task, status, ...(status === 'rejected' ? { statusReason: { text: 'Outside our catchment' } } : {}) }),
      });
      expected.set(v.id, status);
    }
    // Polls go through the faulty network too; a failed cycle is simply tried again.
    await eventually(
      async () => {
        await gw.poller.pollOnce({ force: true });
        const views = await Promise.all(ids.map((id) => api(`/referrals/${id}`)));
        return views.every((v) => v.status === expected.get(v.id));
      },
      60_000,
      100
    );

    // Every referral's webhooks: sent, then the centre's status, in order (duplicates only as retries of one id).
    await eventually(async () => ids.every((id) => new Set(received.filter((r) => r.event.referralId === id).map((r) => r.webhookId)).size === 2), 20_000);
    for (const id of ids) {
      const events = received.filter((r) => r.event.referralId === id);
      const firstSeen = [...new Map(events.map((r) => [r.webhookId, r.event])).values()];
      expect(firstSeen.map((e) => [e.previousStatus, e.status])).toEqual([
        ['queued', 'sent'],
        ['sent', expected.get(id)],
      ]);
    }
    const faults = Object.fromEntries(proxy.faults);
    // The faults really happened, of every kind.
    for (const kind of ['503', 'reset', 'lost-answer', 'html', 'slow'] as const) expect(faults[kind] ?? 0).toBeGreaterThan(0);
    process.stdout.write(`chaos: ${REFERRALS} referrals through ${JSON.stringify(faults)}\n`);
  });
});
