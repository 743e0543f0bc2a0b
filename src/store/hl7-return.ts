import type { Kysely, Transaction } from 'kysely';
import type { Hl7Family, ReferralStatus, V2Origin } from '../model';
import type { Db } from './db';
import { nextSeq } from './history';
import { newId, nowIso } from './ids';
import { freshQueueRow, type LeasedQueue, type QueueRow } from './leased-queue';
import type { Database, Hl7OriginsTable, Hl7OutboxTable } from './schema';

// Status back to HL7 v2 senders: where a v2 referral came from (hl7_origins, written with the referral), and the
// status changes to send back over MLLP (hl7_outbox, a leased queue written in the status change's transaction).

/** Where an HL7 v2 referral came from (V2Origin, src/model) and where its status goes back. */
export interface Hl7Origin extends V2Origin {
  /** The client's return channel (HL7_RETURN_CHANNELS) when the referral came in. */
  channel: { host: string; port: number };
}

/**
 * pending      — waiting for (or in) an attempt;
 * acknowledged — the receiver answered AA (or CA);
 * failed       — dead-lettered (AE, or the attempts or age spent); an operator may re-queue it.
 */
export type Hl7ReturnState = 'pending' | 'acknowledged' | 'failed';

/** What an outbox row sends: a status change, or a booking of the board (360X senders). */
export type Hl7ReturnMessage = 'status' | 'appointment';

export interface Hl7ReturnEntry {
  /** Also the MSH-10 control ids' source: stable across retries, so a receiver can de-duplicate. */
  id: string;
  referralId: string;
  seq: number;
  /** The status change to send (not the referral's status when it is sent: each change goes back in turn). */
  status: ReferralStatus;
  previousStatus: ReferralStatus;
  reason: string | null;
  at: string;
  family: Hl7Family;
  channel: { host: string; port: number };
  /** `status`: the status change (RRI^I12, OSU^O51); `appointment`: the centre booked the board (SIU^S12). */
  message: Hl7ReturnMessage;
  /** An appointment's start as the centre's Task gave it (ISO 8601), or null when it gave none. */
  appointmentStart: string | null;
  state: Hl7ReturnState;
  attempts: number;
  nextAttemptAt: string;
  lastError: string | null;
  /** When the current round of attempts began: the status change, or the operator's re-queue. */
  createdAt: string;
  updatedAt: string;
}

function toEntry(r: QueueRow): Hl7ReturnEntry {
  const row = r as unknown as Hl7OutboxTable;
  return {
    id: row.id,
    referralId: row.referral_id,
    seq: Number(row.seq),
    status: row.status as ReferralStatus,
    previousStatus: row.previous_status as ReferralStatus,
    reason: row.reason,
    at: row.at,
    family: row.family as Hl7Family,
    channel: { host: row.channel_host, port: Number(row.channel_port) },
    message: row.message === 'appointment' ? 'appointment' : 'status',
    appointmentStart: row.appointment_start ?? null,
    state: row.state as Hl7ReturnState,
    attempts: Number(row.attempts),
    nextAttemptAt: row.next_attempt_at,
    lastError: row.last_error,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  };
}

/**
 * The HL7 v2 outbox as a leased queue. A referral's status changes go back in `seq` order: a receiver that keeps
 * failing holds back that referral's later changes and no other's. A re-queued dead letter restarts its age window
 * (and goes after the later ones, as a webhook replay does: the message carries the time of the change).
 */
export const hl7ReturnQueue: LeasedQueue<Hl7ReturnEntry> = {
  table: 'hl7_outbox',
  order: 'seq',
  doneState: 'acknowledged',
  requeueRestartsAge: true,
  toEntry,
};

type Executor = Kysely<Database> | Transaction<Database>;

/** Records where a referral came from, in the transaction that stores it. */
export async function insertHl7Origin(trx: Executor, referralId: string, origin: Hl7Origin, at: string): Promise<void> {
  await trx
    .insertInto('hl7_origins')
    .values({
      referral_id: referralId,
      family: origin.family,
      sending_application: origin.sendingApplication.slice(0, 500),
      sending_facility: origin.sendingFacility.slice(0, 500),
      receiving_application: origin.receivingApplication.slice(0, 500),
      receiving_facility: origin.receivingFacility.slice(0, 500),
      version: origin.version.slice(0, 20),
      referral_identifier: origin.referralIdentifier.slice(0, 500),
      channel_host: origin.channel.host,
      channel_port: origin.channel.port,
      created_at: at,
      booked: 0,
    })
    .execute();
}

function toOrigin(row: Hl7OriginsTable): Hl7Origin {
  return {
    family: row.family as Hl7Family,
    sendingApplication: row.sending_application,
    sendingFacility: row.sending_facility,
    receivingApplication: row.receiving_application,
    receivingFacility: row.receiving_facility,
    version: row.version,
    referralIdentifier: row.referral_identifier,
    channel: { host: row.channel_host, port: Number(row.channel_port) },
  };
}

/** Where a referral came from, when it came in as HL7 v2 from a client with a return channel. */
export async function hl7Origin(db: Db | Executor, referralId: string): Promise<Hl7Origin | undefined> {
  const k = 'kysely' in db ? db.kysely : db;
  const row = await k.selectFrom('hl7_origins').selectAll().where('referral_id', '=', referralId).executeTakeFirst();
  return row ? toOrigin(row) : undefined;
}

/**
 * Queues a status change to go back to the referral's HL7 v2 sender, in the caller's transaction (which holds the
 * referral's lock), numbered in order per referral. Nothing for a referral that did not come in as v2 (or whose
 * client had no return channel): returns whether a row was queued.
 */
export async function enqueueHl7Return(
  trx: Executor,
  referralId: string,
  change: { status: ReferralStatus; previousStatus: ReferralStatus; at: string; reason?: string }
): Promise<boolean> {
  const origin = await hl7Origin(trx, referralId);
  if (!origin) return false;
  await insertHl7Row(trx, referralId, origin, {
    status: change.status,
    previous_status: change.previousStatus,
    reason: change.reason ?? null,
    at: change.at,
    message: null,
    appointment_start: null,
  });
  return true;
}

/** One row of hl7_outbox, numbered in order per referral, addressed to the sender's return channel. */
async function insertHl7Row(
  trx: Executor,
  referralId: string,
  to: { family: string; channel: { host: string; port: number } },
  what: Pick<Hl7OutboxTable, 'status' | 'previous_status' | 'reason' | 'at' | 'message' | 'appointment_start'>
): Promise<void> {
  await trx
    .insertInto('hl7_outbox')
    .values({
      id: newId('h7'),
      referral_id: referralId,
      seq: nextSeq('hl7_outbox', referralId),
      ...what,
      family: to.family,
      channel_host: to.channel.host,
      channel_port: to.channel.port,
      ...freshQueueRow(nowIso()),
    })
    .execute();
}

/** What one version of the centre's Task says of the booking of the board (src/tracking decides `booked`). */
export interface AppointmentObservation {
  /** The business status is a booking one (mappings/hl7v2-status.json `appointment`). */
  booked: boolean;
  /** The business status code, for SCH-6 (event reason). */
  code: string;
  /** The appointment's start (Task.executionPeriod.start, else restriction.period.start), when the Task gives one. */
  start: string | null;
}

/**
 * Notes a Task version's business status for a referral that came in as HL7 v2, in the caller's transaction (which
 * holds the referral's lock): when it says booked and the last one did not, queues a booking (SIU^S12) for an
 * OMG^O19 (360X) sender, after any status change of the same version. A later version still booked sends nothing;
 * one that is not booked clears the mark, so a re-booking is sent again. Returns whether a row was queued.
 */
export async function noteHl7Appointment(
  trx: Executor,
  referralId: string,
  status: ReferralStatus,
  appointment: AppointmentObservation,
  at: string
): Promise<boolean> {
  const row = await trx.selectFrom('hl7_origins').selectAll().where('referral_id', '=', referralId).executeTakeFirst();
  if (!row) return false;
  const booked = appointment.booked ? 1 : 0;
  if (Number(row.booked) === booked) return false;
  await trx.updateTable('hl7_origins').set({ booked }).where('referral_id', '=', referralId).execute();
  if (!appointment.booked || row.family !== 'OMG') return false;
  await insertHl7Row(
    trx,
    referralId,
    { family: row.family, channel: { host: row.channel_host, port: Number(row.channel_port) } },
    { status, previous_status: status, reason: appointment.code.slice(0, 200), at, message: 'appointment', appointment_start: appointment.start }
  );
  return true;
}
