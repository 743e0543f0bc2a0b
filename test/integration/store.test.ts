import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Kysely, sql } from 'kysely';
import { referralSchema, type ReferralDocument } from '../../src/model';
import { type CheckpointStats, startCheckpointer } from '../../src/store/checkpointer';
import { openDb, type Db } from '../../src/store/db';
import { newReferralId, nowIso } from '../../src/store/ids';
import { migrate } from '../../src/store/migrations';
import { closedStatuses } from '../../src/retention/policy';
import { finishOutbox, rescheduleOutbox, serviceDatabases, storeBackends } from '../helpers/db';
import {
  changeStatus,
  closedBefore,
  deleteClosed,
  deliveryQueue,
  findForIdempotency,
  getReferral,
  getWatermark,
  insertReferral,
  leasedQueue,
  listReferrals,
  noteStatus,
  queueDocuments,
  referralHistory,
  removeDocumentBytes,
  setWatermark,
} from '../../src/store';

const sample = referralSchema.parse(JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')));

describe.each(storeBackends())('store on %s', (_name, open) => {
  let db: Db;

  beforeEach(async () => {
    db = await open();
  });
  afterEach(async () => {
    await db.close();
  });

  const newReferral = (over: Partial<{ clientId: string; externalId: string; key: string | null; hash: string; at: string }> = {}) => ({
    id: newReferralId(),
    clientId: over.clientId ?? 'city-hospital',
    externalId: over.externalId ?? `EHR-${Math.random().toString(36).slice(2)}`,
    idempotencyKey: over.key ?? null,
    requestHash: over.hash ?? 'h1',
    destination: 'sandbox',
    payload: sample,
    at: over.at ?? nowIso(),
  });

  test('a new referral is stored with its first history entry and its outbox entry, atomically', async () => {
    const r = newReferral();
    const created = await insertReferral(db, r);
    expect(created?.status).toBe('queued');
    expect(created?.payload.patient.name.family).toBe('Rao');
    expect(await referralHistory(db, r.id)).toEqual([{ status: 'queued', at: r.at }]);
    const outbox = await leasedQueue.forReferral(db, deliveryQueue, r.id);
    expect(outbox).toHaveLength(1);
    expect(outbox[0]).toMatchObject({ kind: 'submit', state: 'pending', attempts: 0 });
  });

  test('the same externalId for the same client is refused, and nothing half-written stays', async () => {
    const a = newReferral({ externalId: 'EHR-1' });
    expect(await insertReferral(db, a)).not.toBeNull();
    const b = newReferral({ externalId: 'EHR-1' });
    expect(await insertReferral(db, b)).toBeNull();
    expect(await getReferral(db, b.id)).toBeNull();
    expect(await leasedQueue.forReferral(db, deliveryQueue, b.id)).toHaveLength(0);
    expect(await referralHistory(db, b.id)).toHaveLength(0);
    // another client may use the same externalId
    expect(await insertReferral(db, newReferral({ externalId: 'EHR-1', clientId: 'other' }))).not.toBeNull();
  });

  test('idempotency lookups find by key or by externalId, scoped to the client', async () => {
    const a = newReferral({ externalId: 'EHR-2', key: 'k-1', hash: 'abc' });
    await insertReferral(db, a);
    expect((await findForIdempotency(db, 'city-hospital', 'other-ext', 'k-1'))?.id).toBe(a.id);
    expect((await findForIdempotency(db, 'city-hospital', 'EHR-2', null))?.requestHash).toBe('abc');
    expect(await findForIdempotency(db, 'someone-else', 'EHR-2', 'k-1')).toBeUndefined();
  });

  test('a client sees only its own referrals', async () => {
    const a = newReferral({ clientId: 'a' });
    await insertReferral(db, a);
    expect(await getReferral(db, a.id, { clientId: 'a' })).not.toBeNull();
    expect(await getReferral(db, a.id, { clientId: 'b' })).toBeNull();
    expect(await getReferral(db, a.id, { payload: false, clientId: 'b' })).toBeNull();
  });

  test('a referral can be read without its submission (GET /referrals/{id} does not need megabytes of documents)', async () => {
    const r = newReferral({ clientId: 'a' });
    await insertReferral(db, r);
    const light = await getReferral(db, r.id, { payload: false, clientId: 'a' });
    expect(light).toMatchObject({ id: r.id, externalId: r.externalId, status: 'queued', destination: 'sandbox' });
    expect(() => light?.payload).toThrow(/without its payload/);
    expect((await getReferral(db, r.id, { clientId: 'a' }))?.payload.patient.name.family).toBe('Rao');
  });

  test('status changes append to the history in order, and repeats do not', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    await changeStatus(db, r.id, { status: 'sent', fhir: { baseUrl: 'http://x', task: 'Task/1', documents: [] } });
    await changeStatus(db, r.id, { status: 'sent', taskVersion: '2' });
    await changeStatus(db, r.id, { status: 'accepted', reason: 'tumour board intake' });
    const h = await referralHistory(db, r.id);
    expect(h.map((x) => x.status)).toEqual(['queued', 'sent', 'accepted']);
    expect(h[2].reason).toBe('tumour board intake');
    const got = await getReferral(db, r.id);
    expect(got?.fhir?.task).toBe('Task/1');
    expect(got?.taskVersion).toBe('2');
    expect(got?.statusReason).toBe('tumour board intake');
  });

  test('concurrent changes of one referral (two pollers, a poll and a cancel) apply once each: no duplicate history or webhook', async () => {
    const r = { ...newReferral(), payload: { ...sample, callbackUrl: 'https://ehr.example.org/hooks' } };
    await insertReferral(db, r);
    // Ten writers see the same Task change at once, as two instances polling the same centre would.
    const results = await Promise.all(Array.from({ length: 10 }, () => changeStatus(db, r.id, { status: 'accepted', reason: 'seen by a poller' })));
    expect(results.filter((x) => x && x.previous !== 'accepted')).toHaveLength(1);
    // Notes and status changes racing each other still number the history without a gap or clash.
    await Promise.all([
      ...Array.from({ length: 5 }, (_, i) => noteStatus(db, r.id, 'accepted', `warning ${i}`)),
      changeStatus(db, r.id, { status: 'in-progress' }),
      changeStatus(db, r.id, { status: 'in-progress' }),
    ]);
    const h = await referralHistory(db, r.id);
    expect(h).toHaveLength(1 + 1 + 5 + 1); // queued, accepted, five notes, in-progress
    expect(h.filter((x) => x.status === 'in-progress')).toHaveLength(1);
    const hooks = await db.kysely.selectFrom('webhook_outbox').select(['seq', 'payload']).where('referral_id', '=', r.id).orderBy('seq').execute();
    expect(hooks.map((w) => (JSON.parse(w.payload) as { status: string }).status)).toEqual(['accepted', 'in-progress']);
    expect(hooks.map((w) => w.seq)).toEqual([1, 2]);
  });

  test('documents added concurrently to one referral get distinct numbers', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    const starts = await Promise.all(
      Array.from({ length: 6 }, () => queueDocuments(db, r.id, [{ kind: 'other' }, { kind: 'other' }] as ReferralDocument[], 2))
    );
    expect(starts.map((x) => x.startIndex).sort((a, b) => a - b)).toEqual([2, 4, 6, 8, 10, 12]);
  });

  describe('retention', () => {
    const due = { statuses: closedStatuses, cutoff: '2099-01-01T00:00:00.000Z' };
    /** Everything for the referral sent: its deliveries and its status webhooks. */
    const finishAll = async (id: string): Promise<void> => {
      for (const e of await leasedQueue.forReferral(db, deliveryQueue, id)) await finishOutbox(db, e.id, 'done', 1, null);
      await db.kysely.updateTable('webhook_outbox').set({ state: 'delivered' }).where('referral_id', '=', id).execute();
    };
    const storedDocuments = async (id: string): Promise<Array<Record<string, unknown>>> => {
      const row = await db.kysely.selectFrom('referral_payloads').select('payload').where('referral_id', '=', id).executeTakeFirstOrThrow();
      return (JSON.parse(row.payload) as { documents: Array<Record<string, unknown>> }).documents;
    };

    test('only closed referrals with nothing left to send lose their document bytes, in the submission and in added documents', async () => {
      const open = newReferral();
      const closed = newReferral();
      const failedDelivery = newReferral();
      for (const r of [open, closed, failedDelivery]) await insertReferral(db, r);
      const extra: ReferralDocument = { kind: 'other', title: 'Later note', contentType: 'text/plain', data: Buffer.from('added later').toString('base64') };
      await queueDocuments(db, closed.id, [extra], sample.documents.length);
      await changeStatus(db, open.id, { status: 'sent' });
      // The submission is still pending: not due even once completed.
      await changeStatus(db, closed.id, { status: 'completed' });
      expect(await closedBefore(db.kysely, { ...due, documentsKept: true, noFailedDelivery: true, limit: 10 })).toEqual([]);
      await finishAll(closed.id);
      await finishAll(open.id);
      // A dead-lettered delivery an operator may re-queue keeps its bytes.
      await changeStatus(db, failedDelivery.id, { status: 'cancelled' });
      const [entry] = await leasedQueue.forReferral(db, deliveryQueue, failedDelivery.id);
      await finishOutbox(db, entry.id, 'failed', 3, 'centre down');
      expect(await closedBefore(db.kysely, { ...due, documentsKept: true, noFailedDelivery: true, limit: 10 })).toEqual([closed.id]);
      // Not yet past its cut-off.
      expect(await removeDocumentBytes(db, closed.id, { ...due, cutoff: '2000-01-01T00:00:00.000Z' })).toBeNull();

      const inline = sample.documents.filter((d) => d.data !== undefined).length;
      expect(await removeDocumentBytes(db, closed.id, due, '2030-01-01T00:00:00.000Z')).toBe(inline + 1);
      const docs = await storedDocuments(closed.id);
      expect(docs.every((d) => d.data === undefined)).toBe(true);
      expect(docs.filter((d) => d.dataRemoved)).toHaveLength(inline);
      const [added] = (await leasedQueue.forReferral(db, deliveryQueue, closed.id)).filter((e) => e.kind === 'documents');
      const addedPayload = added.payload as { documents: Array<Record<string, unknown>>; startIndex: number };
      expect(addedPayload.startIndex).toBe(sample.documents.length);
      expect(addedPayload.documents[0]).toMatchObject({ title: 'Later note', dataRemoved: { bytes: 'added later'.length } });
      expect(addedPayload.documents[0].data).toBeUndefined();
      const after = await getReferral(db, closed.id, { payload: false });
      expect(after).toMatchObject({
        status: 'completed',
        documentsRemovedAt: '2030-01-01T00:00:00.000Z',
        updatedAt: (await getReferral(db, closed.id, { payload: false }))?.updatedAt,
      });
      // Done once: not due again.
      expect(await removeDocumentBytes(db, closed.id, due)).toBeNull();
      // The others kept theirs.
      expect((await storedDocuments(open.id)).some((d) => typeof d.data === 'string')).toBe(true);
      expect((await storedDocuments(failedDelivery.id)).some((d) => typeof d.data === 'string')).toBe(true);
    });

    test('deleting a closed referral removes its submission, history and outboxes; a pending webhook holds it back', async () => {
      const r = { ...newReferral(), payload: { ...sample, callbackUrl: 'https://ehr.example.org/hooks' } };
      await insertReferral(db, r);
      await finishAll(r.id);
      await changeStatus(db, r.id, { status: 'rejected', reason: 'not our speciality' });
      expect(await deleteClosed(db, r.id, due)).toBe(false); // its status webhook is still pending
      await db.kysely.updateTable('webhook_outbox').set({ state: 'delivered' }).where('referral_id', '=', r.id).execute();
      expect(await closedBefore(db.kysely, { ...due, limit: 10 })).toEqual([r.id]);
      expect(await deleteClosed(db, r.id, due)).toBe(true);
      expect(await getReferral(db, r.id)).toBeNull();
      const k = db.kysely;
      for (const table of ['referral_payloads', 'referral_history', 'outbox', 'webhook_outbox'] as const) {
        expect(await k.selectFrom(table).select('referral_id').where('referral_id', '=', r.id).execute()).toEqual([]);
      }
    });
  });

  test('a conditional status change is not applied when its condition fails', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    await changeStatus(db, r.id, { status: 'sent' });
    const res = await changeStatus(db, r.id, { status: 'sent' }, (cur) => cur.status === 'queued');
    expect(res).toBeNull();
  });

  test('lists newest first with a cursor and filters', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = newReferral({ clientId: 'lister', at: new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString() });
      ids.push(r.id);
      await insertReferral(db, r);
    }
    await insertReferral(db, newReferral({ clientId: 'not-me' }));
    const p1 = await listReferrals(db, 'lister', { limit: 2 });
    expect(p1.items.map((i) => i.id)).toEqual([ids[4], ids[3]]);
    const p2 = await listReferrals(db, 'lister', { limit: 2, cursor: p1.next });
    expect(p2.items.map((i) => i.id)).toEqual([ids[2], ids[1]]);
    const p3 = await listReferrals(db, 'lister', { limit: 2, cursor: p2.next });
    expect(p3.items.map((i) => i.id)).toEqual([ids[0]]);
    expect(p3.next).toBeUndefined();
    await changeStatus(db, ids[1], { status: 'sent' });
    expect((await listReferrals(db, 'lister', { limit: 10, status: 'sent' })).items.map((i) => i.id)).toEqual([ids[1]]);
  });

  test('two workers never claim the same outbox entry', async () => {
    for (let i = 0; i < 6; i++) await insertReferral(db, newReferral());
    const [a, b] = await Promise.all([leasedQueue.claim(db, deliveryQueue, 'w1', 6, 60_000), leasedQueue.claim(db, deliveryQueue, 'w2', 6, 60_000)]);
    const all = [...a, ...b].map((e) => e.id);
    expect(all).toHaveLength(6);
    expect(new Set(all).size).toBe(6);
    expect(await leasedQueue.claim(db, deliveryQueue, 'w3', 6, 60_000)).toHaveLength(0);
  });

  test('an expired lease (a crashed worker) is claimed again; a finished entry never is', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    const [e] = await leasedQueue.claim(db, deliveryQueue, 'w1', 1, 1000, new Date());
    expect(e).toBeDefined();
    expect(await leasedQueue.claim(db, deliveryQueue, 'w2', 1, 1000, new Date())).toHaveLength(0);
    const later = new Date(Date.now() + 5000);
    const again = await leasedQueue.claim(db, deliveryQueue, 'w2', 1, 1000, later);
    expect(again.map((x) => x.id)).toEqual([e.id]);
    await finishOutbox(db, e.id, 'done', 1, null);
    expect(await leasedQueue.claim(db, deliveryQueue, 'w3', 1, 1000, new Date(Date.now() + 60_000))).toHaveLength(0);
  });

  test('entries of one referral are delivered in order', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    await new Promise((res) => setTimeout(res, 5));
    await queueDocuments(db, r.id, [], 0);
    const first = await leasedQueue.claim(db, deliveryQueue, 'w1', 5, 60_000);
    expect(first.map((e) => e.kind)).toEqual(['submit']);
    await finishOutbox(db, first[0].id, 'done', 1, null);
    const second = await leasedQueue.claim(db, deliveryQueue, 'w1', 5, 60_000);
    expect(second.map((e) => e.kind)).toEqual(['documents']);
  });

  test('a rescheduled entry waits for its time; a failed one can be re-queued', async () => {
    const r = newReferral();
    await insertReferral(db, r);
    const [e] = await leasedQueue.claim(db, deliveryQueue, 'w1', 1, 60_000);
    await rescheduleOutbox(db, e.id, 1, new Date(Date.now() + 60_000).toISOString(), '503: unavailable');
    expect(await leasedQueue.claim(db, deliveryQueue, 'w1', 1, 60_000)).toHaveLength(0);
    expect(await leasedQueue.claim(db, deliveryQueue, 'w1', 1, 60_000, new Date(Date.now() + 61_000))).toHaveLength(1);
    await finishOutbox(db, e.id, 'failed', 2, '400: refused');
    expect((await leasedQueue.list(db, deliveryQueue, 'failed')).map((x) => x.id)).toEqual([e.id]);
    expect(await leasedQueue.requeue(db, deliveryQueue, e.id)).toBe(true);
    expect((await leasedQueue.claim(db, deliveryQueue, 'w1', 1, 60_000)).map((x) => x.id)).toEqual([e.id]);
  });

  test('poll watermarks are kept per destination', async () => {
    expect(await getWatermark(db, 'sandbox')).toBeNull();
    await setWatermark(db, 'sandbox', '2026-01-01T00:00:00.000Z');
    await setWatermark(db, 'sandbox', '2026-01-02T00:00:00.000Z');
    await setWatermark(db, 'other', '2025-01-01T00:00:00.000Z');
    expect(await getWatermark(db, 'sandbox')).toBe('2026-01-02T00:00:00.000Z');
    expect(await getWatermark(db, 'other')).toBe('2025-01-01T00:00:00.000Z');
  });
});

describe('durability of acknowledged writes (SQLite)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'rg-durable-'));
  const db = openDb(`sqlite:${join(dir, 'gateway.db')}`);
  const level = async (k: Kysely<any> = db.kysely): Promise<number> =>
    Number(((await sql<{ synchronous: number }>`PRAGMA synchronous`.execute(k)).rows[0] as { synchronous: number }).synchronous);
  afterAll(async () => {
    await db.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test('writes acknowledged to a client commit with synchronous=FULL; bookkeeping stays NORMAL; nothing runs in between', async () => {
    await migrate(db.kysely);
    expect(await level()).toBe(1); // NORMAL
    let inside = -1;
    let release!: () => void;
    const during = db.durably(async (k) => {
      inside = await level(k);
      await new Promise<void>((r) => (release = r));
    });
    // Another query issued meanwhile waits for the connection, so it never runs with FULL.
    const other = level();
    await new Promise((r) => setTimeout(r, 20));
    release();
    await during;
    expect(inside).toBe(2); // FULL
    expect(await other).toBe(1);
  });

  test('a new referral is committed through the durable path', async () => {
    const seen: number[] = [];
    const durably = db.durably.bind(db);
    db.durably = (fn) =>
      durably(async (k) => {
        seen.push(await level(k));
        return fn(k);
      });
    await insertReferral(db, {
      id: newReferralId(),
      clientId: 'c',
      externalId: 'EHR-DURABLE',
      idempotencyKey: null,
      requestHash: 'h',
      destination: 'sandbox',
      payload: sample,
      at: nowIso(),
    });
    db.durably = durably;
    expect(seen).toEqual([2]);
    expect((await listReferrals(db, 'c', { limit: 5 })).items.map((r) => r.externalId)).toEqual(['EHR-DURABLE']);
  });
});

describe('WAL checkpoints off the event loop (SQLite)', () => {
  test('a worker thread copies the log into the database file; the main connection only keeps a safety net', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-wal-'));
    const db = openDb(`sqlite:${join(dir, 'gateway.db')}`);
    try {
      await migrate(db.kysely);
      const autocheckpoint = (await sql<{ wal_autocheckpoint: number }>`PRAGMA wal_autocheckpoint`.execute(db.kysely)).rows[0].wal_autocheckpoint;
      expect(Number(autocheckpoint)).toBe(8000);
      // About 1,500 pages of submissions: past SQLite's default threshold (1,000), far below the safety net.
      const big = { ...sample, documents: [{ ...sample.documents[0], data: Buffer.alloc(150_000, 7).toString('base64') }] };
      for (let i = 0; i < 30; i++) {
        await insertReferral(db, {
          id: newReferralId(),
          clientId: 'c',
          externalId: `EHR-WAL-${i}`,
          idempotencyKey: null,
          requestHash: 'h',
          destination: 'sandbox',
          payload: big,
          at: nowIso(),
        });
      }
      const stats = await eventuallyStats(() => db.checkpoints?.());
      expect(stats.pages).toBeGreaterThan(1000);
      expect(stats.lastError).toBeUndefined();
      // Started because ~1,000 frames were waiting (read from the WAL index), not by the once-a-second fallback.
      expect(stats.counted).toBe(true);
      // What was checkpointed reads back whole.
      expect((await listReferrals(db, 'c', { limit: 100 })).items).toHaveLength(30);
    } finally {
      await db.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a checkpointer that cannot open the database reports it (openDb then checkpoints on the main thread again)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-wal-'));
    const errors: string[] = [];
    const c = startCheckpointer(dir, { everyMs: 10, onError: (m) => errors.push(m) }); // a directory, not a database
    try {
      for (let i = 0; i < 100 && errors.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
      expect(errors.length).toBeGreaterThan(0);
      expect(c.stats().lastError).toBeDefined();
    } finally {
      await c.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

async function eventuallyStats(read: () => CheckpointStats | undefined): Promise<CheckpointStats> {
  for (let i = 0; i < 200; i++) {
    const s = read();
    if (s && s.pages > 1000) return s;
    await new Promise((r) => setTimeout(r, 25));
  }
  const s = read();
  if (!s) throw new Error('no checkpoint stats: the checkpointer did not start');
  return s;
}

describe('migration 0005 (SQLite)', () => {
  test('documents added before the counter existed are counted, so the next ones keep their numbers', async () => {
    const db = openDb('sqlite::memory:');
    await migrate(db.kysely, '0004_payload_table');
    const k = db.kysely as Kysely<any>;
    const at = nowIso();
    await k
      .insertInto('referrals')
      .values({
        id: 'ref_old',
        client_id: 'c',
        external_id: 'E',
        idempotency_key: null,
        request_hash: 'h',
        destination: 'sandbox',
        status: 'sent',
        status_reason: null,
        fhir: null,
        report: null,
        task_version: null,
        callback_url: null,
        created_at: at,
        updated_at: at,
      })
      .execute();
    await k
      .insertInto('referral_payloads')
      .values({ referral_id: 'ref_old', payload: JSON.stringify(sample) })
      .execute();
    for (const [i, n] of [
      [1, 2],
      [2, 3],
    ]) {
      await k
        .insertInto('outbox')
        .values({
          id: `ob_${i}`,
          referral_id: 'ref_old',
          kind: 'documents',
          payload: JSON.stringify({ documents: Array(n).fill({ kind: 'other' }), startIndex: 0 }),
          state: 'done',
          attempts: 1,
          next_attempt_at: at,
          created_at: at,
          updated_at: at,
        })
        .execute();
    }
    await migrate(db.kysely);
    expect((await queueDocuments(db, 'ref_old', [{ kind: 'other' }] as ReferralDocument[], sample.documents.length)).startIndex).toBe(
      sample.documents.length + 5
    );
    expect((await getReferral(db, 'ref_old', { payload: false }))?.documentsRemovedAt).toBeNull();
    await db.close();
  });
});

describe.each(serviceDatabases())('one poller per destination across instances sharing a database (%s)', (name, database) => {
  test('only one instance holds a destination’s poll lock until it closes its store; then another takes it', async () => {
    const { url, drop } = await database();
    const a = openDb(url);
    const b = openDb(url);
    try {
      expect(await a.holdLock('poll:centre-1')).toBe(true);
      expect(await a.holdLock('poll:centre-1')).toBe(true); // still held, by the same instance
      // On PostgreSQL the second instance is refused; SQLite has one process per database file.
      expect(await b.holdLock('poll:centre-1')).toBe(name === 'sqlite');
      expect(await b.holdLock('poll:centre-2')).toBe(true); // other destinations are independent
      await a.close();
      expect(await b.holdLock('poll:centre-1')).toBe(true);
    } finally {
      await a.close().catch(() => undefined);
      await b.close();
      await drop();
    }
  });
});
