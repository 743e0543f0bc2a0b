// Raw Binary uploads to a centre (binaryMode raw): which Binary id holds which document of a referral at
// which destination. Repository functions take the database first (the Kysely example's style).
import type { Selectable } from 'kysely';
import type { Db } from './db';
import type { BinaryUploadsTable } from './schema';
import { nowIso } from './ids';

export interface BinaryUpload {
  referralId: string;
  destination: string;
  documentN: number;
  binaryId: string | null;
  state: 'pending' | 'done';
  lostUploads: number;
  createdAt: string;
  updatedAt: string;
}

type Key = { referralId: string; destination: string; documentN: number };

/** The recorded uploads of a referral's documents at a destination, by document number. */
export async function binaryUploadsOf(db: Db, referralId: string, destination: string): Promise<Map<number, BinaryUpload>> {
  const rows = await db.kysely.selectFrom('binary_uploads').selectAll().where('referral_id', '=', referralId).where('destination', '=', destination).execute();
  return new Map(rows.map((r) => [r.document_n, toUpload(r)]));
}

/**
 * Records that an upload is about to be sent. An upload already pending (an earlier attempt sent one and never
 * recorded its answer) counts as lost: that attempt may have left an unreferenced Binary at the centre.
 */
export async function markUploadPending(db: Db, key: Key): Promise<void> {
  const now = nowIso();
  await db.kysely
    .insertInto('binary_uploads')
    .values({
      referral_id: key.referralId,
      destination: key.destination,
      document_n: key.documentN,
      binary_id: null,
      state: 'pending',
      lost_uploads: 0,
      created_at: now,
      updated_at: now,
    })
    .onConflict((oc) =>
      oc.columns(['referral_id', 'destination', 'document_n']).doUpdateSet((eb) => ({
        lost_uploads: eb
          .case()
          .when('binary_uploads.state', '=', 'pending')
          .then(eb('binary_uploads.lost_uploads', '+', 1))
          .else(eb.ref('binary_uploads.lost_uploads'))
          .end(),
        state: 'pending',
        updated_at: now,
      }))
    )
    .execute();
}

/** Records the Binary id the centre holds the document under, durably, before the transaction that points at it. */
export async function markUploadDone(db: Db, key: Key, binaryId: string): Promise<void> {
  const now = nowIso();
  await db.durably((k) =>
    k
      .insertInto('binary_uploads')
      .values({
        referral_id: key.referralId,
        destination: key.destination,
        document_n: key.documentN,
        binary_id: binaryId,
        state: 'done',
        lost_uploads: 0,
        created_at: now,
        updated_at: now,
      })
      .onConflict((oc) => oc.columns(['referral_id', 'destination', 'document_n']).doUpdateSet({ binary_id: binaryId, state: 'done', updated_at: now }))
      .execute()
  );
}

/**
 * Uploads whose answer was lost (or is still outstanding): each may have left a Binary at the centre that no
 * DocumentReference points at. Servers without search on Binary (Medplum) cannot find them any other way.
 */
export async function possiblyOrphanedUploads(
  db: Db,
  destination: string,
  limit = 100
): Promise<Array<{ referralId: string; document: number; since: string; lost: number }>> {
  const rows = await db.kysely
    .selectFrom('binary_uploads')
    .select(['referral_id', 'document_n', 'created_at', 'updated_at', 'lost_uploads', 'state'])
    .where('destination', '=', destination)
    .where((eb) => eb.or([eb('lost_uploads', '>', 0), eb('state', '=', 'pending')]))
    .orderBy('updated_at')
    .limit(limit)
    .execute();
  return rows.map((r) => ({ referralId: r.referral_id, document: r.document_n, since: r.updated_at, lost: r.lost_uploads + (r.state === 'pending' ? 1 : 0) }));
}

function toUpload(r: Selectable<BinaryUploadsTable>): BinaryUpload {
  return {
    referralId: r.referral_id,
    destination: r.destination,
    documentN: Number(r.document_n),
    binaryId: r.binary_id,
    state: r.state,
    lostUploads: Number(r.lost_uploads),
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}
