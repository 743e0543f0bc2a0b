import type { Db } from './db';
import { nowIso } from './ids';

// The answers given to inbound messages (HL7 v2 acknowledgements), so a resend of a message (same client, sender and
// control id) gets the same answer and changes nothing.

export interface InboundMessageKey {
  clientId: string;
  /** The sending facility (MSH-4), or the sending application when it has none. */
  sender: string;
  /** The message control id (MSH-10). */
  controlId: string;
}

/** The answer recorded for a message, if it was answered before. */
export async function recordedAnswer(db: Db, key: InboundMessageKey): Promise<string | undefined> {
  const row = await db.kysely
    .selectFrom('inbound_messages')
    .select('answer')
    .where('client_id', '=', key.clientId)
    .where('sender', '=', key.sender)
    .where('control_id', '=', key.controlId)
    .executeTakeFirst();
  return row?.answer;
}

/** Records the answer to a message; the first answer recorded stays (a concurrent resend does not replace it). */
export async function recordAnswer(db: Db, key: InboundMessageKey, answer: string): Promise<void> {
  await db.kysely
    .insertInto('inbound_messages')
    .values({ client_id: key.clientId, sender: key.sender.slice(0, 200), control_id: key.controlId.slice(0, 200), answer, created_at: nowIso() })
    .onConflict((oc) => oc.columns(['client_id', 'sender', 'control_id']).doNothing())
    .execute();
}

/** Forgets the answers recorded before `before` (a sender resends within minutes or hours, not months); returns how many. */
export async function forgetAnswersBefore(db: Db, before: string): Promise<number> {
  const r = await db.kysely.deleteFrom('inbound_messages').where('created_at', '<', before).executeTakeFirst();
  return Number(r.numDeletedRows);
}
