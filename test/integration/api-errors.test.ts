import request from 'supertest';
import type { Gateway } from '../../src/gateway';
import { ADMIN_KEY, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { listReferrals } from '../../src/store';

/** Every error a client can cause answers with the contract's status and an OperationOutcome naming the field. */
describe('API errors', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ MAX_BODY_BYTES: String(64 * 1024) });
  });
  afterAll(async () => {
    await gw.stop();
  });

  const post = (body: unknown, key = KEY_A) =>
    request(gw.url)
      .post('/referrals')
      .set('Authorization', `Bearer ${key}`)
      .set('Content-Type', 'application/json')
      .send(typeof body === 'string' ? body : JSON.stringify(body));

  const expectOutcome = (res: request.Response, status: number, expression?: string): void => {
    expect(res.status).toBe(status);
    expect(res.headers['content-type']).toMatch(/application\/fhir\+json/);
    expect(res.body.resourceType).toBe('OperationOutcome');
    expect(res.body.issue.length).toBeGreaterThan(0);
    expect(JSON.stringify(res.body)).not.toMatch(/at .*\.ts:\d+|node_modules/); // no stack traces
    if (expression) {
      expect(res.body.issue.flatMap((i: any) => i.expression ?? [])).toContain(expression);
    }
  };

  const countReferrals = async (): Promise<number> => (await listReferrals(gw.db, 'city-hospital', { limit: 200 })).items.length;

  test('401 without a key and with a wrong key', async () => {
    expectOutcome(await request(gw.url).get('/referrals'), 401);
    expectOutcome(await request(gw.url).get('/referrals').set('Authorization', 'Bearer nope'), 401);
    const res = await request(gw.url).get('/referrals').set('Authorization', 'Basic Zm9vOmJhcg==');
    expectOutcome(res, 401);
    expect(res.headers['www-authenticate']).toMatch(/Bearer/);
  });

  test('400 for malformed JSON, nothing stored', async () => {
    const before = await countReferrals();
    expectOutcome(await post('{"externalId": "x", '), 400, '$');
    expect(await countReferrals()).toBe(before);
  });

  test('415 for a body that is not JSON', async () => {
    const res = await request(gw.url).post('/referrals').set('Authorization', `Bearer ${KEY_A}`).set('Content-Type', 'text/plain').send('hello');
    expectOutcome(res, 415);
  });

  test('413 for a body over MAX_BODY_BYTES', async () => {
    const big = fixture();
    big.documents[0].data = Buffer.alloc(100 * 1024, 1).toString('base64');
    expectOutcome(await post(big), 413);
  });

  test('422 names each offending field: wrong types, missing fields, impossible dates, invalid base64', async () => {
    const before = await countReferrals();
    const body = fixture();
    body.kind = 'gossip';
    delete body.patient.birthDate;
    body.diagnosis.diagnosedOn = '2026-02-30';
    body.documents[0].data = 'not base64!!';
    body.priority = 7;
    const res = await post(body);
    expectOutcome(res, 422);
    const exprs = res.body.issue.flatMap((i: any) => i.expression);
    expect(exprs).toEqual(expect.arrayContaining(['kind', 'patient.birthDate', 'diagnosis.diagnosedOn', 'documents[0].data', 'priority']));
    expect(await countReferrals()).toBe(before);
  });

  test('422 when a document has both or neither of data and url', async () => {
    const body = fixture();
    body.documents[0].url = 'https://ehr.example.org/docs/1';
    expectOutcome(await post(body), 422, 'documents[0].data');
  });

  test('422 without patient consent', async () => {
    const body = fixture();
    body.consent.patientAgreed = false;
    expectOutcome(await post(body), 422, 'consent.patientAgreed');
  });

  test('422 for an unknown destination', async () => {
    const body = fixture();
    body.destination = 'nowhere';
    expectOutcome(await post(body), 422, 'destination');
  });

  test('422 for unknown fields (typos are not silently dropped)', async () => {
    const body = fixture();
    body.patient.brithDate = '1960-01-01';
    expectOutcome(await post(body), 422, 'patient');
  });

  test('422 for a JSON body that is not an object', async () => {
    expectOutcome(await post('[1,2,3]'), 422, '$');
    expectOutcome(await post('"text"'), 422, '$');
  });

  test('409 when an Idempotency-Key or externalId is reused with a different body', async () => {
    const body = { ...fixture(), externalId: 'EHR-CONFLICT-1' };
    const first = await post(body).set('Idempotency-Key', 'conflict-key');
    expect(first.status).toBe(202);
    const changed = { ...body, priority: 'urgent' };
    expectOutcome(await post(changed).set('Idempotency-Key', 'conflict-key'), 409, 'Idempotency-Key');
    expectOutcome(await post(changed), 409, 'externalId');
  });

  test("another client's referral answers 404, exactly like an unknown id", async () => {
    const created = await post({ ...fixture(), externalId: 'EHR-ISOLATION-1' });
    expect(created.status).toBe(202);
    const other = await request(gw.url).get(`/referrals/${created.body.id}`).set('Authorization', `Bearer ${KEY_B}`);
    const unknown = await request(gw.url).get('/referrals/ref_does_not_exist').set('Authorization', `Bearer ${KEY_B}`);
    expectOutcome(other, 404);
    expectOutcome(unknown, 404);
    expect(other.body.issue[0].details.text.replace(created.body.id, 'X')).toBe(unknown.body.issue[0].details.text.replace('ref_does_not_exist', 'X'));
    const list = await request(gw.url).get('/referrals').set('Authorization', `Bearer ${KEY_B}`);
    expect(list.status).toBe(200);
    expect(list.body.items.map((i: any) => i.id)).not.toContain(created.body.id);
  });

  test('400 for bad list parameters', async () => {
    const res = await request(gw.url).get('/referrals?limit=0&status=lost').set('Authorization', `Bearer ${KEY_A}`);
    expectOutcome(res, 400);
    expectOutcome(await request(gw.url).get('/referrals?cursor=garbage').set('Authorization', `Bearer ${KEY_A}`), 400, 'cursor');
  });

  test('404 OperationOutcome for unknown endpoints; admin endpoints need the admin key', async () => {
    expectOutcome(await request(gw.url).get('/nothing-here'), 404);
    expectOutcome(await request(gw.url).get('/admin/deliveries').set('Authorization', `Bearer ${KEY_A}`), 401);
    const ok = await request(gw.url).get('/admin/deliveries?state=failed').set('Authorization', `Bearer ${ADMIN_KEY}`);
    expect(ok.status).toBe(200);
    expect(Array.isArray(ok.body.items)).toBe(true);
  });

  test('metrics count submissions by outcome, without a key', async () => {
    const res = await request(gw.url).get('/metrics');
    expect(res.status).toBe(200);
    expect(res.text).toMatch(/referral_submissions_total\{outcome="refused-422"\} [1-9]/);
    expect(res.text).toMatch(/referral_submissions_total\{outcome="accepted"\} [1-9]/);
  });

  test('health and readiness need no key', async () => {
    expect((await request(gw.url).get('/healthz')).status).toBe(200);
    const ready = await request(gw.url).get('/readyz');
    expect(ready.status).toBe(200);
    expect(ready.body.checks.store).toBe('ok');
  });
});
