import type { Bundle, ServiceRequest, Task } from '@medplum/fhirtypes';
import nock from 'nock';
import type { Gateway } from '../../src/gateway';
import { eventually, fixture as sampleReferral, KEY_A, startGateway } from '../helpers/gateway';
import { allowAllNetwork, allowOnlyLoopback } from '../helpers/nock';
import { deliveryQueue, leasedQueue } from '../../src/store';

/** The sample referral without its callbackUrl: no status webhook may leave this machine during the test. */
function fixture(): Record<string, any> {
  const { callbackUrl: _none, ...body } = sampleReferral();
  return body;
}

const api = async (gw: Gateway, path: string, init: RequestInit = {}): Promise<{ status: number; body: any }> => {
  const res = await fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' } });
  return { status: res.status, body: await res.json() };
};

async function submitAndWaitSent(gw: Gateway, externalId: string): Promise<any> {
  const { status, body } = await api(gw, '/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), externalId }) });
  expect(status).toBe(202);
  return eventually(async () => {
    const v = (await api(gw, `/referrals/${body.id}`)).body;
    return v.status === 'sent' ? v : undefined;
  });
}

describe('cancel and added documents against the built-in sandbox', () => {
  let gw: Gateway;
  let fhirBase: string;

  beforeAll(async () => {
    gw = await startGateway();
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('a Task the centre has already started is not cancelled; the refusal is in the history', async () => {
    const v = await submitAndWaitSent(gw, 'EHR-CANCEL-STARTED');
    const taskUrl = `${fhirBase}/${v.fhir.task}`;
    const task = (await (await fetch(taskUrl)).json()) as Task;
    // The centre starts work; the gateway has not polled yet, so it still sees "sent" and accepts the cancel.
    const put = await fetch(taskUrl, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ ...task, status: 'in-progress' }),
    });
    expect(put.ok).toBe(true);
    expect((await api(gw, `/referrals/${v.id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'Patient moved away' }) })).status).toBe(202);

    const after = await eventually(async () => {
      const r = (await api(gw, `/referrals/${v.id}`)).body;
      return r.history.some((h: any) => /cancel refused/.test(h.reason ?? '')) ? r : undefined;
    });
    expect(after.status).toBe('sent');
    expect(after.history.at(-1)).toMatchObject({ status: 'sent', reason: 'cancel refused by state: Task is in-progress' });
    expect(((await (await fetch(taskUrl)).json()) as Task).status).toBe('in-progress');
    expect(((await (await fetch(`${fhirBase}/${v.fhir.serviceRequest}`)).json()) as ServiceRequest).status).toBe('active');
    const outbox = await leasedQueue.forReferral(gw.db, deliveryQueue, v.id);
    expect(outbox.find((e) => e.kind === 'cancel')).toMatchObject({ state: 'done', attempts: 1 });
  });

  test('documents added while the referral is still queued reach the centre after it, linked to its ServiceRequest', async () => {
    const { body } = await api(gw, '/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), externalId: 'EHR-DOCS-EARLY' }) });
    const added = await api(gw, `/referrals/${body.id}/documents`, {
      method: 'POST',
      body: JSON.stringify({
        documents: [{ kind: 'genomic-report', title: 'NGS panel', contentType: 'text/plain', data: Buffer.from('BRCA2 negative').toString('base64') }],
      }),
    });
    expect(added.status).toBe(202);
    const v = await eventually(async () => {
      const r = (await api(gw, `/referrals/${body.id}`)).body;
      return r.fhir?.documents.length === 3 ? r : undefined;
    });
    const sr = (await (await fetch(`${fhirBase}/${v.fhir.serviceRequest}`)).json()) as ServiceRequest;
    expect(sr.supportingInfo?.map((s) => s.reference)).toEqual(expect.arrayContaining(v.fhir.documents));
    // The centre's Task lists every document as an input too, the added one once.
    const task = (await (await fetch(`${fhirBase}/${v.fhir.task}`)).json()) as Task;
    const inputs = (task.input ?? []).map((i) => i.valueReference?.reference);
    expect(inputs).toEqual(expect.arrayContaining(v.fhir.documents));
    expect(inputs.filter((r) => r === v.fhir.documents[2])).toHaveLength(1);
    expect(task.status).toBe('requested');
    expect(v.history.map((h: any) => h.status)).toEqual(['queued', 'sent']); // appending refs is not a status change
  });
});

describe('cancel with If-Match against a centre that changes the Task in between (nock)', () => {
  const CENTRE = 'https://centre.example.org';
  let gw: Gateway;

  beforeAll(async () => {
    allowOnlyLoopback();
    gw = await startGateway({ FHIR_BASE_URL: `${CENTRE}/fhir/R4`, DELIVERY_BASE_DELAY_MS: '20' });
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
  });

  test('a 412 on the Task re-reads and writes again; the ServiceRequest is revoked; the referral is cancelled', async () => {
    // The patient check's search before the transaction (src/delivery/patient-match.ts): no Patient there yet.
    nock(CENTRE)
      .get(/^\/fhir\/R4\/Patient\?/)
      .reply(200, { resourceType: 'Bundle', type: 'searchset', total: 0, entry: [] });
    nock(CENTRE)
      .post('/fhir/R4')
      .reply(200, (_uri: string, raw: nock.Body) => {
        const b = (typeof raw === 'string' ? JSON.parse(raw) : raw) as Bundle;
        const ids: Record<string, string> = { Task: 't1', ServiceRequest: 'sr1' };
        return {
          resourceType: 'Bundle',
          type: 'transaction-response',
          entry: (b.entry ?? []).map((e, i) => {
            const type = e.resource?.resourceType as string;
            return { response: { status: '201 Created', location: `${type}/${ids[type] ?? `x${i}`}/_history/1` } };
          }),
        };
      });
    const v = await submitAndWaitSent(gw, 'EHR-CANCEL-412');
    expect(v.fhir.task).toBe('Task/t1');

    const task = (version: string, status: Task['status']): Task => ({ resourceType: 'Task', id: 't1', meta: { versionId: version }, status, intent: 'order' });
    const puts: Array<{ ifMatch: string; body: any }> = [];
    const json = (body: nock.Body): Record<string, unknown> => (typeof body === 'string' ? JSON.parse(body) : body) as Record<string, unknown>;
    const scope = nock(CENTRE)
      .get('/fhir/R4/Task/t1')
      .reply(200, task('1', 'requested'))
      .put('/fhir/R4/Task/t1')
      .reply(function (_uri, body) {
        puts.push({ ifMatch: String(this.req.headers['if-match']), body: json(body) });
        return [412, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'conflict' }] }];
      })
      // The centre had just marked it received.
      .get('/fhir/R4/Task/t1')
      .reply(200, task('2', 'received'))
      .put('/fhir/R4/Task/t1')
      .reply(function (_uri, body) {
        puts.push({ ifMatch: String(this.req.headers['if-match']), body: json(body) });
        return [200, { ...json(body), meta: { versionId: '3' } }];
      })
      .get('/fhir/R4/ServiceRequest/sr1')
      .reply(200, {
        resourceType: 'ServiceRequest',
        id: 'sr1',
        meta: { versionId: '4' },
        status: 'active',
        intent: 'order',
        subject: { reference: 'Patient/p' },
      })
      .put('/fhir/R4/ServiceRequest/sr1')
      .reply(function (_uri, body) {
        puts.push({ ifMatch: String(this.req.headers['if-match']), body: json(body) });
        return [200, { ...json(body), meta: { versionId: '5' } }];
      });

    expect((await api(gw, `/referrals/${v.id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'Patient chose another centre' }) })).status).toBe(202);
    const after = await eventually(async () => {
      const r = (await api(gw, `/referrals/${v.id}`)).body;
      return r.status === 'cancelled' ? r : undefined;
    });
    expect(scope.isDone()).toBe(true);
    expect(puts.map((p) => p.ifMatch)).toEqual(['W/"1"', 'W/"2"', 'W/"4"']);
    expect(puts[1].body).toMatchObject({ status: 'cancelled', statusReason: { text: 'Patient chose another centre' } });
    expect(puts[2].body).toMatchObject({ status: 'revoked' });
    expect(after.statusReason).toBe('Patient chose another centre');
    expect(after.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'cancelled']);
  });
});

// nock patches Node's HTTP client for the whole jest worker: undo it for the test files that run after this one.
afterAll(() => {
  nock.restore();
});
