import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Bundle } from '@medplum/fhirtypes';
import nock from 'nock';
import { FhirClients } from '../../src/destinations/fhir/clients';
import { createFhirClient } from '../../src/destinations/fhir/client';
import type { Gateway } from '../../src/gateway';
import { startSandboxServer } from '../../src/sandbox/server';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { ADMIN_KEY, eventually, fixture as sampleReferral, KEY_A, startGateway } from '../helpers/gateway';
import { writeDestinationsFile } from '../helpers/destinations';
import { allowAllNetwork, allowOnlyLoopback } from '../helpers/nock';
import { type LossyProxy, startLossyProxy } from '../helpers/lossy-proxy';

/** The sample referral without its callbackUrl: no status webhook may leave this machine during the test. */
function fixture(): Record<string, any> {
  const { callbackUrl: _none, ...body } = sampleReferral();
  return body;
}

const CENTRE = 'https://centre.example.org';
const BASE = `${CENTRE}/fhir/R4`;

/** A transaction-response a real server would give: one entry per request entry, with a location. */
function transactionResponse(raw: Bundle | string): Bundle {
  const body = (typeof raw === 'string' ? JSON.parse(raw) : raw) as Bundle;
  return {
    resourceType: 'Bundle',
    type: 'transaction-response',
    entry: (body.entry ?? []).map((e, i) => ({
      response: { status: '201 Created', location: `${e.resource?.resourceType}/${1000 + i}/_history/1` },
    })),
  };
}

async function submit(gw: Gateway, externalId: string): Promise<string> {
  const res = await fetch(`${gw.url}/referrals`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...fixture(), externalId }),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { id: string }).id;
}

const view = async (gw: Gateway, id: string): Promise<any> =>
  (await fetch(`${gw.url}/referrals/${id}`, { headers: { Authorization: `Bearer ${KEY_A}` } })).json();

/** An empty searchset: what the centre answers to the read-before-retry search when it has nothing yet. */
const EMPTY_SEARCH: Bundle = { resourceType: 'Bundle', type: 'searchset', total: 0, entry: [] };

/**
 * The patient check's search before each transaction (src/delivery/patient-match.ts): the centre holds no
 * Patient with the referral's identifier yet.
 */
function noPatientYet(): void {
  nock(CENTRE)
    .persist()
    .get(/^\/fhir\/R4\/Patient\?/)
    .reply(200, EMPTY_SEARCH);
}

describe('delivery failure paths against a fake destination (nock)', () => {
  let gw: Gateway;
  /** Read-before-retry searches the centre for the Task before every resend. */
  let searches: string[] = [];

  beforeAll(async () => {
    allowOnlyLoopback();
    gw = await startGateway({
      FHIR_BASE_URL: BASE,
      FHIR_VERIFY_DELIVERY: 'false',
      FHIR_TIMEOUT_MS: '300',
      DELIVERY_BASE_DELAY_MS: '20',
      DELIVERY_MAX_DELAY_MS: '200',
    });
  });
  beforeEach(() => {
    searches = [];
    nock(CENTRE)
      .persist()
      .get(/^\/fhir\/R4\/Task\?/)
      .reply((uri) => {
        searches.push(decodeURIComponent(uri));
        return [200, EMPTY_SEARCH];
      });
    noPatientYet();
  });
  afterEach(() => {
    nock.abortPendingRequests();
    nock.cleanAll();
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  test('503 then success: retried, then sent with the ids the server assigned; the resend was preceded by a search for the Task', async () => {
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(503, 'Service Unavailable')
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-503');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(2);
    expect(v.fhir.task).toMatch(/^Task\/\d+$/);
    expect(v.fhir.serviceRequest).toMatch(/^ServiceRequest\/\d+$/);
    expect(v.history.map((h: any) => h.status)).toEqual(['queued', 'sent']);
    // read-before-retry: exactly one search, by the gateway's referral identifier
    expect(searches).toEqual([expect.stringContaining(`identifier=${REFERRAL_IDENTIFIER_SYSTEM}|${id}`)]);
  });

  test('409 Conflict (a concurrent write won a race at the server) is retried, not failed', async () => {
    const conflict = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'conflict', diagnostics: 'HAPI-0550: could not execute statement; constraint violation' }],
    };
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(409, conflict, { 'Content-Type': 'application/fhir+json' })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-409');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(2);
    expect(v.history.map((h: any) => h.status)).toEqual(['queued', 'sent']);
  });

  test('429 with Retry-After: 2: the next attempt waits at least 2 s', async () => {
    let firstAt = 0;
    let secondAt = 0;
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(() => {
        firstAt = Date.now();
        return [429, 'slow down', { 'Retry-After': '2' }];
      })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => {
        secondAt = Date.now();
        return transactionResponse(body as unknown as Bundle);
      });
    const id = await submit(gw, 'EHR-429');
    await eventually(async () => (await view(gw, id)).status === 'sent', 10_000);
    expect(scope.isDone()).toBe(true);
    expect(secondAt - firstAt).toBeGreaterThanOrEqual(1_950);
  });

  test('a connection reset is retried after a search for what the lost attempt created', async () => {
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .replyWithError({ code: 'ECONNRESET', message: 'socket hang up' })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-RESET');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined), 10_000);
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(2);
    expect(searches).toHaveLength(1);
  });

  test('a timeout is retried', async () => {
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .delay(1500)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle))
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-TIMEOUT');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined), 10_000);
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(2);
  });

  test('garbage from the server (HTML, a short bundle) is retried, never marked sent without ids', async () => {
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, '<html><body>Gateway error</body></html>', { 'Content-Type': 'text/html' })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, { resourceType: 'Bundle', type: 'transaction-response', entry: [] })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-GARBAGE');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined), 10_000);
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(3);
    expect(v.fhir.task).toBeTruthy();
  });

  test('a 400 OperationOutcome makes the referral delivery-failed with the reason kept; an operator can re-queue it', async () => {
    const refusal = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'business-rule', details: { text: 'Referrals to this service need a pathology report' } }],
    };
    nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(400, refusal, { 'Content-Type': 'application/fhir+json' });
    const id = await submit(gw, 'EHR-400');
    const v = await eventually(async () => ((await view(gw, id)).status === 'delivery-failed' ? view(gw, id) : undefined));
    expect(v.delivery.lastError).toContain('Referrals to this service need a pathology report');
    expect(v.delivery.attempts).toBe(1);
    expect(v.statusReason).toMatch(/^400/);

    const failed: any = await (await fetch(`${gw.url}/admin/deliveries?state=failed`, { headers: { Authorization: `Bearer ${ADMIN_KEY}` } })).json();
    expect(failed.items.map((i: any) => i.referralId)).toContain(id);

    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const retry = await fetch(`${gw.url}/admin/deliveries/${id}/retry`, { method: 'POST', headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    expect(retry.status).toBe(202);
    gw.worker.wake();
    const after = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(scope.isDone()).toBe(true);
    expect(after.history.map((h: any) => h.status)).toEqual(['queued', 'delivery-failed', 'queued', 'sent']);
  });
});

describe('the backlog an operator watches at /metrics (nock)', () => {
  let gw: Gateway;

  beforeAll(async () => {
    allowOnlyLoopback();
    gw = await startGateway({ FHIR_BASE_URL: BASE, FHIR_VERIFY_DELIVERY: 'false', DELIVERY_BASE_DELAY_MS: '2000', DELIVERY_MAX_DELAY_MS: '4000' });
    nock(CENTRE)
      .persist()
      .get(/^\/fhir\/R4\/Task\?/)
      .reply(200, EMPTY_SEARCH);
    noPatientYet();
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  const gauge = (text: string, name: string, labels: string): number => {
    const m = new RegExp(`^${name}\\{${labels}\\} ([0-9.e+-]+)$`, 'm').exec(text);
    return m ? Number(m[1]) : NaN;
  };

  test('pending and dead-lettered deliveries, the oldest pending age, referrals by status, circuit state and delivery latency', async () => {
    const ok = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const sent = await submit(gw, 'EHR-METRICS-OK');
    await eventually(async () => (await view(gw, sent)).status === 'sent');
    expect(ok.isDone()).toBe(true);

    nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(400, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid' }] });
    const refused = await submit(gw, 'EHR-METRICS-400');
    await eventually(async () => (await view(gw, refused)).status === 'delivery-failed');

    nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(503, 'busy');
    const waiting = await submit(gw, 'EHR-METRICS-503');
    await eventually(async () => (await view(gw, waiting)).delivery.attempts === 1);

    const text = await (await fetch(`${gw.url}/metrics`)).text();
    expect(gauge(text, 'referral_outbox_entries', 'kind="submit",state="failed"')).toBe(1);
    expect(gauge(text, 'referral_outbox_entries', 'kind="submit",state="pending"')).toBe(1);
    expect(Number(/^referral_outbox_oldest_pending_seconds ([0-9.e+-]+)$/m.exec(text)?.[1])).toBeGreaterThan(0);
    expect(gauge(text, 'referral_referrals', 'status="sent"')).toBe(1);
    expect(gauge(text, 'referral_referrals', 'status="delivery-failed"')).toBe(1);
    expect(gauge(text, 'referral_referrals', 'status="queued"')).toBe(1);
    expect(gauge(text, 'referral_destination_circuit_state', 'destination="default"')).toBe(0);
    expect(gauge(text, 'referral_delivery_latency_seconds_count', 'destination="default"')).toBeGreaterThanOrEqual(1);
  });
});

describe('retries run out (nock)', () => {
  let gw: Gateway;

  beforeAll(async () => {
    allowOnlyLoopback();
    gw = await startGateway({
      FHIR_BASE_URL: BASE,
      FHIR_VERIFY_DELIVERY: 'false',
      DELIVERY_MAX_ATTEMPTS: '3',
      DELIVERY_BASE_DELAY_MS: '10',
      DELIVERY_MAX_DELAY_MS: '20',
    });
    nock(CENTRE)
      .persist()
      .get(/^\/fhir\/R4\/Task\?/)
      .reply(200, EMPTY_SEARCH);
    noPatientYet();
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  test('after the configured attempts the referral is delivery-failed, keeping the last OperationOutcome', async () => {
    const busy = (n: number) => ({
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'transient', diagnostics: `database busy (${n})` }],
    });
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(503, busy(1), { 'Content-Type': 'application/fhir+json' })
      .post(/^\/fhir\/R4\/?$/)
      .reply(500, busy(2), { 'Content-Type': 'application/fhir+json' })
      .post(/^\/fhir\/R4\/?$/)
      .reply(503, busy(3), { 'Content-Type': 'application/fhir+json' });
    const id = await submit(gw, 'EHR-EXHAUSTED');
    const v = await eventually(async () => ((await view(gw, id)).status === 'delivery-failed' ? view(gw, id) : undefined));
    expect(scope.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(3);
    expect(v.statusReason).toBe('gave up after 3 attempts; last error: 503: POST (base): HTTP 503 (OperationOutcome: transient)');
    expect(v.delivery.lastError).toContain('database busy (3)');
  });
});

describe('retries run out by age (DELIVERY_MAX_AGE_MS)', () => {
  let gw: Gateway;

  beforeAll(async () => {
    allowOnlyLoopback();
    gw = await startGateway({
      FHIR_BASE_URL: BASE,
      FHIR_VERIFY_DELIVERY: 'false',
      DELIVERY_MAX_AGE_MS: '1500',
      DELIVERY_MAX_ATTEMPTS: '1000',
      DELIVERY_BASE_DELAY_MS: '50',
      DELIVERY_MAX_DELAY_MS: '200',
    });
    nock(CENTRE)
      .persist()
      .get(/^\/fhir\/R4\/Task\?/)
      .reply(200, EMPTY_SEARCH);
    noPatientYet();
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  test('a centre that stays down past the age limit makes the referral delivery-failed, saying so', async () => {
    const down = nock(CENTRE)
      .persist()
      .post(/^\/fhir\/R4\/?$/)
      .reply(503, 'down for maintenance');
    const started = Date.now();
    const id = await submit(gw, 'EHR-TOO-OLD');
    const v = await eventually(async () => ((await view(gw, id)).status === 'delivery-failed' ? view(gw, id) : undefined), 10_000);
    down.persist(false);
    expect(Date.now() - started).toBeGreaterThanOrEqual(1500);
    expect(v.delivery.attempts).toBeGreaterThan(1);
    expect(v.delivery.attempts).toBeLessThan(1000);
    // Whether the circuit had opened by then (after five failures) or not, the age limit is the reason.
    expect(v.statusReason).toMatch(/^gave up after \d+ attempts over \d+ s \(the age limit(; destination circuit open)?\); last error: 503/);
  });
});

describe('a 401 with an expired token (client-credentials)', () => {
  const AUTH = 'https://auth.example.org';
  let gw: Gateway;

  beforeAll(async () => {
    allowOnlyLoopback();
    const env = { FHIR_CLIENT_ID: 'gateway', FHIR_CLIENT_SECRET: 'cc-secret-1' };
    gw = await startGateway(
      { FHIR_BASE_URL: BASE, FHIR_VERIFY_DELIVERY: 'false', FHIR_AUTH: 'client-credentials', FHIR_TOKEN_URL: `${AUTH}/token`, ...env },
      { clients: new FhirClients((d) => createFhirClient(d, { env })) }
    );
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  test('is answered by one re-authentication, and the referral is sent in the same attempt', async () => {
    const basic = 'Basic ' + Buffer.from('gateway:cc-secret-1').toString('base64');
    const tokens = nock(AUTH)
      .post('/token', (b: Record<string, string>) => b.grant_type === 'client_credentials')
      .matchHeader('authorization', basic)
      .reply(200, { access_token: 'tok-expired', token_type: 'Bearer', expires_in: 3600 })
      .post('/token')
      .matchHeader('authorization', basic)
      .reply(200, { access_token: 'tok-fresh', token_type: 'Bearer', expires_in: 3600 });
    noPatientYet();
    const fhir = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .matchHeader('authorization', 'Bearer tok-expired')
      .reply(401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'expired', diagnostics: 'token expired' }] })
      .post(/^\/fhir\/R4\/?$/)
      .matchHeader('authorization', 'Bearer tok-fresh')
      .reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const id = await submit(gw, 'EHR-401');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(tokens.isDone()).toBe(true);
    expect(fhir.isDone()).toBe(true);
    expect(v.delivery.attempts).toBe(1);
    expect(nock.pendingMocks()).toEqual([]);
  });
});

describe('the per-destination circuit breaker (nock)', () => {
  let gw: Gateway;
  let dir: string;
  const posts: Array<{ at: number; referralId: string; status: number }> = [];
  let healthy = false;

  beforeAll(async () => {
    allowOnlyLoopback();
    dir = mkdtempSync(join(tmpdir(), 'rg-circuit-'));
    const file = writeDestinationsFile(dir, {
      name: 'Centre behind a breaker',
      baseUrl: BASE,
      timeoutMs: 500,
      verifyDelivery: false,
      circuitBreaker: { failureThreshold: 3, cooldownMs: 400, maxCooldownMs: 5000 },
    });
    // One at a time, so the count of requests before the circuit opens is exact.
    gw = await startGateway(
      { DESTINATIONS_FILE: file, DELIVERY_CONCURRENCY: '1', DELIVERY_BASE_DELAY_MS: '10', DELIVERY_MAX_DELAY_MS: '30', DELIVERY_MAX_ATTEMPTS: '50' },
      { deliveryIdleMs: 50 }
    );
    nock(CENTRE)
      .persist()
      .get(/^\/fhir\/R4\/Task\?/)
      .reply(200, EMPTY_SEARCH);
    noPatientYet();
    nock(CENTRE)
      .persist()
      .post(/^\/fhir\/R4\/?$/)
      .reply((_uri, body) => {
        const bundle = (typeof body === 'string' ? JSON.parse(body) : body) as Bundle;
        const sr = bundle.entry?.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as any;
        const referralId = sr.identifier.find((i: any) => i.system === REFERRAL_IDENTIFIER_SYSTEM).value as string;
        const status = healthy ? 200 : 503;
        posts.push({ at: Date.now(), referralId, status });
        return healthy ? [200, transactionResponse(bundle)] : [503, 'down'];
      });
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
    rmSync(dir, { recursive: true, force: true });
  });

  test('opens after 3 failures, sends nothing while open, probes after the cool-down (doubling it when the probe fails), and closes on success', async () => {
    const ids = [await submit(gw, 'EHR-CB-1'), await submit(gw, 'EHR-CB-2'), await submit(gw, 'EHR-CB-3')];
    const breaker = gw.worker.circuit(gw.destinations.get('centre')!);
    await eventually(async () => breaker.currentState === 'open', 5_000, 5);
    const openedAt = Date.now();
    expect(posts).toHaveLength(3);
    expect(posts.every((p) => p.status === 503)).toBe(true);

    // Open: nothing is sent during the cool-down, then exactly one probe, which fails: open again for 800 ms.
    await eventually(async () => posts.length === 4, 5_000, 5);
    const firstProbe = posts[3];
    expect(firstProbe.at - posts[2].at).toBeGreaterThanOrEqual(380);
    await new Promise((r) => setTimeout(r, 300));
    expect(posts).toHaveLength(4);
    expect(breaker.currentState).toBe('open');

    // The centre recovers; the next probe (800 ms after the first) succeeds and closes the circuit.
    healthy = true;
    const sent = await eventually(
      async () => {
        const views = await Promise.all(ids.map((id) => view(gw, id)));
        return views.every((v) => v.status === 'sent') ? views : undefined;
      },
      10_000,
      20
    );
    expect(breaker.currentState).toBe('closed');
    const secondProbe = posts[4];
    expect(secondProbe.status).toBe(200);
    expect(secondProbe.at - firstProbe.at).toBeGreaterThanOrEqual(780);
    expect(posts.slice(5).every((p) => p.status === 200)).toBe(true);
    expect(posts).toHaveLength(4 + ids.length);
    expect(Date.now() - openedAt).toBeLessThan(5_000);
    // Put off while open without counting: each referral's attempts are exactly the requests made for it.
    for (const v of sent) {
      expect(v.delivery.attempts).toBe(posts.filter((p) => p.referralId === v.id).length);
    }
  });
});

/**
 * A proxy in front of a real (standalone) sandbox FHIR server that forwards the first transaction
 * and then drops the connection before the answer reaches the gateway: the server has applied it,
 * the gateway does not know. The resend must create nothing new.
 */
describe('a resend after a lost response creates no duplicate', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let proxy: LossyProxy;
  let gw: Gateway;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    proxy = await startLossyProxy(sandbox.url);
    gw = await startGateway({ FHIR_BASE_URL: proxy.base, DELIVERY_BASE_DELAY_MS: '20' });
  });
  afterAll(async () => {
    await gw.stop();
    await proxy.close();
    await sandbox.close();
  });

  test('the server holds exactly one ServiceRequest and one Task', async () => {
    const id = await submit(gw, 'EHR-LOST-RESPONSE');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(proxy.dropped()).toBe(1);
    expect(v.delivery.attempts).toBe(2);
    const q = encodeURIComponent(`${REFERRAL_IDENTIFIER_SYSTEM}|${id}`);
    const tasks = (await (await fetch(`${sandbox.url}/Task?identifier=${q}`)).json()) as Bundle;
    const srs = (await (await fetch(`${sandbox.url}/ServiceRequest?identifier=${q}`)).json()) as Bundle;
    expect(tasks.entry ?? []).toHaveLength(1);
    expect(srs.entry ?? []).toHaveLength(1);
    expect(v.fhir.task).toBe(`Task/${tasks.entry?.[0].resource?.id}`);
    const patients = (await (await fetch(`${sandbox.url}/Patient`)).json()) as Bundle;
    expect(patients.entry ?? []).toHaveLength(1);
  });
});

// nock patches Node's HTTP client for the whole jest worker: undo it for the test files that run after this one.
afterAll(() => {
  nock.restore();
});
