import type { Transaction } from 'kysely';
import { freeNow, jsonBytes } from '../json';
import { readDeliveryTask, type DeliveryTask, type UnreadableTask } from '../model';
import type { Db } from './db';
import { newId, nowIso } from './ids';
import { freshQueueRow, type LeasedQueue, type QueueRow } from './leased-queue';
import { jsonValue } from './json-column';
import type { Database, OutboxTable } from './schema';

// The delivery outbox: work for a referral's destination (submit, documents, cancel), a leased queue.

export type OutboxKind = DeliveryTask['kind'];

/** A delivery outbox row: its bookkeeping and its task (kind and typed payload). */
export type OutboxEntry = {
  id: string;
  referralId: string;
  state: 'pending' | 'done' | 'failed';
  attempts: number;
  nextAttemptAt: string;
  lastError: string | null;
  createdAt: string;
} & (DeliveryTask | UnreadableTask);

function toOutbox(r: QueueRow): OutboxEntry {
  const row = r as unknown as OutboxTable;
  return {
    id: row.id,
    referralId: row.referral_id,
    ...readDeliveryTask(row.kind, row.payload ? JSON.parse(row.payload) : null),
    state: row.state as OutboxEntry['state'],
    attempts: row.attempts,
    nextAttemptAt: row.next_attempt_at,
    lastError: row.last_error,
    createdAt: row.created_at,
  };
}

/** The delivery outbox as a leased queue: a referral's rows go out in the order they were queued. */
export const deliveryQueue: LeasedQueue<OutboxEntry> = {
  table: 'outbox',
  order: 'created_at',
  doneState: 'done',
  requeueRestartsAge: false,
  toEntry: toOutbox,
};

/** Queues a task for a referral's destination in the caller's transaction; returns the row's id. */
export async function enqueueDelivery(db: Db, trx: Transaction<Database>, referralId: string, task: DeliveryTask, at: string = nowIso()): Promise<string> {
  const id = newId('ob');
  const bytes = task.payload === null ? null : jsonBytes(task.payload);
  try {
    await trx
      .insertInto('outbox')
      .values({ id, referral_id: referralId, kind: task.kind, payload: bytes === null ? null : jsonValue(db, bytes), ...freshQueueRow(at) })
      .execute();
  } finally {
    if (bytes) freeNow(bytes);
  }
  return id;
}
