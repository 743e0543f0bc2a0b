import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import type { Gateway } from '../../src/gateway';
import { ADMIN_KEY, eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { changeStatus, deliveryQueue, getReferral, leasedQueue } from '../../src/store';
import { finishOutbox } from '../helpers/db';

const run = promisify(execFile);

/** `npm run admin -- ...`: an operator lists and replays dead letters and runs retention from a shell. */
describe('admin command line (src/cli/admin.ts)', () => {
  let gw: Gateway;

  const admin = async (args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> => {
    try {
      const r = await run(process.execPath, ['--import', 'tsx', 'src/cli/admin.ts', ...args], {
        env: { ...process.env, GATEWAY_URL: gw.url, ADMIN_API_KEY: ADMIN_KEY, ...env },
      });
      return { code: 0, stdout: r.stdout, stderr: r.stderr };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  };

  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('lists a dead-lettered delivery, re-queues it by referral id, and the referral is then delivered', async () => {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId: 'EHR-ADMIN-CLI-1' }),
    });
    const { id } = (await res.json()) as { id: string };
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent');
    // As if the centre had refused it: dead-letter the entry and fail the referral.
    const [entry] = await leasedQueue.forReferral(gw.db, deliveryQueue, id);
    await finishOutbox(gw.db, entry.id, 'failed', 3, '400: Patient.birthDate is required by this centre');
    await changeStatus(gw.db, id, { status: 'delivery-failed', reason: 'refused by the centre' });

    const listed = await admin(['deliveries']);
    expect(listed.code).toBe(0);
    expect(listed.stdout).toContain(`${entry.id}  ${id}  submit  attempts=3  400: Patient.birthDate is required by this centre`);
    const json = await admin(['deliveries', 'failed', '--json']);
    expect(JSON.parse(json.stdout).items.map((e: { id: string }) => e.id)).toContain(entry.id);

    const retried = await admin(['retry', id]);
    expect(retried).toMatchObject({ code: 0, stdout: `re-queued ${entry.id}\n` });
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent');
    expect((await admin(['deliveries'])).stdout).not.toContain(entry.id);
  });

  test('a refusal by the gateway prints its reason and exits 1; bad usage exits 2; an unreachable gateway exits 1', async () => {
    expect(await admin(['retry', 'ref_unknown'])).toMatchObject({ code: 1, stderr: '404: no failed delivery ref_unknown\n' });
    expect(await admin(['webhook-retry', 'wh_unknown'])).toMatchObject({ code: 1, stderr: expect.stringContaining('404: no failed webhook wh_unknown') });
    expect(await admin(['deliveries'], { ADMIN_API_KEY: 'wrong-key-000' })).toMatchObject({ code: 1, stderr: expect.stringMatching(/^401: /) });
    expect(await admin(['deliveries', 'lost'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('deliveries takes failed, pending or done, not lost'),
    });
    expect(await admin([])).toMatchObject({ code: 2, stderr: expect.stringContaining('usage: npm run admin') });
    expect(await admin(['deliveries'], { ADMIN_API_KEY: '' })).toMatchObject({ code: 2, stderr: expect.stringContaining('ADMIN_API_KEY is not set') });
    expect(await admin(['deliveries'], { GATEWAY_URL: 'http://127.0.0.1:9' })).toMatchObject({
      code: 1,
      stderr: expect.stringContaining('cannot reach the gateway at http://127.0.0.1:9'),
    });
  });

  test('webhooks and retention: what the dispatcher gave up on, replayed, and retention run on demand', async () => {
    expect(await admin(['webhooks'])).toMatchObject({ code: 0, stdout: 'no failed webhooks\n' });
    // The first referral's "sent" webhook, as if the EHR's receiver had stayed down for 24 hours.
    const k = gw.db.kysely;
    const hook = await k.selectFrom('webhook_outbox').select(['id', 'referral_id']).orderBy('created_at').executeTakeFirstOrThrow();
    await k.updateTable('webhook_outbox').set({ state: 'failed', attempts: 10, last_error: '503 from receiver' }).where('id', '=', hook.id).execute();
    const listed = await admin(['webhooks']);
    expect(listed.stdout).toContain(`${hook.id}  ${hook.referral_id}  sent  attempts=10  503 from receiver`);
    expect(await admin(['webhook-retry', hook.id])).toMatchObject({ code: 0, stdout: `re-queued ${hook.id}\n` });
    await eventually(async () => (await k.selectFrom('webhook_outbox').select('state').where('id', '=', hook.id).executeTakeFirst())?.state === 'delivered');

    const r = await admin(['retention']);
    expect(r).toMatchObject({ code: 0, stdout: 'document bytes removed from 0 referrals (0 documents); 0 referrals deleted; 0 unreferenced blobs removed\n' });
    const api = await fetch(`${gw.url}/admin/retention/run`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${ADMIN_KEY}`, 'Content-Type': 'application/json' },
      body: '{}',
    });
    expect(await api.json()).toEqual({ referralsStripped: 0, documentsStripped: 0, referralsDeleted: 0, blobsDeleted: 0 });
  });
});
