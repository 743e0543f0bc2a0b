import { connect } from 'node:net';
import type { Gateway } from '../../src/gateway';
import { eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { deliveryQueue, leasedQueue, listReferrals, payloadBytes } from '../../src/store';

/**
 * Concurrent uploads cannot exhaust the heap: request bodies in flight are bounded by
 * MAX_INTAKE_BYTES_IN_FLIGHT; a request that does not fit waits, then gets a 503 with Retry-After.
 */
describe('the intake budget (MAX_INTAKE_BYTES_IN_FLIGHT)', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ MAX_BODY_BYTES: String(1_000_000), MAX_INTAKE_BYTES_IN_FLIGHT: String(1_200_000), INTAKE_WAIT_MS: '300' });
  });
  afterAll(async () => {
    await gw.stop();
  });

  /**
   * A POST that declares `length` bytes and sends only the first few: it holds its share of the budget. Written
   * on a raw socket, so no HTTP client (nor a test library that patches them) buffers or holds it back.
   */
  function slowUpload(length: number): { destroy: () => void } {
    const url = new URL(gw.url);
    const socket = connect(Number(url.port), url.hostname, () => {
      socket.write(
        `POST /referrals HTTP/1.1\r\nHost: ${url.host}\r\nAuthorization: Bearer ${KEY_A}\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n{"externalId":`
      );
    });
    socket.on('error', () => undefined);
    socket.resume();
    return { destroy: () => socket.destroy() };
  }

  // Client b (other-clinic): client a's slow upload holds more than a's share (INTAKE_CLIENT_SHARE), so a's own
  // next requests wait for it; another client's are measured against the whole budget.
  const post = (body: string, key = KEY_B): Promise<Response> =>
    fetch(`${gw.url}/referrals`, { method: 'POST', headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' }, body });

  test('a request that fits is served; one that does not waits, then gets 503 with Retry-After; room frees when the big one ends', async () => {
    const big = slowUpload(1_000_000);
    // Wait until the service has admitted it and is receiving its body.
    await eventually(async () => /^referral_intake_bytes_in_flight 1000000$/m.test(await (await fetch(`${gw.url}/metrics`)).text()));

    // 1,000,000 + a 3 KB referral fits in 1,200,000: served at once.
    const small = await post(JSON.stringify({ ...fixture(), externalId: 'EHR-BUDGET-SMALL' }));
    expect(small.status).toBe(202);

    // 1,000,000 + 400,000 does not: it waits INTAKE_WAIT_MS, then 503.
    const started = Date.now();
    const refused = await post(JSON.stringify({ ...fixture(), externalId: 'EHR-BUDGET-WAIT', questions: ['x'.repeat(400_000)] }));
    expect(refused.status).toBe(503);
    expect(Date.now() - started).toBeGreaterThanOrEqual(250);
    expect(refused.headers.get('retry-after')).toBe('1');
    const outcome = (await refused.json()) as { resourceType: string; issue: Array<{ code: string }> };
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(outcome.issue[0].code).toBe('transient');
    expect((await listReferrals(gw.db, 'other-clinic', { limit: 100, externalId: 'EHR-BUDGET-WAIT' })).items).toHaveLength(0);

    // While it waits, a request is served as soon as the big upload ends.
    const waiting = post(JSON.stringify({ ...fixture(), externalId: 'EHR-BUDGET-LATER', questions: ['y'.repeat(400_000)] }));
    await new Promise((r) => setTimeout(r, 50));
    big.destroy();
    const later = await waiting;
    expect(later.status).not.toBe(503);
    expect([202, 422]).toContain(later.status); // admitted and checked (the long question may be refused by the schema)

    const metrics = await (await fetch(`${gw.url}/metrics`)).text();
    expect(metrics).toMatch(/^referral_intake_bytes_in_flight 0$/m);
  });

  test('one body the size of MAX_BODY_BYTES is admitted when nothing else is in flight, even above the budget', async () => {
    const g2 = await startGateway({ MAX_BODY_BYTES: String(2_000_000), MAX_INTAKE_BYTES_IN_FLIGHT: String(1_500_000), INTAKE_WAIT_MS: '100' });
    try {
      const res = await fetch(`${g2.url}/referrals`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({
          ...fixture(),
          externalId: 'EHR-BUDGET-ALONE',
          documents: [{ kind: 'pathology-report', title: 'Scan', contentType: 'application/pdf', data: Buffer.alloc(1_200_000, 1).toString('base64') }],
        }),
      });
      expect(res.status).toBe(202);
    } finally {
      await g2.stop();
    }
  });
});

/**
 * Delivery reads a referral's stored submission (megabytes of documents) within the same budget as request
 * bodies, so uploads and a backlog of large deliveries together stay within MAX_INTAKE_BYTES_IN_FLIGHT.
 */
describe('delivery draws from the same memory budget', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ MAX_BODY_BYTES: String(1_000_000), MAX_INTAKE_BYTES_IN_FLIGHT: String(1_200_000), INTAKE_WAIT_MS: '200' });
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('a referral waits for room before it is read for delivery, counting no attempt, and is delivered once there is room', async () => {
    const { callbackUrl: _none, ...rest } = fixture();
    const body = JSON.stringify({ ...rest, externalId: 'EHR-BUDGET-DELIVERY' });
    // Everything but this body's own size is held elsewhere (another upload, another delivery): intake fits exactly.
    const hold = await gw.memory.reserve('someone-else', gw.memory.maxBytes - Buffer.byteLength(body), { waitMs: 0 });
    if (typeof hold !== 'function') throw new Error('the budget was not free');
    const res = await fetch(`${gw.url}/referrals`, { method: 'POST', headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' }, body });
    expect(res.status).toBe(202);
    const id = ((await res.json()) as { id: string }).id;
    // The stored submission (routed: it names its destination) is larger than the body: delivery does not fit.
    expect(await payloadBytes(gw.db, id)).toBeGreaterThan(Buffer.byteLength(body));

    await new Promise((r) => setTimeout(r, 1_500));
    expect((await gw.service.get('city-hospital', id, { payload: false })).status).toBe('queued');
    const [entry] = await leasedQueue.forReferral(gw.db, deliveryQueue, id);
    expect([entry.kind, entry.state, entry.attempts]).toEqual(['submit', 'pending', 0]);
    expect(await (await fetch(`${gw.url}/metrics`)).text()).toMatch(/^referral_intake_wait_timeouts_total\{client="\(delivery\)"\} [1-9]/m);

    hold();
    await eventually(async () => (await gw.service.get('city-hospital', id, { payload: false })).status === 'sent', 10_000);
    expect(gw.memory.held).toBe(0);
  }, 20_000);
});
