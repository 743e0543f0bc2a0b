import { type Kysely, sql } from 'kysely';
import { openDb, type Db } from '../../src/store/db';
import { migrate } from '../../src/store/migrations';
import type { Referral, ReferralStatus } from '../../src/model';
import { newReferralId, nowIso } from '../../src/store/ids';
import { changeStatus, deliveryQueue, insertReferral, leasedQueue, type LeasedQueue, type Settled } from '../../src/store';

/** The store backends every store test runs on. PostgreSQL comes from TEST_POSTGRES_URL (.ci/run sets it). */
export function storeBackends(): Array<[string, () => Promise<Db>]> {
  const backends: Array<[string, () => Promise<Db>]> = [['sqlite', async () => freshSqlite()]];
  const pg = process.env.TEST_POSTGRES_URL;
  if (pg) {
    backends.push(['postgres', async () => freshPostgres(pg)]);
  } else if (process.env.CI || process.env.REQUIRE_POSTGRES) {
    throw new Error('TEST_POSTGRES_URL is required in CI: the store suite must run on PostgreSQL too');
  }
  return backends;
}

export async function freshSqlite(): Promise<Db> {
  const db = openDb('sqlite::memory:');
  await migrate(db.kysely);
  return db;
}

let schemaCounter = 0;

/**
 * A DATABASE_URL for a PostgreSQL schema of its own (created here, empty: the service migrates it),
 * and a function that drops it again.
 */
export async function freshPostgresUrl(url: string): Promise<{ url: string; drop: () => Promise<void> }> {
  const schema = `t_${process.pid}_${Date.now()}_${schemaCounter++}`;
  const admin = openDb(url);
  await sql.raw(`create schema ${schema}`).execute(admin.kysely);
  await admin.close();
  const u = new URL(url);
  u.searchParams.set('options', `-c search_path=${schema}`);
  const drop = async (): Promise<void> => {
    const a = openDb(url);
    await sql.raw(`drop schema ${schema} cascade`).execute(a.kysely);
    await a.close();
  };
  return { url: u.toString(), drop };
}

/** A PostgreSQL database in a schema of its own, so suites do not see each other's rows. */
export async function freshPostgres(url: string): Promise<Db> {
  const fresh = await freshPostgresUrl(url);
  const db = openDb(fresh.url);
  await migrate(db.kysely);
  const close = db.close;
  return {
    ...db,
    close: async () => {
      await close();
      await fresh.drop();
    },
  };
}

/**
 * DATABASE_URLs for running the whole service on each store: an in-memory SQLite database, and a fresh
 * PostgreSQL schema when TEST_POSTGRES_URL is set (required in CI, as for the store suite).
 */
export function serviceDatabases(): Array<[string, () => Promise<{ url: string; drop: () => Promise<void> }>]> {
  const list: Array<[string, () => Promise<{ url: string; drop: () => Promise<void> }>]> = [
    ['sqlite', async () => ({ url: 'sqlite::memory:', drop: async () => undefined })],
  ];
  const pg = process.env.TEST_POSTGRES_URL;
  if (pg) {
    list.push(['postgres', () => freshPostgresUrl(pg)]);
  } else if (process.env.CI || process.env.REQUIRE_POSTGRES) {
    throw new Error('TEST_POSTGRES_URL is required in CI: the service loop must run on PostgreSQL too');
  }
  return list;
}

/**
 * Stores a new referral with `payload` (a unique externalId starting with `externalIdPrefix`) and moves it
 * through `statuses`: with a callbackUrl in the payload, one status webhook is queued per change.
 */
export async function referralWithEvents(db: Db, payload: Referral, statuses: ReferralStatus[], externalIdPrefix = 'EHR-'): Promise<string> {
  const id = newReferralId();
  await insertReferral(db, {
    id,
    clientId: 'city-hospital',
    externalId: externalIdPrefix + Math.random().toString(36).slice(2),
    idempotencyKey: null,
    requestHash: 'h',
    destination: 'sandbox',
    payload,
    at: nowIso(),
  });
  for (const status of statuses) await changeStatus(db, id, { status });
  return id;
}

/**
 * Records an outcome for a queue row as a worker would, for a test's set-up ("as if the centre had refused it"):
 * the row is made pending and leased to a test worker first (whatever its state, lease or due time), then settled
 * through the queue.
 */
export async function settleRow<E>(db: Db, queue: LeasedQueue<E>, id: string, outcome: Settled): Promise<void> {
  const k = db.kysely as unknown as Kysely<Record<string, { id: string; state: string; locked_by: string | null }>>;
  await k.updateTable(queue.table).set({ state: 'pending', locked_by: 'test-helper' }).where('id', '=', id).execute();
  if (!(await leasedQueue.settle(db, queue, id, 'test-helper', outcome))) throw new Error(`${queue.table} has no row ${id}`);
}

/** A delivery outbox row finished (done or dead-lettered), for a test's set-up. */
export function finishOutbox(db: Db, id: string, state: 'done' | 'failed', attempts: number, lastError: string | null): Promise<void> {
  return settleRow(db, deliveryQueue, id, state === 'done' ? { state, attempts } : { state, attempts, lastError: lastError ?? '' });
}

/** A delivery outbox row put off until `nextAttemptAt`, for a test's set-up. */
export function rescheduleOutbox(db: Db, id: string, attempts: number, nextAttemptAt: string, lastError: string): Promise<void> {
  return settleRow(db, deliveryQueue, id, { state: 'retry', attempts, nextAttemptAt, lastError });
}
