import type { ReferralStore } from '../store';

/**
 * An operator re-queues failed deliveries: `id` is a referral id (all its failed entries) or one outbox entry's
 * id. Each entry starts again with no attempts counted; a referral held as delivery-failed goes back to queued,
 * noted in its history. Returns the ids re-queued (none: nothing failed under that id).
 */
export async function requeueDelivery(store: ReferralStore, id: string): Promise<string[]> {
  const entries = id.startsWith('ref_')
    ? (await store.outboxFor(id)).filter((e) => e.state === 'failed')
    : [await store.outboxEntry(id)].filter((e) => e?.state === 'failed');
  const requeued: string[] = [];
  for (const e of entries) {
    if (!e || !(await store.requeueOutbox(e.id))) continue;
    requeued.push(e.id);
    const referral = await store.getById(e.referralId, { payload: false });
    if (referral?.status === 'delivery-failed') {
      await store.changeStatus(referral.id, { status: 'queued', reason: 'delivery re-queued by an operator' });
    }
  }
  return requeued;
}
