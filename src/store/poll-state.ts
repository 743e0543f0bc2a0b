import type { Db } from './db';
import { nowIso } from './ids';

// Per destination, how far the poller has read the centre's Task changes.

export async function getWatermark(db: Db, destination: string): Promise<string | null> {
  const r = await db.kysely.selectFrom('poll_state').select('watermark').where('destination', '=', destination).executeTakeFirst();
  return r?.watermark ?? null;
}

/** Moves a destination's watermark forward; never back (a slower, older cycle finishing last does not rewind it). */
export async function setWatermark(db: Db, destination: string, watermark: string): Promise<void> {
  const at = nowIso();
  await db.kysely
    .insertInto('poll_state')
    .values({ destination, watermark, updated_at: at })
    .onConflict((oc) =>
      oc
        .column('destination')
        .doUpdateSet({ watermark, updated_at: at })
        .where((eb) => eb.or([eb('poll_state.watermark', 'is', null), eb('poll_state.watermark', '<', watermark)]))
    )
    .execute();
}
