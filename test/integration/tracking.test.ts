import type { DocumentReference, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { Poller } from '../../src/tracking/poller';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { getReferral } from '../../src/store';

/**
 * A cancer centre simulated over the sandbox FHIR server walks Tasks through every path; the
 * referral's status and history follow after each poll.
 */
describe('tracking the centre’s Task', () => {
  let gw: Gateway;
  let fhirBase: string;
  let n = 0;

  beforeAll(async () => {
    gw = await startGateway({}, { pollSweepEveryMs: 0 });
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(async () => {
    await gw.stop();
  });

  const api = async (path: string, init: RequestInit = {}): Promise<{ status: number; body: any }> => {
    const res = await fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' } });
    return { status: res.status, body: await res.json() };
  };
  const fhir = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
    const res = await fetch(`${fhirBase}/${path}`, { ...init, headers: { 'Content-Type': 'application/fhir+json' } });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };

  /** Submits a referral and waits until the centre has it; returns its id and the Task id at the centre. */
  async function delivered(): Promise<{ id: string; taskId: string }> {
    const { status, body } = await api('/referrals', { method: 'POST', body: JSON.stringify({ ...fixture(), externalId: `EHR-TRACK-${++n}` }) });
    expect(status).toBe(202);
    const sent = await eventually(async () => {
      const v = (await api(`/referrals/${body.id}`)).body;
      return v.status === 'sent' ? v : undefined;
    });
    return { id: body.id, taskId: sent.fhir.task.split('/')[1] };
  }

  /** The centre sets the Task's status (and optional fields), as a centre's system would, with PUT. */
  async function centreSets(taskId: string, changes: Partial<Task>): Promise<Task> {
    const current = await fhir<Task>(`Task/${taskId}`);
    return fhir<Task>(`Task/${taskId}`, { method: 'PUT', body: JSON.stringify({ ...current, ...changes }) });
  }

  async function after(id: string): Promise<any> {
    await gw.poller.pollOnce({ force: true });
    return (await api(`/referrals/${id}`)).body;
  }

  test('accepted, in progress, completed with a report', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'accepted' });
    expect((await after(id)).status).toBe('accepted');
    await centreSets(taskId, { status: 'in-progress', businessStatus: { text: 'Slides requested from the referring lab' } });
    const inProgress = await after(id);
    expect(inProgress.status).toBe('in-progress');
    expect(inProgress.statusReason).toBe('Slides requested from the referring lab');
    const report = await fhir<DocumentReference>('DocumentReference', {
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'DocumentReference',
        status: 'current',
        content: [{ attachment: { contentType: 'application/pdf', title: 'Opinion', data: Buffer.from('%PDF-1.4 opinion').toString('base64') } }],
      }),
    });
    await centreSets(taskId, {
      status: 'completed',
      businessStatus: undefined,
      output: [{ type: { text: 'opinion' }, valueReference: { reference: `DocumentReference/${report.id}` } }],
    });
    const done = await after(id);
    expect(done.status).toBe('completed');
    expect(done.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'accepted', 'in-progress', 'completed']);
    expect(done.report.contentType).toBe('application/pdf');
    const content = await fetch(`${gw.url}${done.report.url}`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(content.headers.get('content-type')).toBe('application/pdf');
    expect(Buffer.from(await content.arrayBuffer()).toString()).toBe('%PDF-1.4 opinion');
  });

  test('a report inline in Task.output (valueAttachment) is read too', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, {
      status: 'completed',
      output: [
        {
          type: { text: 'opinion' },
          valueAttachment: { contentType: 'text/plain', title: 'Short opinion', data: Buffer.from('Agree with plan').toString('base64') },
        },
      ],
    });
    const done = await after(id);
    expect(done.status).toBe('completed');
    expect(done.report.title).toBe('Short opinion');
    const content = await fetch(`${gw.url}${done.report.url}`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(await content.text()).toBe('Agree with plan');
  });

  test('a report as a DiagnosticReport whose presentedForm points at a Binary is read too', async () => {
    const { id, taskId } = await delivered();
    const pdf = Buffer.from('%PDF-1.4 molecular tumour board opinion');
    const binary = await fhir<{ id: string }>('Binary', {
      method: 'POST',
      body: JSON.stringify({ resourceType: 'Binary', contentType: 'application/pdf', data: pdf.toString('base64') }),
    });
    const report = await fhir<{ id: string }>('DiagnosticReport', {
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'DiagnosticReport',
        status: 'final',
        code: { text: 'Tumour board opinion' },
        presentedForm: [{ contentType: 'application/pdf', title: 'MTB opinion', url: `Binary/${binary.id}` }],
      }),
    });
    await centreSets(taskId, { status: 'completed', output: [{ type: { text: 'opinion' }, valueReference: { reference: `DiagnosticReport/${report.id}` } }] });
    const done = await after(id);
    expect(done.report).toMatchObject({ reference: `DiagnosticReport/${report.id}`, title: 'MTB opinion', contentType: 'application/pdf' });
    const content = await fetch(`${gw.url}${done.report.url}`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(content.status).toBe(200);
    expect(content.headers.get('content-type')).toBe('application/pdf');
    expect(Buffer.from(await content.arrayBuffer()).equals(pdf)).toBe(true);
  });

  test('rejected with a reason', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'rejected', statusReason: { text: 'Outside our catchment area' } });
    const v = await after(id);
    expect(v.status).toBe('rejected');
    expect(v.statusReason).toBe('Outside our catchment area');
    expect(v.history.at(-1)).toMatchObject({ status: 'rejected', reason: 'Outside our catchment area' });
  });

  test('on hold and back to in progress', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'accepted' });
    await centreSets(taskId, { status: 'in-progress' });
    expect((await after(id)).status).toBe('in-progress'); // accepted was skipped between polls: fine
    await centreSets(taskId, { status: 'on-hold', statusReason: { text: 'Waiting for imaging' } });
    expect((await after(id)).status).toBe('on-hold');
    await centreSets(taskId, { status: 'in-progress', statusReason: undefined });
    const v = await after(id);
    expect(v.status).toBe('in-progress');
    expect(v.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'in-progress', 'on-hold', 'in-progress']);
  });

  test('failed at the centre', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'failed', statusReason: { text: 'Pathology blocks unusable' } });
    const v = await after(id);
    expect(v.status).toBe('failed');
    expect(v.statusReason).toBe('Pathology blocks unusable');
  });

  test('a skipped state: requested straight to completed', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'completed' });
    const v = await after(id);
    expect(v.status).toBe('completed');
    expect(v.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'completed']);
  });

  test('an impossible move (completed back to in progress) is a warning with the Task version, not a change', async () => {
    const { id, taskId } = await delivered();
    await centreSets(taskId, { status: 'completed' });
    await after(id);
    const moved = await centreSets(taskId, { status: 'in-progress' });
    const v = await after(id);
    expect(v.status).toBe('completed');
    const warning = v.history.at(-1);
    expect(warning.status).toBe('completed');
    expect(warning.reason).toContain('warning');
    expect(warning.reason).toContain(String(moved.meta?.versionId));
    // seen once: a further poll adds nothing
    expect((await after(id)).history).toHaveLength(v.history.length);
  });

  test('an unknown Task status never crashes the poller', async () => {
    const { id, taskId } = await delivered();
    const repo = gw.sandbox?.repo;
    const task = (await repo?.readResource<Task>('Task', taskId)) as Task;
    await repo?.updateResource({ ...task, status: 'teleported' as Task['status'] });
    const v = await after(id);
    expect(v.status).toBe('sent');
    expect(v.history.at(-1).reason).toMatch(/unknown Task.status "teleported"/);
  });

  test('a Task deleted at the centre closes the referral with a clear reason', async () => {
    const { id, taskId } = await delivered();
    const del = await fetch(`${fhirBase}/Task/${taskId}`, { method: 'DELETE' });
    expect(del.ok).toBe(true);
    const v = await after(id);
    expect(v.status).toBe('cancelled');
    expect(v.statusReason).toMatch(/no longer exists/);
  });

  test('a ServiceRequest revoked at the centre cancels the referral', async () => {
    const { id } = await delivered();
    const view = (await api(`/referrals/${id}`)).body;
    const srId = view.fhir.serviceRequest.split('/')[1];
    const sr = await fhir<any>(`ServiceRequest/${srId}`);
    await fhir(`ServiceRequest/${srId}`, { method: 'PUT', body: JSON.stringify({ ...sr, status: 'revoked' }) });
    const v = await after(id);
    expect(v.status).toBe('cancelled');
    expect(v.statusReason).toMatch(/revoked/);
  });

  test('cancelled by the referrer: the Task becomes cancelled and the ServiceRequest revoked', async () => {
    const { id, taskId } = await delivered();
    const res = await api(`/referrals/${id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'Patient chose another centre' }) });
    expect(res.status).toBe(202);
    const v = await eventually(async () => {
      const r = (await api(`/referrals/${id}`)).body;
      return r.status === 'cancelled' ? r : undefined;
    });
    expect(v.statusReason).toBe('Patient chose another centre');
    const task = await fhir<Task>(`Task/${taskId}`);
    expect(task.status).toBe('cancelled');
    expect(task.statusReason?.text).toBe('Patient chose another centre');
    const sr = await fhir<any>(v.fhir.serviceRequest);
    expect(sr.status).toBe('revoked');
  });

  test('cancel answers 409 once work has started, and needs a reason', async () => {
    const { id, taskId } = await delivered();
    expect((await api(`/referrals/${id}/cancel`, { method: 'POST', body: '{}' })).status).toBe(422);
    await centreSets(taskId, { status: 'in-progress' });
    await after(id);
    const res = await api(`/referrals/${id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'changed mind' }) });
    expect(res.status).toBe(409);
    expect(res.body.resourceType).toBe('OperationOutcome');
    expect((await fhir<Task>(`Task/${taskId}`)).status).toBe('in-progress');
  });

  test('a burst of changes longer than the page cap is taken in one cycle, not re-read forever', async () => {
    const referrals = await Promise.all(Array.from({ length: 55 }, () => delivered()));
    for (const r of referrals) await centreSets(r.taskId, { status: 'accepted' });
    // One Task per page: the client stops after 50 pages; the poller must resume past them.
    const tiny = new Poller(gw.db, gw.destinations, gw.adapters, { cron: '* * * * *', overlapMs: 0, pageSize: 1 });
    const [cycle] = await tiny.pollOnce({ force: true });
    expect(cycle.error).toBeUndefined();
    for (const r of referrals) {
      expect((await getReferral(gw.db, r.id))?.status).toBe('accepted');
    }
  }, 60_000);

  test('documents added later reach the centre linked to the ServiceRequest', async () => {
    const { id } = await delivered();
    const res = await api(`/referrals/${id}/documents`, {
      method: 'POST',
      body: JSON.stringify({
        documents: [{ kind: 'genomic-report', title: 'NGS panel', contentType: 'text/plain', data: Buffer.from('BRCA2 negative').toString('base64') }],
      }),
    });
    expect(res.status).toBe(202);
    const v = await eventually(async () => {
      const r = (await api(`/referrals/${id}`)).body;
      return r.fhir.documents.length === 3 ? r : undefined;
    });
    const doc = await fhir<DocumentReference>(v.fhir.documents[2]);
    expect(doc.context?.related?.map((r) => r.reference)).toContain(v.fhir.serviceRequest);
    expect(doc.type?.coding?.[0]?.code).toBe('51969-4');
  });
});
