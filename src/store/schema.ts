import type { Generated } from 'kysely';

/** Times are ISO-8601 UTC strings with milliseconds, so ordering is the same on SQLite and PostgreSQL. */
export interface ReferralsTable {
  id: string;
  client_id: string;
  external_id: string;
  idempotency_key: string | null;
  request_hash: string;
  destination: string;
  status: string;
  status_reason: string | null;
  fhir: string | null;
  report: string | null;
  task_version: string | null;
  /** The referrer's webhook URL (also in the payload; here so status changes need not parse it). */
  callback_url: string | null;
  /** Documents added after the submission (POST /referrals/{id}/documents); numbers the next ones. */
  documents_added: number;
  /** When the retention job removed the inline document bytes (see src/store/retention.ts). */
  documents_removed_at: string | null;
  created_at: string;
  updated_at: string;
}

/** The validated submission, apart from the referral row: status changes rewrite the row, never this. */
export interface ReferralPayloadsTable {
  referral_id: string;
  payload: string;
}

export interface HistoryTable {
  id: string;
  referral_id: string;
  seq: number;
  status: string;
  reason: string | null;
  detail: string | null;
  at: string;
}

/** The bookkeeping columns of a leased queue (the delivery outbox and the webhook outbox). */
export interface LeasedQueueColumns {
  state: string;
  attempts: number;
  next_attempt_at: string;
  locked_by: string | null;
  locked_until: string | null;
  last_error: string | null;
  created_at: string;
  updated_at: string;
}

export interface OutboxTable extends LeasedQueueColumns {
  id: string;
  referral_id: string;
  kind: string;
  payload: string | null;
}

export interface PollStateTable {
  destination: string;
  watermark: string | null;
  updated_at: string;
}

export interface WebhookOutboxTable extends LeasedQueueColumns {
  id: string;
  referral_id: string;
  /** Order of the events of one referral; a receiver sees them in this order. */
  seq: number;
  url: string;
  /** The event body exactly as it is signed and sent. */
  payload: string;
}

export interface MigrationsTable {
  name: string;
  applied_at: string;
  seq: Generated<number>;
}

/** A document uploaded to a centre as a raw Binary (binaryMode raw); src/store/binary-uploads.ts. */
export interface BinaryUploadsTable {
  referral_id: string;
  destination: string;
  /** The document's number in the referral (1-based, as in the document identifier). */
  document_n: number;
  /** The Binary's id at the centre, once known. */
  binary_id: string | null;
  /** `pending`: an upload was sent and its answer not yet recorded; `done`: `binary_id` is at the centre. */
  state: 'pending' | 'done';
  /** Uploads whose answer was lost (each may have left an unreferenced Binary at the centre). */
  lost_uploads: number;
  created_at: string;
  updated_at: string;
}

/** The readiness probe's row (store/health.ts): rewritten to prove the store takes writes. */
export interface StoreProbeTable {
  id: string;
  at: string;
}

/** The answer given to an inbound message (HL7 v2), by client, sender and control id. */
export interface InboundMessagesTable {
  client_id: string;
  sender: string;
  control_id: string;
  answer: string;
  created_at: string;
}

export interface Database {
  binary_uploads: BinaryUploadsTable;
  referrals: ReferralsTable;
  referral_payloads: ReferralPayloadsTable;
  referral_history: HistoryTable;
  outbox: OutboxTable;
  poll_state: PollStateTable;
  webhook_outbox: WebhookOutboxTable;
  store_probe: StoreProbeTable;
  inbound_messages: InboundMessagesTable;
}
