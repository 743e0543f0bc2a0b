import { type ExpressionBuilder, type Kysely, sql } from 'kysely';
import type { Db } from './db';
import { nowIso } from './ids';
import type { LeasedQueueColumns } from './schema';

/**
 * One durable leased queue, written once for the delivery, webhook and HL7 v2 outboxes (graphile-worker's
 * shape: rows are claimed with a lease by a conditional update, the holder records the outcome, a crashed
 * holder's lease expires and another worker takes the row). The retry / age-limit / dead-letter decision is
 * src/queue's settleRetry; this file is the rows.
 *
 * Order: rows of one referral are claimed one at a time in `order` (created_at for the outbox, seq for webhook
 * events and HL7 v2 status messages): a row is claimable only while no earlier row of its referral is pending, so a
 * failing row holds back the later rows of its referral and of no other.
 */
export interface LeasedQueue<Entry> {
  readonly table: 'outbox' | 'webhook_outbox' | 'hl7_outbox';
  /** The per-referral order of its rows. */
  readonly order: 'created_at' | 'seq';
  /** The state of a row that is finished with success. */
  readonly doneState: string;
  /**
   * Whether an operator's re-queue restarts the row's age window (`created_at`). Not for the outbox, whose order
   * is created_at: a re-queued submit must still go before a cancel queued after it.
   */
  readonly requeueRestartsAge: boolean;
  readonly toEntry: (row: QueueRow) => Entry;
}

/**
 * The columns every leased queue table has (the order column `seq` only where `order` is seq). A row as read
 * also holds the table's own columns, which its queue's toEntry reads.
 */
export type QueueRow = LeasedQueueColumns & { id: string; referral_id: string; seq: number };
type QueueDb = { q: QueueRow; p: QueueRow };

/** The queue's table as a table of QueueRow (its own columns are read as they are, by the queue's toEntry). */
function rows(db: Db): Kysely<QueueDb> {
  return db.kysely as unknown as Kysely<QueueDb>;
}

/**
 * The queue's table under the alias `q` (or `p`, for the order subquery). The types see a table named by the
 * alias holding QueueRow; at run time Kysely reads "<table> as <alias>".
 */
function table<E, A extends 'q' | 'p'>(queue: LeasedQueue<E>, alias: A): A {
  return `${queue.table} as ${alias}` as A;
}

/** No earlier row of the same referral (row alias `q`) is still pending: rows go out in order. */
function noEarlierPending<E>(queue: LeasedQueue<E>) {
  return ({ not, exists, selectFrom }: ExpressionBuilder<QueueDb, 'q'>) =>
    not(
      exists(
        selectFrom(table(queue, 'p'))
          .select('p.id')
          .whereRef('p.referral_id', '=', 'q.referral_id')
          .where('p.state', '=', 'pending')
          .whereRef(`p.${queue.order}`, '<', `q.${queue.order}`)
      )
    );
}

const leaseFree = (nowS: string) => (eb: ExpressionBuilder<QueueDb, 'q'>) => eb.or([eb('q.locked_until', 'is', null), eb('q.locked_until', '<', nowS)]);

/**
 * Leases up to `limit` due rows to `workerId` for `leaseMs`. Each row is taken by a conditional update (still
 * pending, lease free or expired, no earlier pending row of its referral, checked again in the update since a
 * re-queued earlier row may have become pending since the select), so two workers, in one process or several,
 * never hold the same row, nor two rows of one referral.
 */
export async function claim<E>(db: Db, queue: LeasedQueue<E>, workerId: string, limit: number, leaseMs: number, now = new Date()): Promise<E[]> {
  if (limit <= 0) return [];
  const nowS = now.toISOString();
  const k = rows(db);
  const candidates = await k
    .selectFrom(table(queue, 'q'))
    .selectAll('q')
    .where('q.state', '=', 'pending')
    .where('q.next_attempt_at', '<=', nowS)
    .where(leaseFree(nowS))
    .where(noEarlierPending(queue))
    .orderBy('q.next_attempt_at')
    .orderBy(`q.${queue.order}`)
    .limit(limit)
    .execute();
  const until = new Date(now.getTime() + leaseMs).toISOString();
  const claimed: E[] = [];
  for (const c of candidates) {
    const res = await k
      .updateTable(table(queue, 'q'))
      .set({ locked_by: workerId, locked_until: until, updated_at: nowS })
      .where('q.id', '=', c.id)
      .where('q.state', '=', 'pending')
      .where(leaseFree(nowS))
      .where(noEarlierPending(queue))
      .executeTakeFirst();
    if (Number(res.numUpdatedRows) === 1) claimed.push(queue.toEntry({ ...c, locked_by: workerId, locked_until: until, updated_at: nowS }));
  }
  return claimed;
}

/**
 * Records, before anything is sent, that `workerId` starts attempt `attempts + 1` of a row it holds. After a crash
 * the row shows `attempts > 0`, so the next worker knows the outcome of the previous attempt is unknown
 * (read-before-retry). Conditional on the worker still holding the lease and on the count being unchanged: a
 * worker whose lease was taken over does not send. Returns the new attempt number, or undefined when the row is
 * no longer the worker's.
 */
export async function beginAttempt<E>(db: Db, queue: LeasedQueue<E>, row: { id: string; attempts: number }, workerId: string): Promise<number | undefined> {
  const attempts = row.attempts + 1;
  const res = await rows(db)
    .updateTable(table(queue, 'q'))
    .set({ attempts, updated_at: nowIso() })
    .where('q.id', '=', row.id)
    .where('q.state', '=', 'pending')
    .where('q.locked_by', '=', workerId)
    .where('q.attempts', '=', row.attempts)
    .executeTakeFirst();
  return Number(res.numUpdatedRows) === 1 ? attempts : undefined;
}

/**
 * Moves the lease of a row `workerId` holds to `leaseMs` from now (an attempt that runs long, e.g. a large upload,
 * keeps its row while it makes progress; a crashed holder's row is free again `leaseMs` after its last renewal).
 * Returns false when the row is no longer the worker's (settled, or taken over after its lease ran out).
 */
export async function extendLease<E>(db: Db, queue: LeasedQueue<E>, id: string, workerId: string, leaseMs: number, now = new Date()): Promise<boolean> {
  const r = await rows(db)
    .updateTable(table(queue, 'q'))
    .set({ locked_until: new Date(now.getTime() + leaseMs).toISOString() })
    .where('q.id', '=', id)
    .where('q.state', '=', 'pending')
    .where('q.locked_by', '=', workerId)
    .executeTakeFirst();
  return Number(r.numUpdatedRows) === 1;
}

/** How an attempt at a held row ended. */
export type Settled =
  /** Finished with success. */
  | { state: 'done'; attempts: number }
  /** Dead-lettered: an operator may re-queue it. */
  | { state: 'failed'; attempts: number; lastError: string }
  /** Try again at `nextAttemptAt`; the row stays pending (and keeps its referral's later rows waiting). */
  | { state: 'retry'; attempts: number; nextAttemptAt: string; lastError: string };

function settledColumns<E>(queue: LeasedQueue<E>, outcome: Settled): Partial<QueueRow> {
  switch (outcome.state) {
    case 'done':
      return { state: queue.doneState, attempts: outcome.attempts, last_error: null };
    case 'failed':
      return { state: 'failed', attempts: outcome.attempts, last_error: outcome.lastError };
    case 'retry':
      return { state: 'pending', attempts: outcome.attempts, next_attempt_at: outcome.nextAttemptAt, last_error: outcome.lastError };
  }
}

/**
 * Records the outcome of `workerId`'s attempt at a row and releases it. Applies only while the worker still holds
 * the row: a worker whose lease expired and was taken over leaves the decision to the new holder. Returns whether
 * it applied.
 */
export async function settle<E>(db: Db, queue: LeasedQueue<E>, id: string, workerId: string, outcome: Settled): Promise<boolean> {
  const set = settledColumns(queue, outcome);
  const r = await rows(db)
    .updateTable(table(queue, 'q'))
    .set({ ...set, locked_by: null, locked_until: null, updated_at: nowIso() })
    .where('q.id', '=', id)
    .where('q.state', '=', 'pending')
    .where('q.locked_by', '=', workerId)
    .executeTakeFirst();
  return Number(r.numUpdatedRows) === 1;
}

/** Releases the leases a worker holds (clean shutdown), so another process can take them at once. */
export async function releaseLeases<E>(db: Db, queue: LeasedQueue<E>, workerId: string): Promise<void> {
  await rows(db)
    .updateTable(table(queue, 'q'))
    .set({ locked_by: null, locked_until: null, updated_at: nowIso() })
    .where('q.locked_by', '=', workerId)
    .where('q.state', '=', 'pending')
    .execute();
}

/**
 * Re-queues a dead-lettered row (an operator's retry): pending again, no attempts counted, due now (and with a fresh
 * age window where the queue's order allows it). Same id, so a receiver can still de-duplicate. Returns false when
 * there is no failed row with this id.
 */
export async function requeue<E>(db: Db, queue: LeasedQueue<E>, id: string): Promise<boolean> {
  const at = nowIso();
  const r = await rows(db)
    .updateTable(table(queue, 'q'))
    .set({
      state: 'pending',
      attempts: 0,
      next_attempt_at: at,
      last_error: null,
      locked_by: null,
      locked_until: null,
      updated_at: at,
      ...(queue.requeueRestartsAge ? { created_at: at } : {}),
    })
    .where('q.id', '=', id)
    .where('q.state', '=', 'failed')
    .executeTakeFirst();
  return Number(r.numUpdatedRows) === 1;
}

/** Rows in a state, most recently changed first. */
export async function list<E>(db: Db, queue: LeasedQueue<E>, state: string, limit = 100): Promise<E[]> {
  const found = await rows(db)
    .selectFrom(table(queue, 'q'))
    .selectAll('q')
    .where('q.state', '=', state)
    .orderBy('q.updated_at', 'desc')
    .orderBy('q.id', 'desc')
    .limit(limit)
    .execute();
  return found.map(queue.toEntry);
}

/** One row by its id. */
export async function entry<E>(db: Db, queue: LeasedQueue<E>, id: string): Promise<E | undefined> {
  const row = await rows(db).selectFrom(table(queue, 'q')).selectAll('q').where('q.id', '=', id).executeTakeFirst();
  return row ? queue.toEntry(row) : undefined;
}

/** A referral's rows in their order. */
export async function forReferral<E>(db: Db, queue: LeasedQueue<E>, referralId: string): Promise<E[]> {
  const found = await rows(db).selectFrom(table(queue, 'q')).selectAll('q').where('q.referral_id', '=', referralId).orderBy(`q.${queue.order}`).execute();
  return found.map(queue.toEntry);
}

export async function pendingCount<E>(db: Db, queue: LeasedQueue<E>): Promise<number> {
  const r = await rows(db)
    .selectFrom(table(queue, 'q'))
    .select(sql<number>`count(*)`.as('n'))
    .where('q.state', '=', 'pending')
    .executeTakeFirst();
  return Number(r?.n ?? 0);
}

/** The bookkeeping columns of a new, unclaimed row. */
export function freshQueueRow(at: string): LeasedQueueColumns {
  return { state: 'pending', attempts: 0, next_attempt_at: at, locked_by: null, locked_until: null, last_error: null, created_at: at, updated_at: at };
}
