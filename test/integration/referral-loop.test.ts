import type { Bundle, DocumentReference, Patient, ServiceRequest, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { serviceDatabases } from '../helpers/db';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * The whole loop on embedded defaults: an EHR submits, the referral lands on the sandbox FHIR
 * server as one transaction, a centre works the Task with plain FHIR REST, and the status,
 * history and report come back through the API after a poll.
 */
describe.each(serviceDatabases())('the referral loop against the built-in sandbox, stored on %s', (_name, database) => {
  let gw: Gateway;
  let fhirBase: string;
  let drop: () => Promise<void>;

  const api = (path: string, init: RequestInit = {}): Promise<Response> =>
    fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', ...(init.headers ?? {}) } });
  const fhir = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
    const res = await fetch(`${fhirBase}/${path}`, { ...init, headers: { 'Content-Type': 'application/fhir+json', ...(init.headers ?? {}) } });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };

  beforeAll(async () => {
    const db = await database();
    drop = db.drop;
    gw = await startGateway({ DATABASE_URL: db.url });
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(async () => {
    await gw.stop();
    await drop();
  });

  test('submit, deliver, accept, complete with a report, and read it all back', async () => {
    // An EHR submits the sample referral.
    const body = fixture('breast-second-opinion');
    const submitted = await api('/referrals', { method: 'POST', body: JSON.stringify(body) });
    expect(submitted.status).toBe(202);
    const created = (await submitted.json()) as { id: string; status: string };
    expect(submitted.headers.get('location')).toBe(`/referrals/${created.id}`);
    expect(created.status).toBe('queued');

    // The delivery worker sends it; the referral becomes `sent` with the server's ids.
    const sent = await eventually(async () => {
      const r = (await (await api(`/referrals/${created.id}`)).json()) as any;
      return r.status === 'sent' ? r : undefined;
    });
    expect(sent.fhir.baseUrl).toBe(fhirBase);
    expect(sent.fhir.serviceRequest).toMatch(/^ServiceRequest\/.+/);
    expect(sent.fhir.task).toMatch(/^Task\/.+/);
    expect(sent.fhir.documents).toHaveLength(body.documents.length);
    expect(sent.history.map((h: any) => h.status)).toEqual(['queued', 'sent']);

    // The centre finds everything by plain FHIR REST.
    const task = await fhir<Task>(sent.fhir.task);
    expect(task.status).toBe('requested');
    expect(task.focus?.reference).toBe(sent.fhir.serviceRequest);
    const sr = await fhir<ServiceRequest>(sent.fhir.serviceRequest);
    expect(sr.status).toBe('active');
    expect(sr.intent).toBe('order');
    const notes = (sr.note ?? []).map((n) => n.text).join('\n');
    for (const q of body.questions as string[]) expect(notes).toContain(q);
    const patient = await fhir<Patient>(String(sr.subject?.reference));
    expect(patient.identifier?.some((i) => i.value === body.patient.identifiers[0].value)).toBe(true);
    expect(patient.birthDate).toBe(body.patient.birthDate);
    for (const ref of sent.fhir.documents as string[]) {
      const doc = await fhir<DocumentReference>(ref);
      expect(doc.subject?.reference).toBe(sr.subject?.reference);
    }
    const srs = await fhir<Bundle>(`ServiceRequest?subject=${sr.subject?.reference}`);
    expect(srs.entry).toHaveLength(1);

    // The centre accepts.
    const accepted = await fhir<Task>(`Task/${task.id}`, {
      method: 'PUT',
      body: JSON.stringify({ ...task, status: 'accepted', businessStatus: { text: 'Reviewed by breast tumour board intake' } }),
    });
    expect(accepted.status).toBe('accepted');
    await gw.poller.pollOnce();
    const afterAccept = (await (await api(`/referrals/${created.id}`)).json()) as any;
    expect(afterAccept.status).toBe('accepted');
    expect(afterAccept.statusReason).toBe('Reviewed by breast tumour board intake');

    // The centre completes with its opinion as a DocumentReference in Task.output.
    const reportText = 'Tumour board opinion: agree with neoadjuvant chemotherapy.';
    const report = await fhir<DocumentReference>('DocumentReference', {
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'DocumentReference',
        status: 'current',
        type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
        subject: sr.subject,
        content: [{ attachment: { contentType: 'text/plain', title: 'Second opinion', data: Buffer.from(reportText).toString('base64') } }],
      }),
    });
    await fhir<Task>(`Task/${task.id}`, {
      method: 'PUT',
      body: JSON.stringify({
        ...accepted,
        status: 'completed',
        businessStatus: undefined,
        output: [{ type: { text: 'opinion report' }, valueReference: { reference: `DocumentReference/${report.id}` } }],
      }),
    });
    await gw.poller.pollOnce();
    const done = (await (await api(`/referrals/${created.id}`)).json()) as any;
    expect(done.status).toBe('completed');
    expect(done.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'accepted', 'completed']);
    expect(done.report).toEqual({
      reference: `DocumentReference/${report.id}`,
      title: 'Second opinion',
      contentType: 'text/plain',
      url: `/referrals/${created.id}/report/content`,
    });
    const content = await api(done.report.url);
    expect(content.status).toBe(200);
    expect(content.headers.get('content-type')).toMatch(/^text\/plain/);
    expect(await content.text()).toBe(reportText);

    // A later poll with nothing new changes nothing.
    await gw.poller.pollOnce();
    const again = (await (await api(`/referrals/${created.id}`)).json()) as any;
    expect(again.history).toHaveLength(4);
  });

  test('resubmitting the same referral returns the original and sends nothing twice', async () => {
    const body = { ...fixture('breast-second-opinion'), externalId: 'EHR-REPEAT-1' };
    const first = await api('/referrals', { method: 'POST', body: JSON.stringify(body), headers: { 'Idempotency-Key': 'idem-1' } });
    expect(first.status).toBe(202);
    const a = (await first.json()) as { id: string };
    const second = await api('/referrals', { method: 'POST', body: JSON.stringify(body), headers: { 'Idempotency-Key': 'idem-1' } });
    expect(second.status).toBe(200);
    expect(((await second.json()) as { id: string }).id).toBe(a.id);
    await eventually(async () => ((await (await api(`/referrals/${a.id}`)).json()) as any).status === 'sent');
    const tasks = await fhir<Bundle>(`Task?identifier=${encodeURIComponent(`https://referral-gateway.dev/fhir/sid/referral|${a.id}`)}`);
    expect(tasks.entry ?? []).toHaveLength(1);
  });
});
