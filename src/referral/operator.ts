import { notFound } from '../outcomes';
import {
  changeStatus,
  type Db,
  deliveryQueue,
  getReferral,
  hl7ReturnQueue,
  type Hl7ReturnEntry,
  type Hl7ReturnState,
  leasedQueue,
  type OutboxEntry,
  webhookQueue,
  type WebhookEntry,
  type WebhookState,
} from '../store';

// The operator's use cases over the leased queues: list them, re-queue what was dead-lettered.

/**
 * An operator re-queues failed deliveries: `id` is a referral id (all its failed entries) or one outbox entry's
 * id. Each entry starts again with no attempts counted; a referral held as delivery-failed goes back to queued,
 * noted in its history. Returns the ids re-queued; nothing failed under that id is a not-found.
 */
export async function requeueDelivery(db: Db, id: string): Promise<string[]> {
  const entries = id.startsWith('ref_')
    ? (await leasedQueue.forReferral(db, deliveryQueue, id)).filter((e) => e.state === 'failed')
    : [await leasedQueue.entry(db, deliveryQueue, id)].filter((e) => e?.state === 'failed');
  const requeued: string[] = [];
  for (const e of entries) {
    if (!e || !(await leasedQueue.requeue(db, deliveryQueue, e.id))) continue;
    requeued.push(e.id);
    const referral = await getReferral(db, e.referralId, { payload: false });
    if (referral?.status === 'delivery-failed') {
      await changeStatus(db, referral.id, { status: 'queued', reason: 'delivery re-queued by an operator' });
    }
  }
  if (requeued.length === 0) throw notFound(`no failed delivery ${id}`);
  db.signals.emit('queued', 'delivery');
  return requeued;
}

/** Re-queues a dead-lettered status webhook (same webhook-id, so a receiver can still de-duplicate it). */
export async function requeueWebhook(db: Db, id: string): Promise<string[]> {
  if (!(await leasedQueue.requeue(db, webhookQueue, id))) throw notFound(`no failed webhook ${id.slice(0, 100)}`);
  db.signals.emit('queued', 'webhook');
  return [id];
}

/** Delivery outbox entries in a state, most recently changed first. */
export function listDeliveries(db: Db, state: OutboxEntry['state'], limit: number): Promise<OutboxEntry[]> {
  return leasedQueue.list(db, deliveryQueue, state, limit);
}

/** Status webhooks in a state, most recently changed first. */
export function listWebhooks(db: Db, state: WebhookState, limit: number): Promise<WebhookEntry[]> {
  return leasedQueue.list(db, webhookQueue, state, limit);
}

/** Re-queues a dead-lettered HL7 v2 status message (same id, so its control ids stay the same). */
export async function requeueHl7Return(db: Db, id: string): Promise<string[]> {
  if (!(await leasedQueue.requeue(db, hl7ReturnQueue, id))) throw notFound(`no failed HL7 v2 status message ${id.slice(0, 100)}`);
  db.signals.emit('queued', 'hl7');
  return [id];
}

/** HL7 v2 status messages in a state, most recently changed first. */
export function listHl7Returns(db: Db, state: Hl7ReturnState, limit: number): Promise<Hl7ReturnEntry[]> {
  return leasedQueue.list(db, hl7ReturnQueue, state, limit);
}
