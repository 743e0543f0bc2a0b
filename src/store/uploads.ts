import { freeNow, jsonBytes, parseStored } from '../json';
import type { BlobRef, Referral, StoredReferral } from '../model';
import type { Db, QueueName } from './db';
import { enqueueDelivery } from './delivery-queue';
import { nowIso } from './ids';
import { jsonValue } from './json-column';
import { lockReferral, toLightReferral } from './referrals';
import { changeStatus, recordTransition, signalQueued } from './status';

// Documents whose bytes follow the referral (`upload: true`, PUT /referrals/{id}/documents/{n}/content), and the
// references from referral documents to blobs (src/blobs) that retention and the refusal of an upload go by.

export type UploadStored =
  /** Stored; `waiting` more uploads are due before the referral is queued for delivery (0: it was just queued). */
  | { kind: 'stored'; waiting: number; referral: StoredReferral }
  /** The document already holds these very bytes: nothing changed (a resend). */
  | { kind: 'same'; referral: StoredReferral }
  | { kind: 'not-found' }
  /** The referral is not awaiting documents any more (`status`), or document n is not an upload, or holds other bytes. */
  | { kind: 'refused'; why: 'status' | 'not-upload' | 'other-bytes'; status: string };

/**
 * Records that document `n` (1-based) of a referral awaiting documents now has its bytes in the blob store: the
 * document names the blob in the stored submission, and when it was the last upload due the referral is queued for
 * delivery (its status, history, webhook and outbox entry), all in one durable transaction under the referral's lock.
 */
export async function storeUpload(db: Db, referralId: string, n: number, blob: BlobRef, at = nowIso()): Promise<UploadStored> {
  let queued: QueueName[] = [];
  const result = await db.durably((k) =>
    k.transaction().execute(async (trx): Promise<UploadStored> => {
      const row = await lockReferral(db, trx, referralId);
      if (!row) return { kind: 'not-found' };
      const p = await trx.selectFrom('referral_payloads').select('payload').where('referral_id', '=', referralId).executeTakeFirstOrThrow();
      const payload = parseStored(p.payload) as Referral;
      const doc = payload.documents[n - 1];
      if (!doc?.upload) return { kind: 'refused', why: 'not-upload', status: row.status };
      if (doc.blob) {
        return doc.blob.sha256 === blob.sha256 ? { kind: 'same', referral: toLightReferral(row) } : { kind: 'refused', why: 'other-bytes', status: row.status };
      }
      if (row.status !== 'awaiting-documents') return { kind: 'refused', why: 'status', status: row.status };
      doc.blob = blob;
      const bytes = jsonBytes(payload);
      try {
        await trx
          .updateTable('referral_payloads')
          .set({ payload: jsonValue(db, bytes) })
          .where('referral_id', '=', referralId)
          .execute();
      } finally {
        freeNow(bytes);
      }
      await trx.insertInto('referral_blobs').values({ referral_id: referralId, document_n: n, sha256: blob.sha256, bytes: blob.bytes }).execute();
      const waiting = payload.documents.filter((d) => d.upload && !d.blob).length;
      if (waiting > 0) {
        await trx.updateTable('referrals').set({ updated_at: at }).where('id', '=', referralId).execute();
        return { kind: 'stored', waiting, referral: toLightReferral({ ...row, updated_at: at }) };
      }
      const reason = 'every document upload has arrived';
      await trx.updateTable('referrals').set({ status: 'queued', status_reason: reason, updated_at: at }).where('id', '=', referralId).execute();
      queued = await recordTransition(trx, row, { status: 'queued', at, reason });
      await enqueueDelivery(db, trx, referralId, { kind: 'submit', payload: null }, at);
      return { kind: 'stored', waiting: 0, referral: toLightReferral({ ...row, status: 'queued', status_reason: reason, updated_at: at }) };
    })
  );
  if (result.kind === 'stored' && result.waiting === 0) signalQueued(db, [...queued, 'delivery']);
  return result;
}

/**
 * Ends the referrals that have waited for their uploads since before `createdBefore`: each becomes `expired` (a
 * terminal status; its webhook and HL7 v2 status message say so), unless an upload completed it meanwhile.
 * Returns the ids expired.
 */
export async function expireOverdueUploads(db: Db, createdBefore: string, reason: string, limit = 100): Promise<string[]> {
  const due = await db.kysely
    .selectFrom('referrals')
    .select('id')
    .where('status', '=', 'awaiting-documents')
    .where('created_at', '<', createdBefore)
    .orderBy('created_at')
    .limit(limit)
    .execute();
  const expired: string[] = [];
  for (const { id } of due) {
    const changed = await changeStatus(db, id, { status: 'expired', reason }, (current) => current.status === 'awaiting-documents');
    if (changed) expired.push(id);
  }
  return expired;
}

/** Whether any referral document names this blob. */
export async function blobReferenced(db: Db, sha256: string): Promise<boolean> {
  const row = await db.kysely.selectFrom('referral_blobs').select('referral_id').where('sha256', '=', sha256).limit(1).executeTakeFirst();
  return row !== undefined;
}

/** Of these blobs, the ones no referral document names. */
export async function unreferencedBlobs(db: Db, sha256s: readonly string[]): Promise<string[]> {
  if (sha256s.length === 0) return [];
  const named = await db.kysely
    .selectFrom('referral_blobs')
    .select('sha256')
    .distinct()
    .where('sha256', 'in', [...sha256s])
    .execute();
  const set = new Set(named.map((r) => r.sha256));
  return sha256s.filter((s) => !set.has(s));
}

/** The blobs a referral's documents name, with their size (total: the referral's streamed bytes). */
export async function blobsOf(db: Db, referralId: string): Promise<Array<{ n: number; sha256: string; bytes: number }>> {
  const rows = await db.kysely
    .selectFrom('referral_blobs')
    .select(['document_n', 'sha256', 'bytes'])
    .where('referral_id', '=', referralId)
    .orderBy('document_n')
    .execute();
  return rows.map((r) => ({ n: r.document_n, sha256: r.sha256, bytes: Number(r.bytes) }));
}

/** Forgets which blobs a referral's documents named (their bytes were removed by retention); returns those blobs. */
export async function unlinkBlobs(db: Db, referralId: string): Promise<string[]> {
  return db.kysely.transaction().execute(async (trx) => {
    const rows = await trx.selectFrom('referral_blobs').select('sha256').where('referral_id', '=', referralId).execute();
    await trx.deleteFrom('referral_blobs').where('referral_id', '=', referralId).execute();
    return [...new Set(rows.map((r) => r.sha256))];
  });
}
