import { type Kysely, type Transaction, sql } from 'kysely';
import type { ReferralStatus } from '../model';
import type { Db } from './db';
import { newId } from './ids';
import type { Database } from './schema';

export interface HistoryEntry {
  status: ReferralStatus;
  at: string;
  reason?: string;
  detail?: Record<string, unknown>;
}

/**
 * The next per-referral sequence number in a table with (referral_id, seq), as a subquery of the insert
 * (one statement instead of two; on PostgreSQL the caller holds the referral's row lock).
 */
export function nextSeq(table: 'referral_history' | 'webhook_outbox' | 'hl7_outbox', referralId: string) {
  return sql<number>`(select coalesce(max(seq), 0) + 1 from ${sql.table(table)} where referral_id = ${referralId})`;
}

/** Appends an entry to a referral's history, in the caller's transaction (which holds the referral's lock). */
export async function appendHistory(trx: Kysely<Database> | Transaction<Database>, referralId: string, h: HistoryEntry): Promise<void> {
  await trx
    .insertInto('referral_history')
    .values({
      id: newId('h'),
      referral_id: referralId,
      seq: nextSeq('referral_history', referralId),
      status: h.status,
      reason: h.reason ?? null,
      detail: h.detail ? JSON.stringify(h.detail) : null,
      at: h.at,
    })
    .execute();
}

/** A referral's history, oldest first. */
export async function referralHistory(db: Db, referralId: string): Promise<HistoryEntry[]> {
  const rows = await db.kysely.selectFrom('referral_history').selectAll().where('referral_id', '=', referralId).orderBy('seq').execute();
  return rows.map((r) => ({
    status: r.status as ReferralStatus,
    at: r.at,
    ...(r.reason ? { reason: r.reason } : {}),
    ...(r.detail ? { detail: JSON.parse(r.detail) as Record<string, unknown> } : {}),
  }));
}
