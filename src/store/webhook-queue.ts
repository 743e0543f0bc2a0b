import type { Kysely, Transaction } from 'kysely';
import type { ReferralStatus } from '../model';
import type { Db } from './db';
import { nextSeq } from './history';
import { newId, nowIso } from './ids';
import { freshQueueRow, type LeasedQueue, type QueueRow } from './leased-queue';
import type { Database, WebhookOutboxTable } from './schema';

// The status-webhook outbox: events written by a status change in its own transaction, leased to the dispatcher.

/** The body of a status webhook (shared/api-contract.md, Webhooks). */
export interface WebhookEvent {
  type: 'referral.status-changed';
  referralId: string;
  externalId: string;
  status: ReferralStatus;
  previousStatus: ReferralStatus;
  at: string;
  reason?: string;
}

/**
 * pending   — waiting for (or in) a delivery attempt;
 * delivered — the receiver answered 2xx;
 * failed    — dead-lettered after the maximum attempts or age; an operator may re-queue it.
 */
export type WebhookState = 'pending' | 'delivered' | 'failed';

export interface WebhookEntry {
  /** Also the `webhook-id` header: stable across retries, so a receiver can de-duplicate on it. */
  id: string;
  referralId: string;
  seq: number;
  url: string;
  /** The event body exactly as stored by the status change; it is sent and signed byte for byte. */
  payload: string;
  state: WebhookState;
  attempts: number;
  nextAttemptAt: string;
  lockedBy: string | null;
  lockedUntil: string | null;
  lastError: string | null;
  /** When the current delivery round began: the status change, or the operator's re-queue. */
  createdAt: string;
  updatedAt: string;
}

function toEntry(r: QueueRow): WebhookEntry {
  const row = r as unknown as WebhookOutboxTable;
  return {
    id: row.id,
    referralId: row.referral_id,
    seq: Number(row.seq),
    url: row.url,
    payload: row.payload,
    state: row.state as WebhookState,
    attempts: Number(row.attempts),
    nextAttemptAt: row.next_attempt_at,
    lockedBy: row.locked_by,
    lockedUntil: row.locked_until,
    lastError: row.last_error,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}

/**
 * The webhook outbox as a leased queue. Events of one referral go out in `seq` order: a receiver that keeps
 * failing holds back the later events of that referral, and no other referral's. A dead-lettered event no longer
 * holds anything back; a replay (re-queue) sends it after the later ones, with a fresh age window — receivers
 * should order by the event's `at`.
 */
export const webhookQueue: LeasedQueue<WebhookEntry> = {
  table: 'webhook_outbox',
  order: 'seq',
  doneState: 'delivered',
  requeueRestartsAge: true,
  toEntry,
};

/** Queues a status webhook in the caller's transaction (which holds the referral's lock), numbered in order per referral. */
export async function enqueueWebhook(trx: Kysely<Database> | Transaction<Database>, referralId: string, url: string, event: WebhookEvent): Promise<void> {
  await trx
    .insertInto('webhook_outbox')
    .values({
      id: newId('wh'),
      referral_id: referralId,
      seq: nextSeq('webhook_outbox', referralId),
      url,
      payload: JSON.stringify(event),
      ...freshQueueRow(nowIso()),
    })
    .execute();
}

/** Events still pending and dead-lettered (failed), for the backlog gauges (/metrics). */
export async function webhookOpenCounts(db: Db): Promise<Array<{ state: string; count: number }>> {
  const rows = await db.kysely
    .selectFrom('webhook_outbox')
    .select(['state', (eb) => eb.fn.countAll<string>().as('n')])
    .where('state', 'in', ['pending', 'failed'])
    .groupBy('state')
    .execute();
  return rows.map((r) => ({ state: r.state, count: Number(r.n) }));
}
