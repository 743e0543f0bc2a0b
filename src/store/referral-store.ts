import { type Kysely, type RawBuilder, type Transaction, sql } from 'kysely';
import { withoutDocumentBytes } from '../model';
import { freeNow, jsonBytes, parseStored, parseStoredBytes } from '../json';
import type { FhirRefs, ReferralStatus, ReportInfo, StoredReferral, Referral } from '../model';
import type { Db } from './db';
import { newId, nowIso } from './ids';
import type { Database, LeasedQueueColumns, OutboxTable, ReferralsTable } from './schema';

export interface HistoryEntry {
  status: ReferralStatus;
  at: string;
  reason?: string;
  detail?: Record<string, unknown>;
}

/** The body of a status webhook (shared/api-contract.md, Webhooks). */
export interface WebhookEvent {
  type: 'referral.status-changed';
  referralId: string;
  externalId: string;
  status: ReferralStatus;
  previousStatus: ReferralStatus;
  at: string;
  reason?: string;
}

export type OutboxKind = 'submit' | 'documents' | 'cancel';

export interface OutboxEntry {
  id: string;
  referralId: string;
  kind: OutboxKind;
  payload: unknown;
  state: 'pending' | 'done' | 'failed';
  attempts: number;
  nextAttemptAt: string;
  lastError: string | null;
  createdAt: string;
}

export interface NewReferral {
  id: string;
  clientId: string;
  externalId: string;
  idempotencyKey: string | null;
  requestHash: string;
  destination: string;
  payload: Referral;
  at: string;
}

export interface ListFilter {
  status?: ReferralStatus;
  externalId?: string;
  updatedSince?: string;
  limit: number;
  cursor?: { createdAt: string; id: string };
}

export interface StatusChange {
  status: ReferralStatus;
  reason?: string | null;
  at?: string;
  detail?: Record<string, unknown>;
  fhir?: FhirRefs;
  report?: ReportInfo | null;
  taskVersion?: string | null;
}

type Q = Kysely<Database> | Transaction<Database>;

/** The bookkeeping columns of a new, unclaimed queue row (delivery outbox or webhook outbox). */
function freshQueueRow(at: string): LeasedQueueColumns {
  return { state: 'pending', attempts: 0, next_attempt_at: at, locked_by: null, locked_until: null, last_error: null, created_at: at, updated_at: at };
}

/**
 * The next per-referral sequence number in a table with (referral_id, seq), as a subquery of the insert
 * (one statement instead of two; on PostgreSQL the caller holds the referral's row lock).
 */
function nextSeq(table: 'referral_history' | 'webhook_outbox', referralId: string) {
  return sql<number>`(select coalesce(max(seq), 0) + 1 from ${sql.table(table)} where referral_id = ${referralId})`;
}

/** Every column of a referral but its payload. */
const LIGHT_COLUMNS = [
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

type LightRow = Pick<ReferralsTable, (typeof LIGHT_COLUMNS)[number]>;

/** A referral read with LIGHT_COLUMNS, without its submission: reading `payload` throws. */
function toLightReferral(row: LightRow): StoredReferral {
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

function toOutbox(row: OutboxTable): OutboxEntry {
  return {
    id: row.id,
    referralId: row.referral_id,
    kind: row.kind as OutboxKind,
    payload: row.payload ? JSON.parse(row.payload) : null,
    state: row.state as OutboxEntry['state'],
    attempts: row.attempts,
    nextAttemptAt: row.next_attempt_at,
    lastError: row.last_error,
    createdAt: row.created_at,
  };
}

export function isUniqueViolation(err: unknown): boolean {
  const e = err as { code?: string; errcode?: number; message?: string };
  return e?.code === '23505' || /UNIQUE constraint failed/i.test(e?.message ?? '');
}

/** Durable state of referrals, their history, the delivery outbox and poll watermarks. */
export class ReferralStore {
  /** Called after a transaction that queued a status webhook has committed (the dispatcher wakes). */
  onWebhookQueued: () => void = () => undefined;

  constructor(readonly db: Db) {}

  private get k(): Kysely<Database> {
    return this.db.kysely;
  }

  /**
   * A JSON column's value for a payload that may carry megabytes of document data: its UTF-8 bytes (jsonBytes),
   * bound as they are. PostgreSQL takes the bytes as the text parameter's binary form; SQLite would store a
   * bound Buffer as a BLOB, so it is cast to TEXT there (the column keeps its type, readers are unchanged).
   */
  private jsonValue(bytes: Buffer): RawBuilder<string> {
    return this.db.dialect === 'sqlite' ? sql<string>`cast(${bytes} as text)` : sql<string>`${bytes}`;
  }

  /**
   * Reads a referral (without its payload) inside a transaction that will change it. On PostgreSQL the row is
   * locked (`FOR UPDATE`) until the transaction ends, so concurrent changes of one referral (two instances
   * polling, a poll and a cancel, two additions of documents) run one after the other and never both read
   * the same state or take the same history number. SQLite runs one transaction at a time anyway.
   */
  private lockReferral(trx: Transaction<Database>, id: string) {
    const q = trx.selectFrom('referrals').select(LIGHT_COLUMNS).where('id', '=', id);
    return (this.db.dialect === 'postgres' ? q.forUpdate() : q).executeTakeFirst();
  }

  /**
   * Stores a new referral, its first history entry and its delivery outbox entry in one transaction,
   * committed durably (see Db.durably): the client is told 202 and will not send it again.
   * Returns null when another referral with the same client+externalId or idempotency key exists.
   */
  async createReferral(r: NewReferral): Promise<StoredReferral | null> {
    try {
      await this.db.durably((k) =>
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
              status: 'queued',
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
              .values({ referral_id: r.id, payload: this.jsonValue(payload) })
              .execute();
          } finally {
            freeNow(payload); // the statement has run: its bytes are in the database's pages
          }
          await this.insertHistory(trx, r.id, { status: 'queued', at: r.at });
          await this.insertOutbox(trx, r.id, 'submit', null, r.at);
        })
      );
    } catch (err) {
      if (isUniqueViolation(err)) {
        return null;
      }
      throw err;
    }
    // What was just written, without reading (and parsing) a possibly large submission back.
    return {
      id: r.id,
      clientId: r.clientId,
      externalId: r.externalId,
      destination: r.destination,
      status: 'queued',
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

  async findForIdempotency(clientId: string, externalId: string, key: string | null): Promise<(StoredReferral & { requestHash: string }) | undefined> {
    let q = this.k.selectFrom('referrals').select(LIGHT_COLUMNS).where('client_id', '=', clientId);
    q = key ? q.where((eb) => eb.or([eb('idempotency_key', '=', key), eb('external_id', '=', externalId)])) : q.where('external_id', '=', externalId);
    const rows = await q.execute();
    const row = rows.find((x) => key !== null && x.idempotency_key === key) ?? rows[0];
    return row ? Object.assign(toLightReferral(row), { requestHash: row.request_hash }) : undefined;
  }

  /** A referral row with its submission, which lives in a table of its own (see migration 0004). */
  /**
   * Referrals joined with their submission. SQLite hands the submission over as bytes (a BLOB: outside the
   * JavaScript heap, freed once parsed) instead of a heap string of megabytes that would linger as garbage.
   */
  private withPayload() {
    const q = this.k.selectFrom('referrals as r').innerJoin('referral_payloads as p', 'p.referral_id', 'r.id').selectAll('r');
    return this.db.dialect === 'sqlite' ? q.select(sql<string | Uint8Array>`cast(p.payload as blob)`.as('payload')) : q.select('p.payload');
  }

  /** A referral by id; with `{ payload: false }` the (possibly large) submission is not read. */
  getById(id: string, opts: { payload?: boolean } = {}): Promise<StoredReferral | null> {
    return this.find(id, undefined, opts);
  }

  /** The size in bytes of a referral's stored submission (read from the row's header, not the value), or 0 when there is none. */
  async payloadBytes(id: string): Promise<number> {
    const row = await this.k
      .selectFrom('referral_payloads')
      .select(sql<number | string>`octet_length(payload)`.as('n'))
      .where('referral_id', '=', id)
      .executeTakeFirst();
    return row ? Number(row.n) : 0;
  }

  /** A client's referral (with `{ payload: false }` without its submission); another client's id is answered exactly as an unknown one. */
  get(clientId: string, id: string, opts: { payload?: boolean } = {}): Promise<StoredReferral | null> {
    return this.find(id, clientId, opts);
  }

  private async find(id: string, clientId: string | undefined, opts: { payload?: boolean }): Promise<StoredReferral | null> {
    if (opts.payload === false) {
      let light = this.k.selectFrom('referrals').select(LIGHT_COLUMNS).where('id', '=', id);
      if (clientId !== undefined) light = light.where('client_id', '=', clientId);
      const row = await light.executeTakeFirst();
      return row ? toLightReferral(row) : null;
    }
    let full = this.withPayload().where('r.id', '=', id);
    if (clientId !== undefined) full = full.where('r.client_id', '=', clientId);
    const row = await full.executeTakeFirst();
    return row ? toReferral(row) : null;
  }

  async list(clientId: string, f: ListFilter): Promise<{ items: StoredReferral[]; next?: { createdAt: string; id: string } }> {
    let q = this.k.selectFrom('referrals').select(LIGHT_COLUMNS).where('client_id', '=', clientId);
    if (f.status) q = q.where('status', '=', f.status);
    if (f.externalId) q = q.where('external_id', '=', f.externalId);
    if (f.updatedSince) q = q.where('updated_at', '>=', f.updatedSince);
    if (f.cursor) {
      const c = f.cursor;
      q = q.where((eb) => eb.or([eb('created_at', '<', c.createdAt), eb.and([eb('created_at', '=', c.createdAt), eb('id', '<', c.id)])]));
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

  async history(referralId: string): Promise<HistoryEntry[]> {
    const rows = await this.k.selectFrom('referral_history').selectAll().where('referral_id', '=', referralId).orderBy('seq').execute();
    return rows.map((r) => ({
      status: r.status as ReferralStatus,
      at: r.at,
      ...(r.reason ? { reason: r.reason } : {}),
      ...(r.detail ? { detail: JSON.parse(r.detail) as Record<string, unknown> } : {}),
    }));
  }

  /**
   * Records a status change (and what came with it) and appends it to the history, atomically.
   * A change to the status it already has only updates the attached data.
   */
  async changeStatus(
    id: string,
    change: StatusChange,
    onlyIf?: (current: StoredReferral) => boolean
  ): Promise<{ previous: ReferralStatus; current: StoredReferral } | null> {
    const at = change.at ?? nowIso();
    let webhookQueued = false;
    const result = await this.k.transaction().execute(async (trx) => {
      // Everything but the submission itself: it can be megabytes, and a status change needs none of it.
      const row = await this.lockReferral(trx, id);
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
        await this.insertHistory(trx, id, { status: change.status, at, reason: change.reason ?? undefined, detail: change.detail });
        if (row.callback_url) {
          await this.insertWebhook(trx, before, row.callback_url, {
            type: 'referral.status-changed',
            referralId: id,
            externalId: before.externalId,
            status: change.status,
            previousStatus: before.status,
            at,
            ...(change.reason ? { reason: change.reason } : {}),
          });
          webhookQueued = true;
        }
      }
      return { previous: before.status, current: toLightReferral({ ...row, ...update }) };
    });
    if (webhookQueued) this.onWebhookQueued();
    return result;
  }

  /** Adds a warning or note to the history without changing the status. */
  async note(id: string, status: ReferralStatus, reason: string, detail?: Record<string, unknown>): Promise<void> {
    await this.k.transaction().execute(async (trx) => {
      await this.lockReferral(trx, id);
      await this.insertHistory(trx, id, { status, at: nowIso(), reason, detail });
    });
  }

  private async insertHistory(trx: Q, referralId: string, h: HistoryEntry): Promise<void> {
    await trx
      .insertInto('referral_history')
      .values({
        id: newId('h'),
        referral_id: referralId,
        seq: nextSeq('referral_history', referralId),
        status: h.status,
        reason: h.reason ?? null,
        detail: h.detail ? JSON.stringify(h.detail) : null,
        at: h.at,
      })
      .execute();
  }

  /** Queues a status webhook in the caller's transaction, numbered in order per referral. */
  private async insertWebhook(trx: Q, referral: StoredReferral, url: string, event: WebhookEvent): Promise<void> {
    await trx
      .insertInto('webhook_outbox')
      .values({
        id: newId('wh'),
        referral_id: referral.id,
        seq: nextSeq('webhook_outbox', referral.id),
        url,
        payload: JSON.stringify(event),
        ...freshQueueRow(nowIso()),
      })
      .execute();
  }

  // ---- outbox ----

  private async insertOutbox(trx: Q, referralId: string, kind: OutboxKind, payload: unknown, at: string): Promise<string> {
    const id = newId('ob');
    const bytes = payload === null ? null : jsonBytes(payload);
    try {
      await trx
        .insertInto('outbox')
        .values({
          id,
          referral_id: referralId,
          kind,
          payload: bytes === null ? null : this.jsonValue(bytes),
          ...freshQueueRow(at),
        })
        .execute();
    } finally {
      if (bytes) freeNow(bytes);
    }
    return id;
  }

  /**
   * Queues documents added to a referral. Their numbering continues after every document the referral
   * already has (submitted or added before), decided inside the transaction so concurrent additions
   * never share a number.
   */
  async addDocuments(referralId: string, documents: unknown[], baseCount: number): Promise<{ outboxId: string; startIndex: number }> {
    return this.db.durably((k) =>
      k.transaction().execute(async (trx) => {
        await this.lockReferral(trx, referralId);
        const { documents_added: added } = await trx.selectFrom('referrals').select('documents_added').where('id', '=', referralId).executeTakeFirstOrThrow();
        const startIndex = baseCount + Number(added);
        const outboxId = await this.insertOutbox(trx, referralId, 'documents', { documents, startIndex }, nowIso());
        await trx
          .updateTable('referrals')
          .set({ updated_at: nowIso(), documents_added: Number(added) + documents.length })
          .where('id', '=', referralId)
          .execute();
        return { outboxId, startIndex };
      })
    );
  }

  /**
   * Cancels a referral that has not reached the centre: only while its first delivery is pending and
   * not leased by a worker. Returns false when delivery may be under way (the caller then queues a
   * cancel for the centre instead).
   */
  async cancelBeforeDelivery(referralId: string, reason: string, now = new Date()): Promise<boolean> {
    const nowS = now.toISOString();
    let webhookQueued = false;
    const cancelled = await this.db.durably((k) =>
      k.transaction().execute(async (trx) => {
        await this.lockReferral(trx, referralId);
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
        const before = toLightReferral(row);
        await trx.updateTable('referrals').set({ status: 'cancelled', status_reason: reason, updated_at: nowS }).where('id', '=', referralId).execute();
        await this.insertHistory(trx, referralId, { status: 'cancelled', at: nowS, reason });
        if (row.callback_url) {
          await this.insertWebhook(trx, before, row.callback_url, {
            type: 'referral.status-changed',
            referralId,
            externalId: before.externalId,
            status: 'cancelled',
            previousStatus: before.status,
            at: nowS,
            reason,
          });
          webhookQueued = true;
        }
        return true;
      })
    );
    if (webhookQueued) this.onWebhookQueued();
    return cancelled;
  }

  /** Queues work a client asked for (a cancel): acknowledged with a 202, so committed durably. */
  async enqueue(referralId: string, kind: OutboxKind, payload: unknown): Promise<string> {
    return this.db.durably((k) => k.transaction().execute((trx) => this.insertOutbox(trx, referralId, kind, payload, nowIso())));
  }

  /**
   * Claims up to `limit` due entries for this worker with a lease. An entry is claimed by a
   * conditional update, so two workers (or two processes) never hold the same one. Entries of one
   * referral are taken in order: a later one waits while an earlier one is unfinished.
   */
  async claim(workerId: string, limit: number, leaseMs: number, now = new Date()): Promise<OutboxEntry[]> {
    const nowS = now.toISOString();
    const candidates = await this.k
      .selectFrom('outbox as o')
      .selectAll('o')
      .where('o.state', '=', 'pending')
      .where('o.next_attempt_at', '<=', nowS)
      .where((eb) => eb.or([eb('o.locked_until', 'is', null), eb('o.locked_until', '<', nowS)]))
      .where(({ not, exists, selectFrom }) =>
        not(
          exists(
            selectFrom('outbox as p')
              .select('p.id')
              .whereRef('p.referral_id', '=', 'o.referral_id')
              .where('p.state', '=', 'pending')
              .whereRef('p.created_at', '<', 'o.created_at')
          )
        )
      )
      .orderBy('o.next_attempt_at')
      .limit(limit)
      .execute();
    const until = new Date(now.getTime() + leaseMs).toISOString();
    const claimed: OutboxEntry[] = [];
    for (const c of candidates) {
      const res = await this.k
        .updateTable('outbox')
        .set({ locked_by: workerId, locked_until: until, updated_at: nowS })
        .where('id', '=', c.id)
        .where('state', '=', 'pending')
        .where((eb) => eb.or([eb('locked_until', 'is', null), eb('locked_until', '<', nowS)]))
        .executeTakeFirst();
      if (Number(res.numUpdatedRows) === 1) {
        claimed.push(toOutbox({ ...c, locked_by: workerId, locked_until: until }));
      }
    }
    return claimed;
  }

  /**
   * Records, before anything is sent, that this worker starts attempt `attempts + 1` of an entry it
   * holds. After a crash the entry shows `attempts > 0`, so the next worker knows the outcome of the
   * previous attempt is unknown (read-before-retry). Conditional on this worker still holding the
   * lease and on the count being unchanged: a worker whose lease was taken over does not send.
   * Returns the new attempt number, or undefined when the entry is no longer ours.
   */
  async beginAttempt(entry: Pick<OutboxEntry, 'id' | 'attempts'>, workerId: string): Promise<number | undefined> {
    const attempts = entry.attempts + 1;
    const res = await this.k
      .updateTable('outbox')
      .set({ attempts, updated_at: nowIso() })
      .where('id', '=', entry.id)
      .where('state', '=', 'pending')
      .where('locked_by', '=', workerId)
      .where('attempts', '=', entry.attempts)
      .executeTakeFirst();
    return Number(res.numUpdatedRows) === 1 ? attempts : undefined;
  }

  async finishOutbox(id: string, state: 'done' | 'failed', attempts: number, lastError: string | null): Promise<void> {
    await this.k
      .updateTable('outbox')
      .set({ state, attempts, last_error: lastError, locked_by: null, locked_until: null, updated_at: nowIso() })
      .where('id', '=', id)
      .execute();
  }

  async rescheduleOutbox(id: string, attempts: number, nextAttemptAt: string, lastError: string): Promise<void> {
    await this.k
      .updateTable('outbox')
      .set({ attempts, next_attempt_at: nextAttemptAt, last_error: lastError, locked_by: null, locked_until: null, updated_at: nowIso() })
      .where('id', '=', id)
      .execute();
  }

  /** Releases the leases a worker holds (clean shutdown), so another process can take them at once. */
  async releaseLeases(workerId: string): Promise<void> {
    await this.k.updateTable('outbox').set({ locked_by: null, locked_until: null }).where('locked_by', '=', workerId).where('state', '=', 'pending').execute();
  }

  async outboxFor(referralId: string): Promise<OutboxEntry[]> {
    const rows = await this.k.selectFrom('outbox').selectAll().where('referral_id', '=', referralId).orderBy('created_at').execute();
    return rows.map(toOutbox);
  }

  /** One outbox entry by its id (undefined when there is none). */
  async outboxEntry(id: string): Promise<OutboxEntry | undefined> {
    const row = await this.k.selectFrom('outbox').selectAll().where('id', '=', id).executeTakeFirst();
    return row ? toOutbox(row) : undefined;
  }

  async listOutbox(state: 'pending' | 'done' | 'failed', limit = 100): Promise<OutboxEntry[]> {
    const rows = await this.k.selectFrom('outbox').selectAll().where('state', '=', state).orderBy('updated_at', 'desc').limit(limit).execute();
    return rows.map(toOutbox);
  }

  async pendingCount(): Promise<number> {
    const r = await this.k
      .selectFrom('outbox')
      .select(sql<number>`count(*)`.as('n'))
      .where('state', '=', 'pending')
      .executeTakeFirst();
    return Number(r?.n ?? 0);
  }

  /** Re-queues a failed entry (admin retry). */
  async requeueOutbox(id: string): Promise<boolean> {
    const at = nowIso();
    const r = await this.k
      .updateTable('outbox')
      .set({ state: 'pending', attempts: 0, next_attempt_at: at, last_error: null, locked_by: null, locked_until: null, updated_at: at })
      .where('id', '=', id)
      .where('state', '=', 'failed')
      .executeTakeFirst();
    return Number(r.numUpdatedRows) === 1;
  }

  // ---- tracking ----

  /** Referrals at a destination whose centre Task may still change. */
  async openAtDestination(destination: string): Promise<StoredReferral[]> {
    const rows = await this.k
      .selectFrom('referrals')
      .select(LIGHT_COLUMNS)
      .where('destination', '=', destination)
      .where('status', 'in', ['sent', 'received', 'accepted', 'on-hold', 'in-progress'])
      .execute();
    return rows.map((r) => toLightReferral(r));
  }

  async getWatermark(destination: string): Promise<string | null> {
    const r = await this.k.selectFrom('poll_state').select('watermark').where('destination', '=', destination).executeTakeFirst();
    return r?.watermark ?? null;
  }

  /** Moves a destination's watermark forward; never back (a slower, older cycle finishing last does not rewind it). */
  async setWatermark(destination: string, watermark: string): Promise<void> {
    const at = nowIso();
    await this.k
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

  /** Counts for the backlog gauges (/metrics): open work in the delivery outbox and referrals by status. */
  async backlog(now = new Date()): Promise<{
    outbox: Array<{ kind: string; state: string; count: number }>;
    oldestPendingSeconds: number;
    referrals: Array<{ status: string; count: number }>;
  }> {
    const open = ['pending', 'failed'];
    const outbox = await this.k
      .selectFrom('outbox')
      .select(['kind', 'state', (eb) => eb.fn.countAll<string>().as('n')])
      .where('state', 'in', open)
      .groupBy(['kind', 'state'])
      .execute();
    const oldest = await this.k
      .selectFrom('outbox')
      .select((eb) => eb.fn.min<string>('created_at').as('at'))
      .where('state', '=', 'pending')
      .executeTakeFirst();
    const referrals = await this.k
      .selectFrom('referrals')
      .select(['status', (eb) => eb.fn.countAll<string>().as('n')])
      .groupBy('status')
      .execute();
    return {
      outbox: outbox.map((r) => ({ kind: r.kind, state: r.state, count: Number(r.n) })),
      oldestPendingSeconds: oldest?.at ? Math.max(0, (now.getTime() - Date.parse(oldest.at)) / 1000) : 0,
      referrals: referrals.map((r) => ({ status: r.status, count: Number(r.n) })),
    };
  }

  // ---- retention ----

  /**
   * Closed referrals (status in `statuses`, unchanged since before `cutoff`) with no delivery or webhook
   * still pending, oldest first. `documentsKept` limits it to those whose document bytes are still stored;
   * with `noFailedDelivery`, a referral with a dead-lettered delivery an operator may re-queue is left out.
   */
  async closedBefore(
    opts: { statuses: readonly string[]; cutoff: string; documentsKept?: boolean; noFailedDelivery?: boolean; limit: number; id?: string },
    k: Kysely<Database> = this.k
  ): Promise<string[]> {
    const openOutbox = opts.noFailedDelivery ? ['pending', 'failed'] : ['pending'];
    let q = k
      .selectFrom('referrals as r')
      .select('r.id')
      .where('r.status', 'in', [...opts.statuses])
      .where('r.updated_at', '<', opts.cutoff)
      .where((eb) => eb.not(eb.exists(eb.selectFrom('outbox as o').select('o.id').whereRef('o.referral_id', '=', 'r.id').where('o.state', 'in', openOutbox))))
      .where((eb) =>
        eb.not(eb.exists(eb.selectFrom('webhook_outbox as w').select('w.id').whereRef('w.referral_id', '=', 'r.id').where('w.state', '=', 'pending')))
      );
    if (opts.documentsKept) q = q.where('r.documents_removed_at', 'is', null);
    if (opts.id) q = q.where('r.id', '=', opts.id);
    const rows = await q.orderBy('r.updated_at').limit(opts.limit).execute();
    return rows.map((r) => r.id);
  }

  /**
   * Removes the inline document bytes of a closed referral, from its stored submission and from its
   * "documents" outbox entries, leaving each document's size and digest. Rechecks under the referral's
   * lock that it is still due (the same conditions as `closedBefore`); returns how many documents lost
   * their bytes, or null when it was not due.
   */
  async removeDocumentBytes(id: string, due: { statuses: readonly string[]; cutoff: string }, at = nowIso()): Promise<number | null> {
    return this.k.transaction().execute(async (trx) => {
      if (!(await this.lockReferral(trx, id))) return null;
      if ((await this.closedBefore({ ...due, documentsKept: true, noFailedDelivery: true, limit: 1, id }, trx)).length === 0) return null;
      /** A stored JSON text holding `documents`, without their bytes; undefined when it had none to remove. */
      const stripped = (text: string | null): { text: string; removed: number } | undefined => {
        const payload = JSON.parse(text ?? '{}') as { documents?: Array<Record<string, unknown>> };
        const r = withoutDocumentBytes(payload.documents ?? [], at);
        return r.removed > 0 ? { text: JSON.stringify({ ...payload, documents: r.documents }), removed: r.removed } : undefined;
      };
      let removed = 0;
      const p = await trx.selectFrom('referral_payloads').select('payload').where('referral_id', '=', id).executeTakeFirst();
      const submission = p && stripped(p.payload);
      if (submission) {
        removed += submission.removed;
        await trx.updateTable('referral_payloads').set({ payload: submission.text }).where('referral_id', '=', id).execute();
      }
      const added = await trx.selectFrom('outbox').select(['id', 'payload']).where('referral_id', '=', id).where('kind', '=', 'documents').execute();
      for (const e of added) {
        const entry = stripped(e.payload);
        if (!entry) continue;
        removed += entry.removed;
        await trx.updateTable('outbox').set({ payload: entry.text }).where('id', '=', e.id).execute();
      }
      // updated_at stays: the referral's retention keeps counting from when it closed.
      await trx.updateTable('referrals').set({ documents_removed_at: at }).where('id', '=', id).execute();
      return removed;
    });
  }

  /** Deletes a closed referral and everything of it (history, outboxes, submission) if it is still due. */
  async deleteClosed(id: string, due: { statuses: readonly string[]; cutoff: string }): Promise<boolean> {
    return this.k.transaction().execute(async (trx) => {
      if (!(await this.lockReferral(trx, id))) return false;
      if ((await this.closedBefore({ ...due, limit: 1, id }, trx)).length === 0) return false;
      const r = await trx.deleteFrom('referrals').where('id', '=', id).executeTakeFirst();
      return Number(r.numDeletedRows) === 1;
    });
  }

  async ping(): Promise<void> {
    await sql`select 1`.execute(this.k);
  }
}
