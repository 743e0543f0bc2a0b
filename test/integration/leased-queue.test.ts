import { readFileSync } from 'node:fs';
import { referralSchema } from '../../src/model';
import {
  changeStatus,
  type Db,
  deliveryQueue,
  hl7ReturnQueue,
  insertReferral,
  type LeasedQueue,
  leasedQueue,
  newReferralId,
  nowIso,
  queueCancel,
  webhookQueue,
} from '../../src/store';
import { referralWithEvents, storeBackends } from '../helpers/db';

// The one leased queue under every outbox: the same claim, lease, settle and re-queue rules hold for the delivery
// outbox, the webhook outbox and the HL7 v2 outbox, on each store backend.

const sample = referralSchema.parse({
  ...JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')),
  callbackUrl: 'https://ehr.example.org/hooks/referrals',
});

interface Row {
  id: string;
  referralId: string;
  state: string;
  attempts: number;
  createdAt: string;
  lastError: string | null;
}

/** A referral with two rows in the queue, the first queued before the second. */
async function twoRows(db: Db, queue: LeasedQueue<Row>): Promise<string> {
  if (queue === (webhookQueue as LeasedQueue<unknown>)) return referralWithEvents(db, sample, ['sent', 'accepted']);
  if (queue === (hl7ReturnQueue as LeasedQueue<unknown>)) {
    // An HL7 v2 referral whose client has a return channel: each status change queues a status message.
    const id = newReferralId();
    const hl7Origin = {
      family: 'REF' as const,
      sendingApplication: 'EPIC',
      sendingFacility: 'CITY-HOSP',
      receivingApplication: 'RG',
      receivingFacility: 'RG',
      version: '2.5.1',
      referralIdentifier: `E-${id}`,
      channel: { host: '127.0.0.1', port: 2576 },
    };
    await insertReferral(db, {
      id,
      clientId: 'c',
      externalId: `E-${id}`,
      idempotencyKey: null,
      requestHash: 'h',
      destination: 'sandbox',
      payload: sample,
      at: nowIso(),
      hl7Origin,
    });
    for (const status of ['sent', 'accepted'] as const) await changeStatus(db, id, { status });
    return id;
  }
  const id = newReferralId();
  await insertReferral(db, {
    id,
    clientId: 'c',
    externalId: `E-${id}`,
    idempotencyKey: null,
    requestHash: 'h',
    destination: 'sandbox',
    payload: sample,
    at: nowIso(),
  });
  await new Promise((r) => setTimeout(r, 5)); // a later created_at
  await queueCancel(db, id, { reason: 'the patient chose another centre' });
  return id;
}

const queues: Array<[string, LeasedQueue<Row>, string]> = [
  ['delivery outbox', deliveryQueue as LeasedQueue<Row>, 'done'],
  ['webhook outbox', webhookQueue as LeasedQueue<Row>, 'delivered'],
  ['HL7 v2 outbox', hl7ReturnQueue as LeasedQueue<Row>, 'acknowledged'],
];
const later = (ms: number): Date => new Date(Date.now() + ms);

describe.each(storeBackends())('leased queue on %s', (_backend, open) => {
  let db: Db;
  beforeEach(async () => {
    db = await open();
  });
  afterEach(async () => {
    await db.close();
  });

  describe.each(queues)('%s', (_name, queue, doneState) => {
    test("a referral's rows are claimed one at a time, in order; a later row waits while an earlier one is pending", async () => {
      const id = await twoRows(db, queue);
      const [first, second] = await leasedQueue.forReferral(db, queue, id);
      const claimed = await leasedQueue.claim(db, queue, 'w1', 10, 60_000, later(10));
      expect(claimed.map((r) => r.id)).toEqual([first.id]);
      expect(await leasedQueue.claim(db, queue, 'w2', 10, 60_000, later(10))).toEqual([]);
      expect(await leasedQueue.settle(db, queue, first.id, 'w1', { state: 'done', attempts: 1 })).toBe(true);
      expect((await leasedQueue.claim(db, queue, 'w2', 10, 60_000, later(10))).map((r) => r.id)).toEqual([second.id]);
      expect((await leasedQueue.entry(db, queue, first.id))?.state).toBe(doneState);
    });

    test('an outcome is recorded only by the worker holding the lease; an expired lease passes to another worker', async () => {
      const id = await twoRows(db, queue);
      const t0 = later(10);
      const [held] = await leasedQueue.claim(db, queue, 'w1', 1, 1000, t0);
      expect(held.referralId).toBe(id);
      expect(await leasedQueue.claim(db, queue, 'w2', 1, 1000, new Date(t0.getTime() + 500))).toEqual([]);
      const [taken] = await leasedQueue.claim(db, queue, 'w2', 1, 1000, new Date(t0.getTime() + 1500));
      expect(taken.id).toBe(held.id);
      // The first worker's attempt neither starts nor settles any more.
      expect(await leasedQueue.beginAttempt(db, queue, held, 'w1')).toBeUndefined();
      expect(await leasedQueue.settle(db, queue, held.id, 'w1', { state: 'failed', attempts: 1, lastError: 'late' })).toBe(false);
      expect(await leasedQueue.beginAttempt(db, queue, taken, 'w2')).toBe(1);
      const retryAt = later(60_000).toISOString();
      expect(await leasedQueue.settle(db, queue, held.id, 'w2', { state: 'retry', attempts: 1, nextAttemptAt: retryAt, lastError: 'HTTP 503' })).toBe(true);
      const row = await leasedQueue.entry(db, queue, held.id);
      expect(row).toMatchObject({ state: 'pending', attempts: 1, lastError: 'HTTP 503' });
      // Not due until its retry time.
      expect(await leasedQueue.claim(db, queue, 'w3', 1, 1000, later(30_000))).toEqual([]);
      expect(await leasedQueue.claim(db, queue, 'w3', 1, 1000, later(61_000))).toHaveLength(1);
    });

    test('a released lease can be taken at once; a dead letter is re-queued with no attempts counted', async () => {
      const id = await twoRows(db, queue);
      const [first] = await leasedQueue.claim(db, queue, 'w1', 1, 60_000, later(10));
      await leasedQueue.releaseLeases(db, queue, 'w1');
      const [again] = await leasedQueue.claim(db, queue, 'w2', 1, 60_000, later(10));
      expect(again.id).toBe(first.id);
      expect(await leasedQueue.settle(db, queue, first.id, 'w2', { state: 'failed', attempts: 7, lastError: 'gave up after 7 attempts' })).toBe(true);
      expect((await leasedQueue.list(db, queue, 'failed')).map((r) => r.id)).toEqual([first.id]);
      // A failed row no longer holds back its referral's later row.
      const [second] = await leasedQueue.claim(db, queue, 'w2', 5, 60_000, later(10));
      expect(second.referralId).toBe(id);
      expect(second.id).not.toBe(first.id);

      expect(await leasedQueue.requeue(db, queue, second.id)).toBe(false); // not failed: nothing to re-queue
      expect(await leasedQueue.requeue(db, queue, first.id)).toBe(true);
      const requeued = await leasedQueue.entry(db, queue, first.id);
      expect(requeued).toMatchObject({ state: 'pending', attempts: 0, lastError: null });
      // The webhook outbox restarts the age window; the delivery outbox keeps created_at, which orders its rows.
      if (queue.requeueRestartsAge) expect(requeued?.createdAt).not.toBe(first.createdAt);
      else expect(requeued?.createdAt).toBe(first.createdAt);
      expect(await leasedQueue.pendingCount(db, queue)).toBe(2);
    });
  });
});
