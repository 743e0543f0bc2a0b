import type { Kysely } from 'kysely';
import { withoutDocumentBytes } from '../model';
import type { Db } from './db';
import { nowIso } from './ids';
import { lockReferral } from './referrals';
import type { Database } from './schema';

// The retention queries: which closed referrals are due, and removing their document bytes or the whole referral.

export interface Due {
  statuses: readonly string[];
  cutoff: string;
}

/**
 * Closed referrals (status in `statuses`, unchanged since before `cutoff`) with no delivery, webhook or HL7 v2
 * status message still pending, oldest first. `documentsKept` limits it to those whose document bytes are still stored;
 * with `noFailedDelivery`, a referral with a dead-lettered delivery an operator may re-queue is left out.
 */
export async function closedBefore(
  k: Kysely<Database>,
  opts: Due & { documentsKept?: boolean; noFailedDelivery?: boolean; limit: number; id?: string }
): Promise<string[]> {
  const openOutbox = opts.noFailedDelivery ? ['pending', 'failed'] : ['pending'];
  let q = k
    .selectFrom('referrals as r')
    .select('r.id')
    .where('r.status', 'in', [...opts.statuses])
    .where('r.updated_at', '<', opts.cutoff)
    .where((eb) => eb.not(eb.exists(eb.selectFrom('outbox as o').select('o.id').whereRef('o.referral_id', '=', 'r.id').where('o.state', 'in', openOutbox))))
    .where((eb) =>
      eb.not(eb.exists(eb.selectFrom('webhook_outbox as w').select('w.id').whereRef('w.referral_id', '=', 'r.id').where('w.state', '=', 'pending')))
    )
    .where((eb) => eb.not(eb.exists(eb.selectFrom('hl7_outbox as h').select('h.id').whereRef('h.referral_id', '=', 'r.id').where('h.state', '=', 'pending'))));
  if (opts.documentsKept) q = q.where('r.documents_removed_at', 'is', null);
  if (opts.id) q = q.where('r.id', '=', opts.id);
  const rows = await q.orderBy('r.updated_at').limit(opts.limit).execute();
  return rows.map((r) => r.id);
}

/**
 * Removes the inline document bytes of a closed referral, from its stored submission and from its
 * "documents" outbox entries, leaving each document's size and digest. Rechecks under the referral's
 * lock that it is still due (the same conditions as `closedBefore`); returns how many documents lost
 * their bytes, or null when it was not due.
 */
export async function removeDocumentBytes(db: Db, id: string, due: Due, at = nowIso()): Promise<number | null> {
  return db.kysely.transaction().execute(async (trx) => {
    if (!(await lockReferral(db, trx, id))) return null;
    if ((await closedBefore(trx, { ...due, documentsKept: true, noFailedDelivery: true, limit: 1, id })).length === 0) return null;
    /** A stored JSON text holding `documents`, without their bytes; undefined when it had none to remove. */
    const stripped = (text: string | null): { text: string; removed: number } | undefined => {
      const payload = JSON.parse(text ?? '{}') as { documents?: Array<Record<string, unknown>> };
      const r = withoutDocumentBytes(payload.documents ?? [], at);
      return r.removed > 0 ? { text: JSON.stringify({ ...payload, documents: r.documents }), removed: r.removed } : undefined;
    };
    let removed = 0;
    const p = await trx.selectFrom('referral_payloads').select('payload').where('referral_id', '=', id).executeTakeFirst();
    const submission = p && stripped(p.payload);
    if (submission) {
      removed += submission.removed;
      await trx.updateTable('referral_payloads').set({ payload: submission.text }).where('referral_id', '=', id).execute();
    }
    const added = await trx.selectFrom('outbox').select(['id', 'payload']).where('referral_id', '=', id).where('kind', '=', 'documents').execute();
    for (const e of added) {
      const entry = stripped(e.payload);
      if (!entry) continue;
      removed += entry.removed;
      await trx.updateTable('outbox').set({ payload: entry.text }).where('id', '=', e.id).execute();
    }
    // Its streamed documents no longer name their blobs: retention collects those no other referral names.
    await trx.deleteFrom('referral_blobs').where('referral_id', '=', id).execute();
    // updated_at stays: the referral's retention keeps counting from when it closed.
    await trx.updateTable('referrals').set({ documents_removed_at: at }).where('id', '=', id).execute();
    return removed;
  });
}

/** Deletes a closed referral and everything of it (history, outboxes, submission) if it is still due. */
export async function deleteClosed(db: Db, id: string, due: Due): Promise<boolean> {
  return db.kysely.transaction().execute(async (trx) => {
    if (!(await lockReferral(db, trx, id))) return false;
    if ((await closedBefore(trx, { ...due, limit: 1, id })).length === 0) return false;
    const r = await trx.deleteFrom('referrals').where('id', '=', id).executeTakeFirst();
    return Number(r.numDeletedRows) === 1;
  });
}
