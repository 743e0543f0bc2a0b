import type { Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { serviceDatabases } from '../helpers/db';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { deliveryQueue, getReferral, leasedQueue } from '../../src/store';

const DAY = 24 * 3600_000;

/**
 * Retention on the running service: once a referral's loop is closed, the gateway drops the inline
 * document bytes after DOCUMENT_RETENTION_DAYS and the whole referral after REFERRAL_RETENTION_DAYS,
 * and leaves open referrals alone.
 */
describe.each(serviceDatabases())('retention of closed referrals, stored on %s', (_name, database) => {
  let gw: Gateway;
  let fhirBase: string;
  let drop: () => Promise<void>;

  const api = (path: string, init: RequestInit = {}): Promise<Response> =>
    fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', ...(init.headers ?? {}) } });
  const view = async (id: string): Promise<any> => (await api(`/referrals/${id}`)).json();

  beforeAll(async () => {
    const db = await database();
    drop = db.drop;
    gw = await startGateway({ DATABASE_URL: db.url, DOCUMENT_RETENTION_DAYS: '30', REFERRAL_RETENTION_DAYS: '365' });
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(async () => {
    await gw.stop();
    await drop();
  });

  test('a completed referral loses its document bytes after 30 days and is deleted after a year; an open one keeps everything', async () => {
    const body: Record<string, any> = { ...fixture('breast-second-opinion'), externalId: 'EHR-RETAIN-1' };
    const closed = (await (await api('/referrals', { method: 'POST', body: JSON.stringify(body) })).json()) as { id: string };
    const open = (await (await api('/referrals', { method: 'POST', body: JSON.stringify({ ...body, externalId: 'EHR-RETAIN-2' }) })).json()) as { id: string };
    const sent = await eventually(async () => {
      const [a, b] = await Promise.all([view(closed.id), view(open.id)]);
      return a.status === 'sent' && b.status === 'sent' ? a : undefined;
    });
    // A document added later, delivered too.
    const later = { kind: 'clinical-note', title: 'Oncologist letter', contentType: 'text/plain', data: Buffer.from('Letter text').toString('base64') };
    expect((await api(`/referrals/${closed.id}/documents`, { method: 'POST', body: JSON.stringify({ documents: [later] }) })).status).toBe(202);
    await eventually(async () => (await leasedQueue.forReferral(gw.db, deliveryQueue, closed.id)).every((e) => e.state === 'done'));

    // The centre completes the Task; the poll brings it back.
    const task = (await (await fetch(`${fhirBase}/${sent.fhir.task}`)).json()) as Task;
    const put = await fetch(`${fhirBase}/Task/${task.id}`, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({
        ...task,
        status: 'completed',
        output: [{ type: { text: 'opinion report' }, valueReference: { reference: sent.fhir.documents[0] } }],
      }),
    });
    expect(put.status).toBe(200);
    await gw.poller.pollOnce();
    expect((await view(closed.id)).status).toBe('completed');
    // Its status webhooks go out first: retention waits for them.
    const pendingWebhooks = () =>
      gw.db.kysely.selectFrom('webhook_outbox').select('id').where('referral_id', '=', closed.id).where('state', '=', 'pending').execute();
    await eventually(async () => (await pendingWebhooks()).length === 0);

    // Nothing is due yet.
    expect(await gw.retention.run()).toMatchObject({ referralsStripped: 0, referralsDeleted: 0 });

    const inline = body.documents.filter((d: { data?: string }) => d.data).length;
    const month = await gw.retention.run(new Date(Date.now() + 31 * DAY));
    expect(month).toMatchObject({ referralsStripped: 1, documentsStripped: inline + 1, referralsDeleted: 0 });
    const stripped = await view(closed.id);
    expect(stripped.status).toBe('completed');
    expect(stripped.documentsRemovedAt).toEqual(expect.any(String));
    expect(stripped.history.map((h: { status: string }) => h.status)).toEqual(['queued', 'sent', 'completed']);
    const stored = await getReferral(gw.db, closed.id);
    expect(stored?.payload.documents.some((d) => d.data !== undefined)).toBe(false);
    expect(JSON.stringify(await leasedQueue.forReferral(gw.db, deliveryQueue, closed.id))).not.toContain(later.data);
    // The report still comes back, and the same submission is still recognised as a replay.
    expect((await api(`/referrals/${closed.id}/report/content`)).status).toBe(200);
    const replay = await api('/referrals', { method: 'POST', body: JSON.stringify(body) });
    expect(replay.status).toBe(200);
    expect(((await replay.json()) as { id: string }).id).toBe(closed.id);
    // The open referral is untouched.
    expect((await view(open.id)).documentsRemovedAt).toBeNull();
    expect((await getReferral(gw.db, open.id))?.payload.documents.some((d) => d.data !== undefined)).toBe(true);

    // A second run the same day has nothing left to do.
    expect(await gw.retention.run(new Date(Date.now() + 31 * DAY))).toMatchObject({ referralsStripped: 0, documentsStripped: 0 });

    const year = await gw.retention.run(new Date(Date.now() + 366 * DAY));
    expect(year).toMatchObject({ referralsDeleted: 1 });
    expect((await api(`/referrals/${closed.id}`)).status).toBe(404);
    expect((await api(`/referrals/${open.id}`)).status).toBe(200);
    const metrics = await (await fetch(`${gw.url}/metrics`)).text();
    expect(metrics).toMatch(/referral_retention_total\{action="referral-deleted"\} [1-9]/);
  });
});
