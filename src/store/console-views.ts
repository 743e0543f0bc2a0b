import type { ReferralStatus, StoredReferral } from '../model';
import type { Db } from './db';
import { LIGHT_COLUMNS, newestFirstPage } from './referrals';

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
  return newestFirstPage(q, f.after, f.limit);
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
