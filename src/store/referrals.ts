import { type SelectQueryBuilder, type Transaction, sql } from 'kysely';
import { freeNow, jsonBytes, parseStored, parseStoredBytes } from '../json';
import type { FhirRefs, ReferralDocument, ReferralStatus, ReportInfo, StoredReferral, Referral } from '../model';
import type { Db } from './db';
import { appendHistory } from './history';
import { enqueueDelivery } from './delivery-queue';
import { type Hl7Origin, insertHl7Origin } from './hl7-return';
import { jsonValue } from './json-column';
import type { Database, ReferralsTable } from './schema';

// The referral aggregate: its row, its submission (a table of its own, see migration 0004) and the reads of both.

export interface NewReferral {
  id: string;
  clientId: string;
  externalId: string;
  idempotencyKey: string | null;
  requestHash: string;
  destination: string;
  payload: Referral;
  at: string;
  /** Came in as HL7 v2 from a client with a return channel: its status changes go back to the sender (hl7-return.ts). */
  hl7Origin?: Hl7Origin;
}

export interface ListFilter {
  status?: ReferralStatus;
  externalId?: string;
  updatedSince?: string;
  limit: number;
  cursor?: { createdAt: string; id: string };
}

/** Every column of a referral but its payload. */
export const LIGHT_COLUMNS = [
  'id',
  'client_id',
  'external_id',
  'idempotency_key',
  'request_hash',
  'destination',
  'status',
  'status_reason',
  'fhir',
  'report',
  'task_version',
  'callback_url',
  'documents_removed_at',
  'created_at',
  'updated_at',
] as const;

export type LightRow = Pick<ReferralsTable, (typeof LIGHT_COLUMNS)[number]>;

/** A referral read with LIGHT_COLUMNS, without its submission: reading `payload` throws. */
export function toLightReferral(row: LightRow): StoredReferral {
  return toReferral({ ...row, payload: '' }, false);
}

/** A stored referral; without `withPayload`, reading `payload` is a programming error and throws. */
function toReferral(row: LightRow & { payload: string | Uint8Array }, withPayload = true): StoredReferral {
  // The submission can be megabytes of base64 documents: parse it only when someone reads it, and then let the
  // text go (the getter's closure would otherwise keep a second copy alive as long as the referral object).
  let payload: Referral | undefined;
  let text: string | Uint8Array | undefined = row.payload;
  const r = {
    id: row.id,
    clientId: row.client_id,
    externalId: row.external_id,
    destination: row.destination,
    status: row.status as ReferralStatus,
    statusReason: row.status_reason,
    createdAt: row.created_at,
    updatedAt: row.updated_at,
    fhir: row.fhir ? (JSON.parse(row.fhir) as FhirRefs) : null,
    report: row.report ? (JSON.parse(row.report) as ReportInfo) : null,
    taskVersion: row.task_version,
    documentsRemovedAt: row.documents_removed_at,
  };
  return Object.defineProperty(r, 'payload', {
    enumerable: true,
    get: () => {
      if (!withPayload) throw new Error('this referral was read without its payload');
      if (payload === undefined) {
        const stored = text as string | Uint8Array;
        text = undefined;
        if (typeof stored === 'string') {
          payload = parseStored(stored) as Referral;
        } else {
          payload = parseStoredBytes(stored) as Referral;
          freeNow(stored);
        }
      }
      return payload;
    },
  }) as StoredReferral;
}

export function isUniqueViolation(err: unknown): boolean {
  const e = err as { code?: string; errcode?: number; message?: string };
  return e?.code === '23505' || /UNIQUE constraint failed/i.test(e?.message ?? '');
}

/**
 * Reads a referral (without its payload) inside a transaction that will change it. On PostgreSQL the row is
 * locked (`FOR UPDATE`) until the transaction ends, so concurrent changes of one referral (two instances
 * polling, a poll and a cancel, two additions of documents) run one after the other and never both read
 * the same state or take the same history number. SQLite runs one transaction at a time anyway.
 */
export function lockReferral(db: Db, trx: Transaction<Database>, id: string): Promise<LightRow | undefined> {
  const q = trx.selectFrom('referrals').select(LIGHT_COLUMNS).where('id', '=', id);
  return (db.dialect === 'postgres' ? q.forUpdate() : q).executeTakeFirst();
}

/** Records which blob each of these documents names (documents numbered from `startIndex + 1`). */
export async function linkDocumentBlobs(
  trx: Transaction<Database>,
  referralId: string,
  documents: ReadonlyArray<ReferralDocument>,
  startIndex: number
): Promise<void> {
  const rows = documents.flatMap((d, i) =>
    d.blob ? [{ referral_id: referralId, document_n: startIndex + i + 1, sha256: d.blob.sha256, bytes: d.blob.bytes }] : []
  );
  if (rows.length > 0) await trx.insertInto('referral_blobs').values(rows).execute();
}

/**
 * Stores a new referral, its first history entry and its delivery outbox entry in one transaction,
 * committed durably (see Db.durably): the client is told 202 and will not send it again.
 * Returns null when another referral with the same client+externalId or idempotency key exists.
 */
export async function insertReferral(db: Db, r: NewReferral): Promise<StoredReferral | null> {
  const status: ReferralStatus = r.payload.documents.some((d) => d.upload && !d.blob) ? 'awaiting-documents' : 'queued';
  try {
    await db.durably((k) =>
      k.transaction().execute(async (trx) => {
        await trx
          .insertInto('referrals')
          .values({
            id: r.id,
            client_id: r.clientId,
            external_id: r.externalId,
            idempotency_key: r.idempotencyKey,
            request_hash: r.requestHash,
            destination: r.destination,
            status,
            status_reason: null,
            callback_url: r.payload.callbackUrl ?? null,
            documents_added: 0,
            documents_removed_at: null,
            fhir: null,
            report: null,
            task_version: null,
            created_at: r.at,
            updated_at: r.at,
          })
          .execute();
        const payload = jsonBytes(r.payload);
        try {
          await trx
            .insertInto('referral_payloads')
            .values({ referral_id: r.id, payload: jsonValue(db, payload) })
            .execute();
        } finally {
          freeNow(payload); // the statement has run: its bytes are in the database's pages
        }
        await appendHistory(trx, r.id, { status, at: r.at });
        await linkDocumentBlobs(trx, r.id, r.payload.documents, 0);
        // Waiting for uploads: delivery is queued when the last one arrives (uploads.ts).
        if (status === 'queued') await enqueueDelivery(db, trx, r.id, { kind: 'submit', payload: null }, r.at);
        if (r.hl7Origin) await insertHl7Origin(trx, r.id, r.hl7Origin, r.at);
      })
    );
  } catch (err) {
    if (isUniqueViolation(err)) {
      return null;
    }
    throw err;
  }
  if (status === 'queued') db.signals.emit('queued', 'delivery');
  // What was just written, without reading (and parsing) a possibly large submission back.
  return {
    id: r.id,
    clientId: r.clientId,
    externalId: r.externalId,
    destination: r.destination,
    status,
    statusReason: null,
    createdAt: r.at,
    updatedAt: r.at,
    payload: r.payload,
    fhir: null,
    report: null,
    taskVersion: null,
    documentsRemovedAt: null,
  };
}

/** A client's referral with this external id or idempotency key (the key's match first), with its request hash. */
export async function findForIdempotency(
  db: Db,
  clientId: string,
  externalId: string,
  key: string | null
): Promise<(StoredReferral & { requestHash: string }) | undefined> {
  let q = db.kysely.selectFrom('referrals').select(LIGHT_COLUMNS).where('client_id', '=', clientId);
  q = key ? q.where((eb) => eb.or([eb('idempotency_key', '=', key), eb('external_id', '=', externalId)])) : q.where('external_id', '=', externalId);
  const rows = await q.execute();
  const row = rows.find((x) => key !== null && x.idempotency_key === key) ?? rows[0];
  return row ? Object.assign(toLightReferral(row), { requestHash: row.request_hash }) : undefined;
}

/**
 * Referrals joined with their submission. SQLite hands the submission over as bytes (a BLOB: outside the
 * JavaScript heap, freed once parsed) instead of a heap string of megabytes that would linger as garbage.
 */
function withPayload(db: Db) {
  const q = db.kysely.selectFrom('referrals as r').innerJoin('referral_payloads as p', 'p.referral_id', 'r.id').selectAll('r');
  return db.dialect === 'sqlite' ? q.select(sql<string | Uint8Array>`cast(p.payload as blob)`.as('payload')) : q.select('p.payload');
}

export interface ReadOptions {
  /** false: the (possibly large) submission is not read, and reading `payload` throws. */
  payload?: boolean;
  /** Only this client's referral: another client's id is answered exactly as an unknown one. */
  clientId?: string;
}

/** A referral by id (null when there is none). */
export async function getReferral(db: Db, id: string, opts: ReadOptions = {}): Promise<StoredReferral | null> {
  if (opts.payload === false) {
    let light = db.kysely.selectFrom('referrals').select(LIGHT_COLUMNS).where('id', '=', id);
    if (opts.clientId !== undefined) light = light.where('client_id', '=', opts.clientId);
    const row = await light.executeTakeFirst();
    return row ? toLightReferral(row) : null;
  }
  let full = withPayload(db).where('r.id', '=', id);
  if (opts.clientId !== undefined) full = full.where('r.client_id', '=', opts.clientId);
  const row = await full.executeTakeFirst();
  return row ? toReferral(row) : null;
}

/** The size in bytes of a referral's stored submission (read from the row's header, not the value), or 0 when there is none. */
export async function payloadBytes(db: Db, id: string): Promise<number> {
  const row = await db.kysely
    .selectFrom('referral_payloads')
    .select(sql<number | string>`octet_length(payload)`.as('n'))
    .where('referral_id', '=', id)
    .executeTakeFirst();
  return row ? Number(row.n) : 0;
}

/** A client's referrals, newest first, a page at a time (keyset on created_at, id). */
export async function listReferrals(db: Db, clientId: string, f: ListFilter): Promise<{ items: StoredReferral[]; next?: { createdAt: string; id: string } }> {
  let q = db.kysely.selectFrom('referrals').select(LIGHT_COLUMNS).where('client_id', '=', clientId);
  if (f.status) q = q.where('status', '=', f.status);
  if (f.externalId) q = q.where('external_id', '=', f.externalId);
  if (f.updatedSince) q = q.where('updated_at', '>=', f.updatedSince);
  return newestFirstPage(q, f.cursor, f.limit);
}

type LightQuery = SelectQueryBuilder<Database, 'referrals', LightRow>;

/**
 * One page of referrals, newest first (created_at, id), starting after `after` (the last row of the previous page):
 * the page and where the next one starts. The cursor is a row-value comparison, which SQLite and PostgreSQL both seek
 * in a (…, created_at, id) index (an OR of the two conditions made SQLite walk the index from the top).
 */
export async function newestFirstPage(
  query: LightQuery,
  after: { createdAt: string; id: string } | undefined,
  limit: number
): Promise<{ items: StoredReferral[]; next?: { createdAt: string; id: string } }> {
  let q = query;
  if (after) q = q.where((eb) => eb(eb.refTuple('created_at', 'id'), '<', eb.tuple(after.createdAt, after.id)));
  const rows = await q
    .orderBy('created_at', 'desc')
    .orderBy('id', 'desc')
    .limit(limit + 1)
    .execute();
  const items = rows.slice(0, limit).map((r) => toLightReferral(r));
  const last = items[items.length - 1];
  return { items, next: rows.length > limit && last ? { createdAt: last.createdAt, id: last.id } : undefined };
}

/** Referrals at a destination whose centre Task may still change. */
export async function openAtDestination(db: Db, destination: string): Promise<StoredReferral[]> {
  const rows = await db.kysely
    .selectFrom('referrals')
    .select(LIGHT_COLUMNS)
    .where('destination', '=', destination)
    .where('status', 'in', ['sent', 'received', 'accepted', 'on-hold', 'in-progress'])
    .execute();
  return rows.map((r) => toLightReferral(r));
}
