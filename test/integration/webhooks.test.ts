import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Task } from '@medplum/fhirtypes';
import { Webhook } from 'standardwebhooks';
import type { Gateway, GatewayOptions } from '../../src/gateway';
import { openDb } from '../../src/store/db';
import type { WebhookDispatcher, WebhookDispatcherOptions } from '../../src/webhooks/dispatcher';
import { ADMIN_KEY, eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { leasedQueue, webhookQueue } from '../../src/store';

/**
 * Status webhooks end to end, through the real service: a referral with a callbackUrl is submitted,
 * delivered to the sandbox FHIR server and worked there; a receiver verifies every signature with the
 * Standard Webhooks library and records what it sees.
 *
 * Assumes src/gateway.ts wires attachWebhooks (src/webhooks/index.ts): `gw.webhooks` is the dispatcher,
 * `GatewayOptions.webhooks` overrides its options, and /admin/webhooks is mounted.
 */

interface StatusEvent {
  type: string;
  referralId: string;
  externalId: string;
  status: string;
  previousStatus: string;
  at: string;
  reason?: string;
}

interface Received {
  path: string;
  webhookId: string;
  verified: boolean;
  event: StatusEvent;
  answered: number;
  at: number;
}

type Behaviour = (nthForThisId: number) => { status: number; headers?: Record<string, string> };

/** A webhook receiver: verifies every request's signature; answers per path. */
class Receiver {
  readonly received: Received[] = [];
  readonly behaviour = new Map<string, Behaviour>();
  private server!: Server;
  url = '';

  constructor(private readonly verifier: Webhook) {}

  async start(): Promise<this> {
    this.server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks).toString('utf8');
    const headers = Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k, String(v)]));
    let verified = true;
    try {
      this.verifier.verify(body, headers);
    } catch {
      verified = false;
    }
    const webhookId = headers['webhook-id'];
    const nth = this.received.filter((r) => r.webhookId === webhookId).length + 1;
    const path = (req.url ?? '/').split('?')[0];
    const answer = verified ? (this.behaviour.get(path)?.(nth) ?? { status: 204 }) : { status: 401 };
    this.received.push({ path: req.url ?? '/', webhookId, verified, event: JSON.parse(body) as StatusEvent, answered: answer.status, at: Date.now() });
    res.writeHead(answer.status, answer.headers ?? {});
    res.end();
  }

  of(referralId: string): Received[] {
    return this.received.filter((r) => r.event.referralId === referralId);
  }

  delivered(referralId: string): Received[] {
    return this.of(referralId).filter((r) => r.answered >= 200 && r.answered < 300);
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

type WiredGateway = Gateway & { webhooks: WebhookDispatcher };
type WiredOptions = GatewayOptions & { webhooks?: Partial<WebhookDispatcherOptions> };

async function startWired(env: Record<string, string>, opts: WiredOptions): Promise<WiredGateway> {
  const gw = await startGateway(env, opts);
  if (!(gw as Partial<WiredGateway>).webhooks) {
    await gw.stop();
    throw new Error('src/gateway.ts does not wire status webhooks yet (attachWebhooks from src/webhooks)');
  }
  return gw as WiredGateway;
}

const FAST: Partial<WebhookDispatcherOptions> = { baseDelayMs: 20, maxDelayMs: 100, idleMs: 50, timeoutMs: 2000, maxAttempts: 4 };

const RAW_SECRET = 'integration-webhook-secret-01';
/** The documented receiver key for a raw WEBHOOK_SECRET: whsec_ + base64 of its UTF-8 bytes. */
const RAW_RECEIVER_KEY = `whsec_${Buffer.from(RAW_SECRET, 'utf8').toString('base64')}`;

function client(gw: Gateway) {
  const api = (path: string, init: RequestInit = {}, key = KEY_A): Promise<Response> =>
    fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json', ...(init.headers ?? {}) } });
  const admin = (path: string, init: RequestInit = {}): Promise<Response> => api(path, init, ADMIN_KEY);
  const submit = async (externalId: string, callbackUrl: string): Promise<string> => {
    const res = await api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture('breast-second-opinion'), externalId, callbackUrl }) });
    expect(res.status).toBe(202);
    return ((await res.json()) as { id: string }).id;
  };
  const waitSent = (id: string): Promise<{ fhir: { task: string } }> =>
    eventually(async () => {
      const r = (await (await api(`/referrals/${id}`)).json()) as { status: string; fhir: { task: string } };
      return r.status === 'sent' ? r : undefined;
    });
  /** The centre moves its Task (plain FHIR REST on the sandbox), then the gateway polls. */
  const moveTask = async (taskRef: string, status: Task['status']): Promise<void> => {
    const url = `${gw.url}/sandbox/fhir/R4/${taskRef}`;
    const task = (await (await fetch(url)).json()) as Task;
    const put = await fetch(url, { method: 'PUT', headers: { 'Content-Type': 'application/fhir+json' }, body: JSON.stringify({ ...task, status }) });
    expect(put.ok).toBe(true);
    await gw.poller.pollOnce();
  };
  return { api, admin, submit, waitSent, moveTask };
}

interface AdminItem {
  id: string;
  referralId: string;
  seq: number;
  event: { status: string; previousStatus: string };
  url: string;
  state: string;
  attempts: number;
  lastError: string | null;
}

describe('status webhooks through the running service', () => {
  let gw: WiredGateway;
  let receiver: Receiver;
  let c: ReturnType<typeof client>;

  const listAdmin = async (state: string): Promise<AdminItem[]> => {
    const res = await c.admin(`/admin/webhooks?state=${state}&limit=500`);
    expect(res.status).toBe(200);
    return ((await res.json()) as { items: AdminItem[] }).items;
  };

  beforeAll(async () => {
    receiver = await new Receiver(new Webhook(RAW_RECEIVER_KEY)).start();
    gw = await startWired({ WEBHOOK_SECRET: RAW_SECRET }, { webhooks: FAST });
    c = client(gw);
  });
  afterAll(async () => {
    await gw?.stop();
    await receiver?.stop();
  });

  test('a referral’s status changes arrive signed, in order, once each, with distinct stable ids', async () => {
    expect(gw.webhooks.signed).toBe(true);
    const id = await c.submit('EHR-WH-LOOP', `${receiver.url}/hooks/ok?token=abc123`);
    const sent = await c.waitSent(id);
    await eventually(async () => receiver.delivered(id).length === 1);
    await c.moveTask(sent.fhir.task, 'accepted');
    await eventually(async () => receiver.delivered(id).length === 2);
    await c.moveTask(sent.fhir.task, 'completed');
    await eventually(async () => receiver.delivered(id).length === 3);

    const got = receiver.of(id);
    expect(got.map((r) => [r.event.previousStatus, r.event.status])).toEqual([
      ['queued', 'sent'],
      ['sent', 'accepted'],
      ['accepted', 'completed'],
    ]);
    expect(got.every((r) => r.verified && r.answered === 204)).toBe(true);
    expect(got.every((r) => r.path === '/hooks/ok?token=abc123')).toBe(true);
    expect(got.every((r) => r.event.type === 'referral.status-changed' && r.event.externalId === 'EHR-WH-LOOP')).toBe(true);
    expect(new Set(got.map((r) => r.webhookId)).size).toBe(3);

    // Nothing more arrives later (no duplicate on a 2xx), and the outbox agrees: one attempt each.
    await gw.poller.pollOnce();
    await new Promise((r) => setTimeout(r, 200));
    expect(receiver.of(id)).toHaveLength(3);
    const rows = (await listAdmin('delivered')).filter((x) => x.referralId === id).sort((a, b) => a.seq - b.seq);
    expect(rows.map((x) => [x.id, x.seq, x.attempts, x.event.status])).toEqual(got.map((r, i) => [r.webhookId, i + 1, 1, r.event.status]));
    expect(rows.every((x) => x.url === `${receiver.url}/hooks/ok`)).toBe(true); // no query string shown
  });

  test('a receiver answering 500 three times gets the event on the fourth attempt, same webhook-id; the next event waits for it', async () => {
    let requests = 0;
    receiver.behaviour.set('/hooks/flaky', () => ({ status: ++requests <= 3 ? 500 : 200 }));
    const id = await c.submit('EHR-WH-FLAKY', `${receiver.url}/hooks/flaky`);
    const sent = await c.waitSent(id);
    await c.moveTask(sent.fhir.task, 'accepted');
    await eventually(async () => receiver.delivered(id).length === 2);

    const got = receiver.of(id);
    expect(got.every((r) => r.verified)).toBe(true);
    const first = got.filter((r) => r.event.status === 'sent');
    expect(first.map((r) => r.answered)).toEqual([500, 500, 500, 200]);
    expect(new Set(first.map((r) => r.webhookId)).size).toBe(1);
    // Each accepted-event request comes after the sent event was finally delivered.
    const lastSent = got.lastIndexOf(first[3]);
    expect(got.findIndex((r) => r.event.status === 'accepted')).toBeGreaterThan(lastSent);
    expect(got.filter((r) => r.event.status === 'accepted').map((r) => r.answered)).toEqual([200]);

    const rows = (await listAdmin('delivered')).filter((x) => x.referralId === id).sort((a, b) => a.seq - b.seq);
    expect(rows.map((x) => [x.event.status, x.attempts])).toEqual([
      ['sent', 4],
      ['accepted', 1],
    ]);
  });

  test('while a referral’s event is refused, its next event is held back (not attempted); other referrals are not', async () => {
    let open = false;
    receiver.behaviour.set('/hooks/hold', () => (open ? { status: 200 } : { status: 503, headers: { 'Retry-After': '1' } }));
    const held = await c.submit('EHR-WH-HOLD', `${receiver.url}/hooks/hold`);
    const other = await c.submit('EHR-WH-OTHER', `${receiver.url}/hooks/other`);
    const sent = await c.waitSent(held);
    await eventually(async () => receiver.of(held).length >= 1);
    await c.moveTask(sent.fhir.task, 'accepted');

    const pending = (await listAdmin('pending')).filter((x) => x.referralId === held).sort((a, b) => a.seq - b.seq);
    expect(pending.map((x) => x.event.status)).toEqual(['sent', 'accepted']);
    expect(pending[0].attempts).toBeGreaterThanOrEqual(1);
    expect(pending[0].lastError).toBe('HTTP 503');
    expect(pending[1].attempts).toBe(0);
    expect(receiver.of(held).some((r) => r.event.status === 'accepted')).toBe(false);
    await eventually(async () => receiver.delivered(other).length === 1);

    open = true;
    await eventually(async () => receiver.delivered(held).length === 2, 5000);
    expect(receiver.delivered(held).map((r) => r.event.status)).toEqual(['sent', 'accepted']);
    expect(receiver.of(held).filter((r) => r.event.status === 'accepted')).toHaveLength(1);
  });

  test('an event that keeps failing is dead-lettered, listed for the operator, and replayed on request', async () => {
    let healthy = false;
    receiver.behaviour.set('/hooks/down', () => ({ status: healthy ? 200 : 500 }));
    const id = await c.submit('EHR-WH-DOWN', `${receiver.url}/hooks/down?token=do-not-show`);
    const sent = await c.waitSent(id);

    const failed = await eventually(async () => (await listAdmin('failed')).find((x) => x.referralId === id));
    expect(failed).toMatchObject({
      seq: 1,
      state: 'failed',
      attempts: 4,
      lastError: 'gave up after 4 attempts; last error: HTTP 500',
      url: `${receiver.url}/hooks/down`,
      event: { status: 'sent', previousStatus: 'queued' },
    });
    expect(receiver.of(id).map((r) => [r.webhookId, r.answered, r.verified])).toEqual(Array(4).fill([failed.id, 500, true]));
    // Operators see dead letters on /metrics too.
    const metrics = await (await fetch(`${gw.url}/metrics`)).text();
    expect(Number(/^referral_webhook_entries\{state="failed"\} (\d+)$/m.exec(metrics)?.[1])).toBeGreaterThanOrEqual(1);

    // The dead letter does not hold back the referral's later events.
    healthy = true;
    await c.moveTask(sent.fhir.task, 'accepted');
    await eventually(async () => receiver.delivered(id).some((r) => r.event.status === 'accepted'));

    // Replay: same webhook-id, delivered now.
    const retry = await c.admin(`/admin/webhooks/${failed.id}/retry`, { method: 'POST' });
    expect(retry.status).toBe(202);
    expect(await retry.json()).toEqual({ requeued: [failed.id] });
    const replayed = await eventually(async () => receiver.delivered(id).find((r) => r.webhookId === failed.id));
    expect(replayed.event.status).toBe('sent');
    expect(replayed.verified).toBe(true);
    expect((await listAdmin('failed')).some((x) => x.id === failed.id)).toBe(false);
    expect((await listAdmin('delivered')).find((x) => x.id === failed.id)).toMatchObject({ attempts: 1, lastError: null });

    // Only a failed event can be replayed.
    const again = await c.admin(`/admin/webhooks/${failed.id}/retry`, { method: 'POST' });
    expect(again.status).toBe(404);
    const oo = (await again.json()) as { resourceType: string; issue: Array<{ code: string }> };
    expect(oo.resourceType).toBe('OperationOutcome');
    expect(oo.issue[0].code).toBe('not-found');
    expect((await c.admin('/admin/webhooks/wh_NOPE/retry', { method: 'POST' })).status).toBe(404);
  });

  test('the operator endpoints check their input and the admin key', async () => {
    const bad = await c.admin('/admin/webhooks?state=lost');
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { resourceType: string }).resourceType).toBe('OperationOutcome');
    expect((await c.admin('/admin/webhooks?limit=0')).status).toBe(400);
    expect((await c.api('/admin/webhooks')).status).toBe(401); // a client key is not the admin key
    expect((await c.api('/admin/webhooks/x/retry', { method: 'POST' })).status).toBe(401);
    const pending = await c.admin('/admin/webhooks?state=pending');
    expect(pending.status).toBe(200);
    expect(Array.isArray(((await pending.json()) as { items: unknown[] }).items)).toBe(true);
  });
});

describe('status webhooks across a restart', () => {
  const SECRET = `whsec_${Buffer.from('restart-test-key-0123456789abcdef').toString('base64')}`;
  let dir: string;
  let receiver: Receiver;
  const gateways: Gateway[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'gw-webhooks-'));
    receiver = await new Receiver(new Webhook(SECRET)).start();
  });
  afterAll(async () => {
    for (const g of gateways) await g.stop();
    await receiver.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('an event still pending when the service stops is delivered by the next one, after Retry-After', async () => {
    let up = false;
    receiver.behaviour.set('/hooks/restart', () => (up ? { status: 200 } : { status: 503, headers: { 'Retry-After': '1' } }));
    const env = { DATABASE_URL: `sqlite:${join(dir, 'g.db')}`, WEBHOOK_SECRET: SECRET };
    const opts: WiredOptions = { webhooks: { ...FAST, maxAttempts: 50 } };

    const first = await startWired(env, opts);
    gateways.push(first);
    const c1 = client(first);
    const id = await c1.submit('EHR-WH-RESTART', `${receiver.url}/hooks/restart`);
    await c1.waitSent(id);
    await eventually(async () => receiver.of(id).length >= 1);
    await first.stop();
    const attemptsBefore = receiver.of(id).length;

    // Stopped: the event is on disk, pending, leased to nobody.
    const db = openDb(env.DATABASE_URL);
    const [row] = await leasedQueue.forReferral(db, webhookQueue, id);
    await db.close();
    expect(row).toMatchObject({ state: 'pending', lockedBy: null });
    expect(row.attempts).toBe(attemptsBefore);
    expect(row.lastError).toBe('HTTP 503');

    up = true;
    const second = await startWired(env, opts);
    gateways.push(second);
    const delivered = await eventually(async () => receiver.delivered(id)[0]);
    const all = receiver.of(id);
    expect(all.every((r) => r.verified && r.webhookId === row.id && r.event.status === 'sent')).toBe(true);
    expect(all.filter((r) => r.answered === 200)).toHaveLength(1);
    // Retry-After: 1 was honoured between the last refusal and the delivery.
    const lastRefusal = all.filter((r) => r.answered === 503).pop() as Received;
    expect(delivered.at - lastRefusal.at).toBeGreaterThanOrEqual(900);
    const items = ((await (await client(second).admin('/admin/webhooks?state=delivered')).json()) as { items: AdminItem[] }).items;
    expect(items.find((x) => x.id === row.id)).toMatchObject({ referralId: id, attempts: attemptsBefore + 1 });
  });
});

describe('callbacks to private networks (WEBHOOK_ALLOW_PRIVATE_NETWORKS=false, as in production)', () => {
  let gw: WiredGateway;
  let c: ReturnType<typeof client>;
  const sent: string[] = [];

  beforeAll(async () => {
    // hooks.example.org resolves to a private address (as a hostile or misconfigured DNS name would);
    // ehr.example.org to a public one, whose request the test's fetch answers.
    const lookup = async (host: string): Promise<string[]> => (host === 'hooks.example.org' ? ['10.0.0.5'] : ['93.184.216.34']);
    const webhookFetch: typeof fetch = async (input) => {
      sent.push(String(input));
      return new Response(null, { status: 204 });
    };
    gw = await startWired({ WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'false', WEBHOOK_SECRET: RAW_SECRET }, { webhooks: { ...FAST, lookup }, webhookFetch });
    c = client(gw);
  });
  afterAll(async () => {
    await gw.stop();
  });

  test.each([
    ['http://127.0.0.1:8080/admin', /non-public address \(127\.0\.0\.1\)/],
    ['http://169.254.169.254/latest/meta-data/', /non-public address/],
    ['http://[::1]:9000/hooks', /non-public address \(::1\)/],
    ['http://localhost:3000/hooks', /local host name/],
  ])('a submission with callbackUrl %s is refused with 422 naming callbackUrl; nothing is stored', async (callbackUrl, message) => {
    const externalId = `EHR-SSRF-${Math.random().toString(36).slice(2)}`;
    const res = await c.api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture('breast-second-opinion'), externalId, callbackUrl }) });
    expect(res.status).toBe(422);
    const outcome = (await res.json()) as { resourceType: string; issue: Array<{ expression?: string[]; diagnostics?: string; details?: { text?: string } }> };
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(outcome.issue[0].expression).toEqual(['callbackUrl']);
    expect(JSON.stringify(outcome.issue[0])).toMatch(message);
    const list = (await (await c.api(`/referrals?externalId=${externalId}`)).json()) as { items: unknown[] };
    expect(list.items).toHaveLength(0);
  });

  test('a callback host that resolves to a private address is never called: the event is dead-lettered with the reason', async () => {
    const id = await c.submit('EHR-SSRF-DNS', 'https://hooks.example.org/referrals');
    const failed = await eventually(async () => {
      const items = ((await (await c.admin('/admin/webhooks?state=failed')).json()) as { items: AdminItem[] }).items.filter((i) => i.referralId === id);
      return items.length > 0 ? items : undefined;
    });
    expect(failed[0]).toMatchObject({ state: 'failed', attempts: 1, event: { status: 'sent', previousStatus: 'queued' } });
    expect(failed[0].lastError).toMatch(/resolves to a non-public address \(10\.0\.0\.5\)/);
    expect(sent.filter((u) => u.includes('hooks.example.org'))).toEqual([]);
  });

  test('a public callback host is called as usual', async () => {
    const id = await c.submit('EHR-SSRF-OK', 'https://ehr.example.org/hooks/referrals');
    await c.waitSent(id);
    await eventually(async () => sent.some((u) => u === 'https://ehr.example.org/hooks/referrals'));
  });
});

describe('a callback host that changes its DNS answer between the check and the request (DNS rebinding)', () => {
  let gw: WiredGateway;
  let receiver: Receiver;
  let lookups = 0;

  beforeAll(async () => {
    receiver = await new Receiver(new Webhook(RAW_RECEIVER_KEY)).start();
    // First answer public (the dispatcher's check), then the receiver's loopback address (the connection).
    const lookup = async (host: string): Promise<string[]> => (host === 'rebind.example.org' && ++lookups > 1 ? ['127.0.0.1'] : ['93.184.216.34']);
    // webhookFetch undefined: the service's own guarded HTTP client is used.
    gw = await startWired({ WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'false', WEBHOOK_SECRET: RAW_SECRET }, { webhooks: { ...FAST, lookup }, webhookFetch: undefined });
  });
  afterAll(async () => {
    await gw.stop();
    await receiver.stop();
  });

  test('the request is never made; the event is dead-lettered with the reason', async () => {
    const c = client(gw);
    const port = new URL(receiver.url).port;
    const id = await c.submit('EHR-REBIND', `http://rebind.example.org:${port}/hook`);
    const failed = await eventually(async () => {
      const items = ((await (await c.admin('/admin/webhooks?state=failed')).json()) as { items: AdminItem[] }).items.filter((i) => i.referralId === id);
      return items.length > 0 ? items : undefined;
    });
    expect(failed[0].attempts).toBe(1);
    expect(failed[0].lastError).toMatch(/non-public address \(127\.0\.0\.1\)/);
    expect(lookups).toBeGreaterThanOrEqual(2);
    expect(receiver.received).toEqual([]);
  });
});
