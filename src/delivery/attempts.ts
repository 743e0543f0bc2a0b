import { nowIso } from '../store/ids';
import type { OutboxEntry, ReferralStore } from '../store/referral-store';

/**
 * Records, before anything is sent, that this worker starts attempt `entry.attempts + 1` of an entry it holds.
 *
 * After a crash (SIGKILL, power loss) the entry therefore shows `attempts > 0` and the next worker knows the
 * outcome of the previous attempt is unknown (read-before-retry). The update is conditional on this worker
 * still holding the lease and on the count being unchanged, so a worker whose lease expired and was taken over
 * does not send. Returns the new attempt number, or undefined when the entry is no longer ours.
 *
 * TODO(store owner): this belongs in ReferralStore as `beginAttempt(id, workerId, expectedAttempts)`; it uses
 * only the outbox columns the store already writes (attempts, locked_by, state, updated_at).
 */
export async function beginAttempt(store: ReferralStore, entry: OutboxEntry, workerId: string): Promise<number | undefined> {
  const attempts = entry.attempts + 1;
  const res = await store.db.kysely
    .updateTable('outbox')
    .set({ attempts, updated_at: nowIso() })
    .where('id', '=', entry.id)
    .where('state', '=', 'pending')
    .where('locked_by', '=', workerId)
    .where('attempts', '=', entry.attempts)
    .executeTakeFirst();
  return Number(res.numUpdatedRows) === 1 ? attempts : undefined;
}
