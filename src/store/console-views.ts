import type { ReferralStatus, StoredReferral } from '../model';
import type { Db } from './db';
import { LIGHT_COLUMNS, toLightReferral } from './referrals';

// What the browser console lists: referrals across clients (the admin) or of one client, by status, destination,
// creation date and external id, newest first, one keyset page at a time (indexes of migration 0013).

export interface ConsoleListFilter {
  /** Only this client's referrals (a client's session); undefined: every client's (the admin). */
  clientId?: string;
  status?: ReferralStatus;
  destination?: string;
  externalId?: string;
  /** Created at or after / before these ISO times. */
  createdFrom?: string;
  createdBefore?: string;
  limit: number;
  /** The last row of the previous page. */
  after?: { createdAt: string; id: string };
}

export async function consoleReferralPage(db: Db, f: ConsoleListFilter): Promise<{ items: StoredReferral[]; next?: { createdAt: string; id: string } }> {
  let q = db.kysely.selectFrom('referrals').select(LIGHT_COLUMNS);
  if (f.clientId !== undefined) q = q.where('client_id', '=', f.clientId);
  if (f.status) q = q.where('status', '=', f.status);
  if (f.destination) q = q.where('destination', '=', f.destination);
  if (f.externalId) q = q.where('external_id', '=', f.externalId);
  if (f.createdFrom) q = q.where('created_at', '>=', f.createdFrom);
  if (f.createdBefore) q = q.where('created_at', '<', f.createdBefore);
  if (f.after) {
    const c = f.after;
    // A row-value comparison: SQLite and PostgreSQL both seek the (created_at, id) index to it (an OR of the two
    // conditions made SQLite walk the index from the top).
    q = q.where((eb) => eb(eb.refTuple('created_at', 'id'), '<', eb.tuple(c.createdAt, c.id)));
  }
  const rows = await q
    .orderBy('created_at', 'desc')
    .orderBy('id', 'desc')
    .limit(f.limit + 1)
    .execute();
  const items = rows.slice(0, f.limit).map((r) => toLightReferral(r));
  const last = items[items.length - 1];
  return { items, next: rows.length > f.limit && last ? { createdAt: last.createdAt, id: last.id } : undefined };
}

/** How many referrals at a destination the centre may still change (the destinations view counts them each refresh). */
export async function openCountAt(db: Db, destination: string): Promise<number> {
  const row = await db.kysely
    .selectFrom('referrals')
    .select((eb) => eb.fn.countAll<number | string>().as('n'))
    .where('destination', '=', destination)
    .where('status', 'in', ['sent', 'received', 'accepted', 'on-hold', 'in-progress'])
    .executeTakeFirst();
  return Number(row?.n ?? 0);
}
