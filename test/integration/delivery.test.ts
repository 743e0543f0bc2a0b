import { createServer, request as httpRequest, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Bundle } from '@medplum/fhirtypes';
import nock from 'nock';
import type { Gateway } from '../../src/gateway';
import { startSandboxServer } from '../../src/fhir/sandbox';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { ADMIN_KEY, eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

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

describe('delivery failure paths against a fake destination (nock)', () => {
  let gw: Gateway;

  beforeAll(async () => {
    nock.disableNetConnect();
    nock.enableNetConnect(/127\.0\.0\.1/);
    gw = await startGateway({ FHIR_BASE_URL: BASE, FHIR_TIMEOUT_MS: '300', DELIVERY_BASE_DELAY_MS: '20', DELIVERY_MAX_DELAY_MS: '200' });
  });
  afterEach(() => {
    nock.cleanAll();
  });
  afterAll(async () => {
    await gw.stop();
    nock.enableNetConnect();
  });

  test('503 then success: retried, then sent with the ids the server assigned', async () => {
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
  });

  test('429 with Retry-After: the next attempt waits at least that long', async () => {
    let firstAt = 0;
    let secondAt = 0;
    const scope = nock(CENTRE)
      .post(/^\/fhir\/R4\/?$/)
      .reply(() => {
        firstAt = Date.now();
        return [429, 'slow down', { 'Retry-After': '1' }];
      })
      .post(/^\/fhir\/R4\/?$/)
      .reply(200, (_uri: string, body: nock.Body) => {
        secondAt = Date.now();
        return transactionResponse(body as unknown as Bundle);
      });
    const id = await submit(gw, 'EHR-429');
    await eventually(async () => (await view(gw, id)).status === 'sent', 10_000);
    expect(scope.isDone()).toBe(true);
    expect(secondAt - firstAt).toBeGreaterThanOrEqual(950);
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
    nock(CENTRE).post(/^\/fhir\/R4\/?$/).reply(400, refusal, { 'Content-Type': 'application/fhir+json' });
    const id = await submit(gw, 'EHR-400');
    const v = await eventually(async () => ((await view(gw, id)).status === 'delivery-failed' ? view(gw, id) : undefined));
    expect(v.delivery.lastError).toContain('Referrals to this service need a pathology report');
    expect(v.statusReason).toMatch(/^400/);

    const failed: any = await (await fetch(`${gw.url}/admin/deliveries?state=failed`, { headers: { Authorization: `Bearer ${ADMIN_KEY}` } })).json();
    expect(failed.items.map((i: any) => i.referralId)).toContain(id);

    const scope = nock(CENTRE).post(/^\/fhir\/R4\/?$/).reply(200, (_uri: string, body: nock.Body) => transactionResponse(body as unknown as Bundle));
    const retry = await fetch(`${gw.url}/admin/deliveries/${id}/retry`, { method: 'POST', headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    expect(retry.status).toBe(202);
    gw.worker.wake();
    const after = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(scope.isDone()).toBe(true);
    expect(after.history.map((h: any) => h.status)).toEqual(['queued', 'delivery-failed', 'queued', 'sent']);
  });
});

/**
 * A proxy in front of a real (standalone) sandbox FHIR server that forwards the first transaction
 * and then drops the connection before the answer reaches the gateway: the server has applied it,
 * the gateway does not know. The resend must create nothing new.
 */
describe('a resend after a lost response creates no duplicate', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let proxy: Server;
  let gw: Gateway;
  let dropped = 0;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    const target = new URL(sandbox.url);
    proxy = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const path = req.url?.replace(/^\/fhir\/R4/, target.pathname) ?? '/';
        const fwd = httpRequest({ host: target.hostname, port: target.port, path, method: req.method, headers: { ...req.headers, host: target.host } }, (up) => {
          const body: Buffer[] = [];
          up.on('data', (c: Buffer) => body.push(c));
          up.on('end', () => {
            if (req.method === 'POST' && dropped === 0) {
              dropped++;
              req.socket.destroy(); // applied at the server; the answer is lost
              return;
            }
            res.writeHead(up.statusCode ?? 502, up.headers);
            res.end(Buffer.concat(body));
          });
        });
        fwd.end(Buffer.concat(chunks));
      });
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', () => r()));
    const port = (proxy.address() as AddressInfo).port;
    gw = await startGateway({ FHIR_BASE_URL: `http://127.0.0.1:${port}/fhir/R4`, DELIVERY_BASE_DELAY_MS: '20' });
  });
  afterAll(async () => {
    await gw.stop();
    await new Promise<void>((r) => proxy.close(() => r()));
    await sandbox.close();
  });

  test('the server holds exactly one ServiceRequest and one Task', async () => {
    const id = await submit(gw, 'EHR-LOST-RESPONSE');
    const v = await eventually(async () => ((await view(gw, id)).status === 'sent' ? view(gw, id) : undefined));
    expect(dropped).toBe(1);
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
