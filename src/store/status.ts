import type { Transaction } from 'kysely';
import type { FhirRefs, ReferralStatus, ReportInfo, StoredReferral, DocumentsTask, CancelTask } from '../model';
import type { Db, QueueName } from './db';
import { appendHistory } from './history';
import { type AppointmentObservation, enqueueHl7Return, noteHl7Appointment } from './hl7-return';
import { nowIso } from './ids';
import { enqueueDelivery } from './delivery-queue';
import { LIGHT_COLUMNS, linkDocumentBlobs, lockReferral, toLightReferral, type LightRow } from './referrals';
import type { Database, ReferralsTable } from './schema';
import { enqueueWebhook } from './webhook-queue';

// The changes of a referral's state, each one transaction under the referral's lock: the row, its history, its
// webhook event and HL7 v2 status message (and delivery work) are written together or not at all.

export interface StatusChange {
  status: ReferralStatus;
  reason?: string | null;
  at?: string;
  detail?: Record<string, unknown>;
  fhir?: FhirRefs;
  report?: ReportInfo | null;
  taskVersion?: string | null;
  /** What the centre's Task version says of the booking of the board: a 360X sender is sent SIU^S12 once per booking. */
  appointment?: AppointmentObservation;
}

/**
 * The history entry and, when the referrer gave a callback URL, the webhook event of a status that changed; when the
 * referral came in as HL7 v2 from a client with a return channel, its status message too. Returns the queues written to.
 */
export async function recordTransition(
  trx: Transaction<Database>,
  row: LightRow,
  to: { status: ReferralStatus; at: string; reason?: string; detail?: Record<string, unknown> }
): Promise<QueueName[]> {
  await appendHistory(trx, row.id, to);
  // HL7 v2 referrals: the status goes back to the sender over MLLP (src/store/hl7-return.ts, src/hl7return).
  const hl7 = await enqueueHl7Return(trx, row.id, { status: to.status, previousStatus: row.status as ReferralStatus, at: to.at, reason: to.reason });
  const queued: QueueName[] = hl7 ? ['hl7'] : [];
  if (!row.callback_url) return queued;
  await enqueueWebhook(trx, row.id, row.callback_url, {
    type: 'referral.status-changed',
    referralId: row.id,
    externalId: row.external_id,
    status: to.status,
    previousStatus: row.status as ReferralStatus,
    at: to.at,
    ...(to.reason ? { reason: to.reason } : {}),
  });
  return [...queued, 'webhook'];
}

/** Tells the queues' runners, once the transaction has committed, that work waits. */
export function signalQueued(db: Db, queued: readonly QueueName[]): void {
  for (const queue of queued) db.signals.emit('queued', queue);
}

/**
 * Records a status change (and what came with it): the row, its history entry, its webhook event and HL7 v2 status
 * message, atomically.
 * A change to the status it already has only updates the attached data. With `onlyIf`, nothing is changed (and
 * null is returned) unless the referral as it is now passes it.
 */
export async function changeStatus(
  db: Db,
  id: string,
  change: StatusChange,
  onlyIf?: (current: StoredReferral) => boolean
): Promise<{ previous: ReferralStatus; current: StoredReferral } | null> {
  const at = change.at ?? nowIso();
  let queued: QueueName[] = [];
  const result = await db.kysely.transaction().execute(async (trx) => {
    // Everything but the submission itself: it can be megabytes, and a status change needs none of it.
    const row = await lockReferral(db, trx, id);
    if (!row) return null;
    const before = toLightReferral(row);
    if (onlyIf && !onlyIf(before)) return null;
    const update: Partial<ReferralsTable> = { status: change.status, updated_at: at };
    if (change.reason !== undefined) update.status_reason = change.reason;
    if (change.fhir !== undefined) update.fhir = JSON.stringify(change.fhir);
    if (change.report !== undefined) update.report = change.report ? JSON.stringify(change.report) : null;
    if (change.taskVersion !== undefined) update.task_version = change.taskVersion;
    await trx.updateTable('referrals').set(update).where('id', '=', id).execute();
    if (before.status !== change.status) {
      queued = await recordTransition(trx, row, { status: change.status, at, reason: change.reason ?? undefined, detail: change.detail });
    }
    if (change.appointment && (await noteHl7Appointment(trx, id, change.status, change.appointment, at)) && !queued.includes('hl7')) {
      queued = [...queued, 'hl7'];
    }
    return { previous: before.status, current: toLightReferral({ ...row, ...update }) };
  });
  signalQueued(db, queued);
  return result;
}

/** Adds a warning or note to the history without changing the status. */
export async function noteStatus(db: Db, id: string, status: ReferralStatus, reason: string, detail?: Record<string, unknown>): Promise<void> {
  await db.kysely.transaction().execute(async (trx) => {
    await lockReferral(db, trx, id);
    await appendHistory(trx, id, { status, at: nowIso(), reason, detail });
  });
}

/**
 * Cancels a referral that has not reached the centre: only while its first delivery is pending and not leased by
 * a worker. Returns false when delivery may be under way (the caller then queues a cancel for the centre instead).
 */
export async function cancelBeforeDelivery(db: Db, referralId: string, reason: string, now = new Date()): Promise<boolean> {
  const nowS = now.toISOString();
  let queued: QueueName[] = [];
  const cancelled = await db.durably((k) =>
    k.transaction().execute(async (trx) => {
      await lockReferral(db, trx, referralId);
      const res = await trx
        .updateTable('outbox')
        .set({ state: 'done', last_error: `cancelled before delivery: ${reason}`.slice(0, 500), updated_at: nowS })
        .where('referral_id', '=', referralId)
        .where('kind', '=', 'submit')
        .where('state', '=', 'pending')
        .where((eb) => eb.or([eb('locked_until', 'is', null), eb('locked_until', '<', nowS)]))
        .executeTakeFirst();
      if (Number(res.numUpdatedRows) !== 1) return false;
      await trx.updateTable('outbox').set({ state: 'done', updated_at: nowS }).where('referral_id', '=', referralId).where('state', '=', 'pending').execute();
      const row = await trx.selectFrom('referrals').select(LIGHT_COLUMNS).where('id', '=', referralId).executeTakeFirstOrThrow();
      await trx.updateTable('referrals').set({ status: 'cancelled', status_reason: reason, updated_at: nowS }).where('id', '=', referralId).execute();
      queued = await recordTransition(trx, row, { status: 'cancelled', at: nowS, reason });
      return true;
    })
  );
  signalQueued(db, queued);
  return cancelled;
}

/** Queues a referrer's cancel for the centre: acknowledged with a 202, so committed durably. */
export async function queueCancel(db: Db, referralId: string, task: CancelTask): Promise<string> {
  const id = await db.durably((k) => k.transaction().execute((trx) => enqueueDelivery(db, trx, referralId, { kind: 'cancel', payload: task })));
  db.signals.emit('queued', 'delivery');
  return id;
}

/**
 * Queues documents added to a referral. Their numbering continues after every document the referral already has
 * (submitted or added before), decided inside the transaction so concurrent additions never share a number.
 */
export async function queueDocuments(
  db: Db,
  referralId: string,
  documents: DocumentsTask['documents'],
  baseCount: number
): Promise<{ outboxId: string; startIndex: number }> {
  const queued = await db.durably((k) =>
    k.transaction().execute(async (trx) => {
      await lockReferral(db, trx, referralId);
      const { documents_added: added } = await trx.selectFrom('referrals').select('documents_added').where('id', '=', referralId).executeTakeFirstOrThrow();
      const startIndex = baseCount + Number(added);
      const outboxId = await enqueueDelivery(db, trx, referralId, { kind: 'documents', payload: { documents, startIndex } });
      await linkDocumentBlobs(trx, referralId, documents, startIndex);
      await trx
        .updateTable('referrals')
        .set({ updated_at: nowIso(), documents_added: Number(added) + documents.length })
        .where('id', '=', referralId)
        .execute();
      return { outboxId, startIndex };
    })
  );
  db.signals.emit('queued', 'delivery');
  return queued;
}
