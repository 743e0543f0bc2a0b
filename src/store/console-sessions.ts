import type { Kysely } from 'kysely';
import type { Db } from './db';
import { newId } from './ids';

// The browser console's sessions and its audit log (migration 0013). A session is found by the SHA-256 of its
// cookie's value: a copy of the table cannot be replayed as cookies.

type ConsoleSessionsTable = {
  id_hash: string;
  role: string;
  client_id: string | null;
  csrf_token: string;
  created_at: string;
  last_seen_at: string;
  expires_at: string;
};

type ConsoleAuditTable = {
  id: string;
  at: string;
  actor: string;
  action: string;
  referral_id: string;
};

type ConsoleTables = {
  console_sessions: ConsoleSessionsTable;
  console_audit: ConsoleAuditTable;
};

const tables = (db: Db): Kysely<ConsoleTables> => db.kysely.withTables<ConsoleTables>() as unknown as Kysely<ConsoleTables>;

/** Who a console session is: the admin (every referral, re-queues, the centre desk) or one API client (its own referrals). */
export type ConsoleRole = { role: 'admin' } | { role: 'client'; clientId: string };

export interface ConsoleSession {
  idHash: string;
  who: ConsoleRole;
  csrfToken: string;
  createdAt: string;
  lastSeenAt: string;
  expiresAt: string;
}

export interface ConsoleAuditEntry {
  at: string;
  actor: string;
  action: string;
  referralId: string;
}

/** Stores a new session (its id already hashed by the caller). */
export async function createConsoleSession(db: Db, s: ConsoleSession): Promise<void> {
  await tables(db)
    .insertInto('console_sessions')
    .values({
      id_hash: s.idHash,
      role: s.who.role,
      client_id: s.who.role === 'client' ? s.who.clientId : null,
      csrf_token: s.csrfToken,
      created_at: s.createdAt,
      last_seen_at: s.lastSeenAt,
      expires_at: s.expiresAt,
    })
    .execute();
}

/** A session by the hash of its id, whatever its age (the caller decides whether it has expired). */
export async function findConsoleSession(db: Db, idHash: string): Promise<ConsoleSession | undefined> {
  const row = await tables(db).selectFrom('console_sessions').selectAll().where('id_hash', '=', idHash).executeTakeFirst();
  if (!row) return undefined;
  return {
    idHash: row.id_hash,
    who: row.role === 'admin' ? { role: 'admin' } : { role: 'client', clientId: row.client_id ?? '' },
    csrfToken: row.csrf_token,
    createdAt: row.created_at,
    lastSeenAt: row.last_seen_at,
    expiresAt: row.expires_at,
  };
}

/** Records a request in the session (its idle clock starts again). */
export async function touchConsoleSession(db: Db, idHash: string, at: string): Promise<void> {
  await tables(db).updateTable('console_sessions').set({ last_seen_at: at }).where('id_hash', '=', idHash).execute();
}

/** Ends a session (sign-out, or found expired). */
export async function deleteConsoleSession(db: Db, idHash: string): Promise<void> {
  await tables(db).deleteFrom('console_sessions').where('id_hash', '=', idHash).execute();
}

/** Deletes sessions past their absolute expiry, or idle since before `idleBefore`; returns how many. */
export async function deleteExpiredConsoleSessions(db: Db, now: string, idleBefore: string): Promise<number> {
  const r = await tables(db)
    .deleteFrom('console_sessions')
    .where((eb) => eb.or([eb('expires_at', '<=', now), eb('last_seen_at', '<', idleBefore)]))
    .executeTakeFirst();
  return Number(r.numDeletedRows);
}

/** Writes one audit row: who did what to which referral, and when. */
export async function recordConsoleAudit(db: Db, e: ConsoleAuditEntry): Promise<void> {
  await tables(db)
    .insertInto('console_audit')
    .values({ id: newId('aud'), at: e.at, actor: e.actor, action: e.action, referral_id: e.referralId })
    .execute();
}

/** A referral's audit rows, oldest first. */
export async function consoleAuditOf(db: Db, referralId: string): Promise<ConsoleAuditEntry[]> {
  const rows = await tables(db).selectFrom('console_audit').selectAll().where('referral_id', '=', referralId).orderBy('at').orderBy('id').execute();
  return rows.map((r) => ({ at: r.at, actor: r.actor, action: r.action, referralId: r.referral_id }));
}

/** The audit log, most recent first: every row, or one referral's; at most `limit` rows. */
export async function listConsoleAudit(db: Db, opts: { referralId?: string; limit: number }): Promise<ConsoleAuditEntry[]> {
  let q = tables(db).selectFrom('console_audit').selectAll();
  if (opts.referralId !== undefined) q = q.where('referral_id', '=', opts.referralId);
  const rows = await q.orderBy('at', 'desc').orderBy('id', 'desc').limit(opts.limit).execute();
  return rows.map((r) => ({ at: r.at, actor: r.actor, action: r.action, referralId: r.referral_id }));
}
