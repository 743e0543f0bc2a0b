import { readFileSync } from 'node:fs';
import { referralSchema } from '../../src/model';
import type { ReferralStatus } from '../../src/model';
import { storeBackends, referralWithEvents as storedReferralWithEvents } from '../helpers/db';
import { changeStatus, type Db, leasedQueue, webhookQueue } from '../../src/store';

const sample = referralSchema.parse({
  ...JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')),
  callbackUrl: 'https://ehr.example.org/hooks/referrals?token=t0k3n',
});

const LEASE = 60_000;
const later = (ms: number): Date => new Date(Date.now() + ms);

describe.each(storeBackends())('webhook outbox on %s', (_name, open) => {
  let db: Db;

  beforeEach(async () => {
    db = await open();
  });
  afterEach(async () => {
    await db.close();
  });

  /** A referral with a callbackUrl moved through `statuses`: one queued webhook per change. */
  const referralWithEvents = (...statuses: ReferralStatus[]): Promise<string> => storedReferralWithEvents(db, sample, statuses);

  test('status changes queue events numbered in order, pending and due, with the exact body', async () => {
    const id = await referralWithEvents('sent', 'accepted');
    const rows = await leasedQueue.forReferral(db, webhookQueue, id);
    expect(rows.map((r) => [r.seq, r.state, r.attempts])).toEqual([
      [1, 'pending', 0],
      [2, 'pending', 0],
    ]);
    expect(JSON.parse(rows[1].payload)).toMatchObject({ type: 'referral.status-changed', referralId: id, status: 'accepted', previousStatus: 'sent' });
    expect(rows[0].url).toBe(sample.callbackUrl);
  });

  test('events of one referral are claimed one at a time, in order; other referrals are not held back', async () => {
    const a = await referralWithEvents('sent', 'accepted', 'completed');
    const b = await referralWithEvents('sent', 'accepted');
    const first = await leasedQueue.claim(db, webhookQueue, 'w1', 10, LEASE, later(10));
    // Only the first event of each referral: the later ones wait for it.
    expect(first.map((e) => [e.referralId, e.seq]).sort()).toEqual(
      [
        [a, 1],
        [b, 1],
      ].sort()
    );
    expect(await leasedQueue.claim(db, webhookQueue, 'w2', 10, LEASE, later(10))).toEqual([]);

    // A's first event keeps failing (rescheduled into the future): A's later events stay blocked, B moves on.
    const a1 = first.find((e) => e.referralId === a)!;
    const b1 = first.find((e) => e.referralId === b)!;
    expect(
      await leasedQueue.settle(db, webhookQueue, a1.id, 'w1', {
        state: 'retry',
        attempts: 1,
        nextAttemptAt: later(3600_000).toISOString(),
        lastError: 'HTTP 500',
      })
    ).toBe(true);
    expect(await leasedQueue.settle(db, webhookQueue, b1.id, 'w1', { state: 'done', attempts: 1 })).toBe(true);
    const second = await leasedQueue.claim(db, webhookQueue, 'w2', 10, LEASE, later(10));
    expect(second.map((e) => [e.referralId, e.seq])).toEqual([[b, 2]]);

    // Once A's first event is delivered, its second (and only its second) becomes claimable.
    await leasedQueue.settle(db, webhookQueue, second[0].id, 'w2', { state: 'done', attempts: 1 });
    const a1Again = await leasedQueue.claim(db, webhookQueue, 'w3', 10, LEASE, later(3600_000 + 10));
    expect(a1Again.map((e) => [e.referralId, e.seq, e.attempts])).toEqual([[a, 1, 1]]);
    await leasedQueue.settle(db, webhookQueue, a1Again[0].id, 'w3', { state: 'done', attempts: 2 });
    const a2 = await leasedQueue.claim(db, webhookQueue, 'w3', 10, LEASE, later(3600_000 + 20));
    expect(a2.map((e) => [e.referralId, e.seq])).toEqual([[a, 2]]);
    expect((await leasedQueue.entry(db, webhookQueue, a1.id))?.attempts).toBe(2);
  });

  test('workers claiming at the same time never get the same event, nor two events of one referral', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 12; i++) ids.push(await referralWithEvents('sent', 'accepted'));
    const at = later(10);
    const results = await Promise.all(['w1', 'w2', 'w3', 'w4'].map((w) => leasedQueue.claim(db, webhookQueue, w, 12, LEASE, at)));
    const all = results.flat();
    expect(new Set(all.map((e) => e.id)).size).toBe(all.length);
    expect(all.every((e) => e.seq === 1)).toBe(true);
    expect(all.map((e) => e.referralId).sort()).toEqual([...ids].sort());
    // The leases are recorded for the worker that won each row.
    for (const [i, w] of ['w1', 'w2', 'w3', 'w4'].entries()) {
      for (const e of results[i]) expect((await leasedQueue.entry(db, webhookQueue, e.id))?.lockedBy).toBe(w);
    }
  });

  test('an expired lease lets another worker take over, and the stale worker can no longer record an outcome', async () => {
    await referralWithEvents('sent');
    const t0 = later(10);
    const [held] = await leasedQueue.claim(db, webhookQueue, 'w1', 1, 1000, t0);
    expect(held).toBeDefined();
    expect(await leasedQueue.claim(db, webhookQueue, 'w2', 1, 1000, new Date(t0.getTime() + 500))).toEqual([]);
    const [taken] = await leasedQueue.claim(db, webhookQueue, 'w2', 1, 1000, new Date(t0.getTime() + 1500));
    expect(taken.id).toBe(held.id);
    expect(await leasedQueue.settle(db, webhookQueue, held.id, 'w1', { state: 'done', attempts: 1 })).toBe(false);
    expect((await leasedQueue.entry(db, webhookQueue, held.id))?.state).toBe('pending');
    expect(await leasedQueue.settle(db, webhookQueue, held.id, 'w2', { state: 'done', attempts: 1 })).toBe(true);
    expect((await leasedQueue.entry(db, webhookQueue, held.id))?.state).toBe('delivered');
  });

  test('releaseLeases frees only that worker’s pending events', async () => {
    await referralWithEvents('sent');
    await referralWithEvents('sent');
    const t0 = later(10);
    const [one] = await leasedQueue.claim(db, webhookQueue, 'w1', 1, LEASE, t0);
    const [two] = await leasedQueue.claim(db, webhookQueue, 'w2', 1, LEASE, t0);
    await leasedQueue.releaseLeases(db, webhookQueue, 'w1');
    expect((await leasedQueue.entry(db, webhookQueue, one.id))?.lockedBy).toBeNull();
    expect((await leasedQueue.entry(db, webhookQueue, two.id))?.lockedBy).toBe('w2');
    const again = await leasedQueue.claim(db, webhookQueue, 'w3', 5, LEASE, t0);
    expect(again.map((e) => e.id)).toEqual([one.id]);
  });

  test('a dead-lettered event no longer blocks later ones; requeue replays it with the same id', async () => {
    const id = await referralWithEvents('sent', 'accepted');
    const [first] = await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(10));
    expect(
      await leasedQueue.settle(db, webhookQueue, first.id, 'w1', {
        state: 'failed',
        attempts: 10,
        lastError: 'gave up after 10 attempts; last error: HTTP 500',
      })
    ).toBe(true);
    const failed = await leasedQueue.list(db, webhookQueue, 'failed');
    expect(failed.map((e) => [e.id, e.attempts, e.lastError])).toEqual([[first.id, 10, 'gave up after 10 attempts; last error: HTTP 500']]);

    const [second] = await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(10));
    expect([second.referralId, second.seq]).toEqual([id, 2]);
    await leasedQueue.settle(db, webhookQueue, second.id, 'w1', { state: 'done', attempts: 1 });

    expect(await leasedQueue.requeue(db, webhookQueue, second.id)).toBe(false); // only failed events are re-queued
    expect(await leasedQueue.requeue(db, webhookQueue, 'wh_nope')).toBe(false);
    expect(await leasedQueue.requeue(db, webhookQueue, first.id)).toBe(true);
    const replay = await leasedQueue.entry(db, webhookQueue, first.id);
    expect(replay).toMatchObject({ state: 'pending', attempts: 0, lastError: null, lockedBy: null });
    expect(await leasedQueue.list(db, webhookQueue, 'failed')).toEqual([]);
    expect((await leasedQueue.list(db, webhookQueue, 'pending')).map((e) => e.id)).toEqual([first.id]);
    const [again] = await leasedQueue.claim(db, webhookQueue, 'w2', 5, LEASE, later(10));
    expect(again.id).toBe(first.id);
    expect(again.payload).toBe(first.payload);
  });

  test('a re-queued earlier event holds back the later events that are still pending', async () => {
    const id = await referralWithEvents('sent');
    const [first] = await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(10));
    await leasedQueue.settle(db, webhookQueue, first.id, 'w1', { state: 'failed', attempts: 3, lastError: 'HTTP 500' });
    await changeStatus(db, id, { status: 'accepted' });
    await leasedQueue.requeue(db, webhookQueue, first.id);
    const claimed = await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(10));
    expect(claimed.map((e) => e.seq)).toEqual([1]);
    expect(await leasedQueue.pendingCount(db, webhookQueue)).toBe(2);
  });

  test('events not yet due are not claimed', async () => {
    await referralWithEvents('sent');
    const [e] = await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(10));
    await leasedQueue.settle(db, webhookQueue, e.id, 'w1', { state: 'retry', attempts: 1, nextAttemptAt: later(60_000).toISOString(), lastError: 'HTTP 503' });
    expect(await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(30_000))).toEqual([]);
    expect((await leasedQueue.claim(db, webhookQueue, 'w1', 5, LEASE, later(61_000))).map((x) => x.id)).toEqual([e.id]);
  });
});
