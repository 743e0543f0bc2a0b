import type { ColumnType, Generated } from 'kysely';

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

/** The bookkeeping columns of a leased queue (the delivery outbox, the webhook outbox, the HL7 v2 outbox). */
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

/**
 * Where a referral taken as an HL7 v2 message came from, and where its status changes go back (src/store/hl7-return.ts):
 * written at intake, only for a client with a return channel (HL7_RETURN_CHANNELS). HD and EI values are ER7 with
 * the default delimiters, escaped.
 */
export interface Hl7OriginsTable {
  referral_id: string;
  /** The sender's message family: `REF` (REF^I12, answered with RRI^I12) or `OMG` (360X's OMG^O19, answered with OSU^O51). */
  family: string;
  /** MSH-3 and MSH-4 of the referral message: MSH-5 and MSH-6 of what goes back. */
  sending_application: string;
  sending_facility: string;
  /** MSH-5 and MSH-6 of the referral message (what the sender called the gateway): MSH-3 and MSH-4 of what goes back. */
  receiving_application: string;
  receiving_facility: string;
  /** MSH-12: what goes back is in the sender's version. */
  version: string;
  /** RF1-6 (REF) or ORC-2 (OMG) as sent: the sender's own id for the referral, echoed back. */
  referral_identifier: string;
  /** The client's return channel when the referral came in (MLLP host and port). */
  channel_host: string;
  channel_port: number;
  created_at: string;
  /** 1 while the centre's Task last said the board is booked (a booking business status): a booking goes back once. */
  booked: number;
}

/** A status change to send back to an HL7 v2 sender (src/store/hl7-return.ts): the message is built when it is sent. */
export interface Hl7OutboxTable extends LeasedQueueColumns {
  id: string;
  referral_id: string;
  /** Order of the changes of one referral; they go back in this order. */
  seq: number;
  status: string;
  previous_status: string;
  reason: string | null;
  /** When the status changed. */
  at: string;
  /** Copied from hl7_origins, so the row says where it goes: REF or OMG, host and port. */
  family: string;
  channel_host: string;
  channel_port: number;
  /** null: a status change; `appointment`: the centre booked the board (SIU^S12, OMG senders only). */
  message: string | null;
  /** A booking's start (ISO 8601, as the centre's Task gave it), when it gave one. */
  appointment_start: string | null;
}

/** A blob stored in the database (src/blobs/postgres.ts): its content address, size and the upload holding its chunks. */
export interface BlobsTable {
  sha256: string;
  /** bigint: PostgreSQL returns it as a string, SQLite as a number. */
  bytes: ColumnType<string | number, number, number>;
  /** The upload whose blob_chunks rows are the bytes. */
  upload_id: string;
  created_at: string;
}

/** One piece of an upload's bytes, in order of `seq` (0-based); an upload no `blobs` row names is unfinished or left over. */
export interface BlobChunksTable {
  /** `<ISO time>_<random>`: when the upload began, so left-over chunks can be told by age. */
  upload_id: string;
  seq: number;
  data: Uint8Array;
}

/** A referral document whose bytes are a blob (src/blobs), by its number (1-based, as in the document identifiers). */
export interface ReferralBlobsTable {
  referral_id: string;
  document_n: number;
  sha256: string;
  bytes: ColumnType<string | number, number, number>;
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
  hl7_origins: Hl7OriginsTable;
  hl7_outbox: Hl7OutboxTable;
  blobs: BlobsTable;
  blob_chunks: BlobChunksTable;
  referral_blobs: ReferralBlobsTable;
}
