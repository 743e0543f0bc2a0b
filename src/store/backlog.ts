import type { Db } from './db';
import { webhookOpenCounts } from './webhook-queue';

export interface BacklogCounts {
  outbox: Array<{ kind: string; state: string; count: number }>;
  oldestPendingSeconds: number;
  referrals: Array<{ status: string; count: number }>;
  webhooks: Array<{ state: string; count: number }>;
}

/** Counts for the backlog gauges (/metrics): open work in both outboxes and referrals by status. */
export async function backlog(db: Db, now = new Date()): Promise<BacklogCounts> {
  const k = db.kysely;
  const outbox = await k
    .selectFrom('outbox')
    .select(['kind', 'state', (eb) => eb.fn.countAll<string>().as('n')])
    .where('state', 'in', ['pending', 'failed'])
    .groupBy(['kind', 'state'])
    .execute();
  const oldest = await k
    .selectFrom('outbox')
    .select((eb) => eb.fn.min<string>('created_at').as('at'))
    .where('state', '=', 'pending')
    .executeTakeFirst();
  const referrals = await k
    .selectFrom('referrals')
    .select(['status', (eb) => eb.fn.countAll<string>().as('n')])
    .groupBy('status')
    .execute();
  return {
    outbox: outbox.map((r) => ({ kind: r.kind, state: r.state, count: Number(r.n) })),
    oldestPendingSeconds: oldest?.at ? Math.max(0, (now.getTime() - Date.parse(oldest.at)) / 1000) : 0,
    referrals: referrals.map((r) => ({ status: r.status, count: Number(r.n) })),
    webhooks: await webhookOpenCounts(db),
  };
}
