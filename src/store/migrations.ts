import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from 'kysely';

/**
 * One schema for SQLite and PostgreSQL: only portable column types (text, integer). A migration's `db` types the
 * tables as they were when it ran (not today's Database), with the columns its queries use; `unknown` when it
 * only changes the schema (db.schema is untyped).
 */
const migrations: Record<string, Migration> = {
  '0001_initial': {
    async up(db: Kysely<unknown>): Promise<void> {
      await db.schema
        .createTable('referrals')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('client_id', 'text', (c) => c.notNull())
        .addColumn('external_id', 'text', (c) => c.notNull())
        .addColumn('idempotency_key', 'text')
        .addColumn('request_hash', 'text', (c) => c.notNull())
        .addColumn('destination', 'text', (c) => c.notNull())
        .addColumn('status', 'text', (c) => c.notNull())
        .addColumn('status_reason', 'text')
        .addColumn('payload', 'text', (c) => c.notNull())
        .addColumn('fhir', 'text')
        .addColumn('report', 'text')
        .addColumn('task_version', 'text')
        .addColumn('created_at', 'text', (c) => c.notNull())
        .addColumn('updated_at', 'text', (c) => c.notNull())
        .addUniqueConstraint('referrals_client_external_uq', ['client_id', 'external_id'])
        .addUniqueConstraint('referrals_client_idem_uq', ['client_id', 'idempotency_key'])
        .execute();
      await db.schema.createIndex('referrals_client_created_idx').on('referrals').columns(['client_id', 'created_at', 'id']).execute();
      await db.schema.createIndex('referrals_client_updated_idx').on('referrals').columns(['client_id', 'updated_at']).execute();
      await db.schema.createIndex('referrals_dest_status_idx').on('referrals').columns(['destination', 'status']).execute();

      await db.schema
        .createTable('referral_history')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
        .addColumn('seq', 'integer', (c) => c.notNull())
        .addColumn('status', 'text', (c) => c.notNull())
        .addColumn('reason', 'text')
        .addColumn('detail', 'text')
        .addColumn('at', 'text', (c) => c.notNull())
        .addUniqueConstraint('history_referral_seq_uq', ['referral_id', 'seq'])
        .execute();

      await db.schema
        .createTable('outbox')
        .addColumn('id', 'text', (c) => c.primaryKey())
        .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
        .addColumn('kind', 'text', (c) => c.notNull())
        .addColumn('payload', 'text')
        .addColumn('state', 'text', (c) => c.notNull())
        .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
        .addColumn('next_attempt_at', 'text', (c) => c.notNull())
        .addColumn('locked_by', 'text')
        .addColumn('locked_until', 'text')
        .addColumn('last_error', 'text')
        .addColumn('created_at', 'text', (c) => c.notNull())
        .addColumn('updated_at', 'text', (c) => c.notNull())
        .execute();
      await db.schema.createIndex('outbox_state_next_idx').on('outbox').columns(['state', 'next_attempt_at']).execute();
      await db.schema.createIndex('outbox_referral_idx').on('outbox').columns(['referral_id', 'created_at']).execute();

      await db.schema
        .createTable('poll_state')
        .addColumn('destination', 'text', (c) => c.primaryKey())
        .addColumn('watermark', 'text')
        .addColumn('updated_at', 'text', (c) => c.notNull())
        .execute();
      void sql;
    },
  },
};

migrations['0002_webhooks'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // Status webhooks to the referring EHR, written in the same transaction as the status change.
    await db.schema
      .createTable('webhook_outbox')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
      .addColumn('seq', 'integer', (c) => c.notNull())
      .addColumn('url', 'text', (c) => c.notNull())
      .addColumn('payload', 'text', (c) => c.notNull())
      .addColumn('state', 'text', (c) => c.notNull())
      .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
      .addColumn('next_attempt_at', 'text', (c) => c.notNull())
      .addColumn('locked_by', 'text')
      .addColumn('locked_until', 'text')
      .addColumn('last_error', 'text')
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .addUniqueConstraint('webhook_referral_seq_uq', ['referral_id', 'seq'])
      .execute();
    await db.schema.createIndex('webhook_state_next_idx').on('webhook_outbox').columns(['state', 'next_attempt_at']).execute();
  },
};

migrations['0003_callback_url'] = {
  async up(db: Kysely<{ referrals: { id: string; payload: string; callback_url: string | null } }>): Promise<void> {
    await db.schema.alterTable('referrals').addColumn('callback_url', 'text').execute();
    // Referrals stored before this column existed: copy the URL out of their payload.
    const rows = (await db.selectFrom('referrals').select(['id', 'payload']).execute()) as Array<{ id: string; payload: string }>;
    for (const r of rows) {
      const url = (JSON.parse(r.payload) as { callbackUrl?: string }).callbackUrl;
      if (url) await db.updateTable('referrals').set({ callback_url: url }).where('id', '=', r.id).execute();
    }
  },
};

migrations['0004_payload_table'] = {
  async up(db: Kysely<{ referrals: { id: string; payload: string }; referral_payloads: { referral_id: string; payload: string } }>): Promise<void> {
    // A status change rewrites the referral row; with the submission (megabytes of base64) in it,
    // every change copied the documents. The submission moves to a table that is written once.
    await db.schema
      .createTable('referral_payloads')
      .addColumn('referral_id', 'text', (c) => c.primaryKey().references('referrals.id').onDelete('cascade'))
      .addColumn('payload', 'text', (c) => c.notNull())
      .execute();
    await db
      .insertInto('referral_payloads')
      .columns(['referral_id', 'payload'])
      .expression(db.selectFrom('referrals').select(['id', 'payload']))
      .execute();
    await db.schema.alterTable('referrals').dropColumn('payload').execute();
  },
};

migrations['0005_document_count_and_retention'] = {
  async up(
    db: Kysely<{ referrals: { id: string; documents_added: number }; outbox: { referral_id: string; kind: string; payload: string | null } }>
  ): Promise<void> {
    // How many documents were added after the submission, so numbering the next ones reads a counter
    // instead of parsing every earlier "documents" outbox payload (which carries their base64 data).
    await db.schema
      .alterTable('referrals')
      .addColumn('documents_added', 'integer', (c) => c.notNull().defaultTo(0))
      .execute();
    const rows = (await db.selectFrom('outbox').select(['referral_id', 'payload']).where('kind', '=', 'documents').execute()) as Array<{
      referral_id: string;
      payload: string | null;
    }>;
    const added = new Map<string, number>();
    for (const r of rows) {
      const n = (JSON.parse(r.payload ?? '{}') as { documents?: unknown[] }).documents?.length ?? 0;
      added.set(r.referral_id, (added.get(r.referral_id) ?? 0) + n);
    }
    for (const [id, n] of added) await db.updateTable('referrals').set({ documents_added: n }).where('id', '=', id).execute();
    // When the retention job removed the inline document bytes of a closed referral.
    await db.schema.alterTable('referrals').addColumn('documents_removed_at', 'text').execute();
    await db.schema.createIndex('referrals_status_updated_idx').on('referrals').columns(['status', 'updated_at']).execute();
  },
};

migrations['0006_binary_uploads'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // Documents uploaded to a centre as raw Binary before the referral's transaction (binaryMode raw). The id
    // a server assigned is recorded before the transaction is sent, so a resend reuses it; `lost_uploads`
    // counts uploads whose answer never came (each may have left an unreferenced Binary at the centre).
    await db.schema
      .createTable('binary_uploads')
      .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
      .addColumn('destination', 'text', (c) => c.notNull())
      .addColumn('document_n', 'integer', (c) => c.notNull())
      .addColumn('binary_id', 'text')
      .addColumn('state', 'text', (c) => c.notNull())
      .addColumn('lost_uploads', 'integer', (c) => c.notNull().defaultTo(0))
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('binary_uploads_pk', ['referral_id', 'destination', 'document_n'])
      .execute();
    await db.schema.createIndex('binary_uploads_dest_lost_idx').on('binary_uploads').columns(['destination', 'lost_uploads']).execute();
  },
};

migrations['0007_store_probe'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // One row per name, rewritten by the readiness probe (store/health.ts): a real write, so /readyz fails
    // while the store cannot take writes (read-only, full, locked, unreachable).
    await db.schema
      .createTable('store_probe')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('at', 'text', (c) => c.notNull())
      .execute();
  },
};

migrations['0008_inbound_messages'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // The answer given to each inbound message of a messaging format (HL7 v2: sender and control id, MSH-4 and
    // MSH-10), so a resend is answered with the same acknowledgement and changes nothing.
    await db.schema
      .createTable('inbound_messages')
      .addColumn('client_id', 'text', (c) => c.notNull())
      .addColumn('sender', 'text', (c) => c.notNull())
      .addColumn('control_id', 'text', (c) => c.notNull())
      .addColumn('answer', 'text', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addPrimaryKeyConstraint('inbound_messages_pk', ['client_id', 'sender', 'control_id'])
      .execute();
  },
};

migrations['0009_hl7_return'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // Status back to HL7 v2 senders: where a v2 referral came from (written at intake when its client has a return
    // channel), and the status changes to send back over MLLP, queued in the status change's transaction.
    await db.schema
      .createTable('hl7_origins')
      .addColumn('referral_id', 'text', (c) => c.primaryKey().references('referrals.id').onDelete('cascade'))
      .addColumn('family', 'text', (c) => c.notNull())
      .addColumn('sending_application', 'text', (c) => c.notNull())
      .addColumn('sending_facility', 'text', (c) => c.notNull())
      .addColumn('receiving_application', 'text', (c) => c.notNull())
      .addColumn('receiving_facility', 'text', (c) => c.notNull())
      .addColumn('version', 'text', (c) => c.notNull())
      .addColumn('referral_identifier', 'text', (c) => c.notNull())
      .addColumn('channel_host', 'text', (c) => c.notNull())
      .addColumn('channel_port', 'integer', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .execute();
    await db.schema
      .createTable('hl7_outbox')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
      .addColumn('seq', 'integer', (c) => c.notNull())
      .addColumn('status', 'text', (c) => c.notNull())
      .addColumn('previous_status', 'text', (c) => c.notNull())
      .addColumn('reason', 'text')
      .addColumn('at', 'text', (c) => c.notNull())
      .addColumn('family', 'text', (c) => c.notNull())
      .addColumn('channel_host', 'text', (c) => c.notNull())
      .addColumn('channel_port', 'integer', (c) => c.notNull())
      .addColumn('state', 'text', (c) => c.notNull())
      .addColumn('attempts', 'integer', (c) => c.notNull().defaultTo(0))
      .addColumn('next_attempt_at', 'text', (c) => c.notNull())
      .addColumn('locked_by', 'text')
      .addColumn('locked_until', 'text')
      .addColumn('last_error', 'text')
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('updated_at', 'text', (c) => c.notNull())
      .addUniqueConstraint('hl7_outbox_referral_seq_uq', ['referral_id', 'seq'])
      .execute();
    await db.schema.createIndex('hl7_outbox_state_next_idx').on('hl7_outbox').columns(['state', 'next_attempt_at']).execute();
  },
};

migrations['0010_hl7_appointment'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // SIU^S12 to 360X senders when the centre books the board: an outbox row is a status change (message null) or a
    // booking (message 'appointment', with its start); the origin remembers whether the centre's Task last said
    // booked, so one booking is sent once.
    await db.schema.alterTable('hl7_outbox').addColumn('message', 'text').execute();
    await db.schema.alterTable('hl7_outbox').addColumn('appointment_start', 'text').execute();
    await db.schema
      .alterTable('hl7_origins')
      .addColumn('booked', 'integer', (c) => c.notNull().defaultTo(0))
      .execute();
  },
};

migrations['0011_blobs'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // Document bytes kept in the database (src/blobs/postgres.ts), for replicas that share PostgreSQL: each upload is
    // written as numbered chunks (about 1 MiB each) as it arrives, and named by its SHA-256 in `blobs` once whole. The
    // chunk column is `bytea` on both stores: PostgreSQL's byte string; SQLite takes any declared type and never
    // converts a BLOB value, so the bytes round-trip unchanged there too. `bytes` is bigint (blobs past 2 GiB).
    await db.schema
      .createTable('blob_chunks')
      .addColumn('upload_id', 'text', (c) => c.notNull())
      .addColumn('seq', 'integer', (c) => c.notNull())
      .addColumn('data', 'bytea', (c) => c.notNull())
      .addPrimaryKeyConstraint('blob_chunks_pk', ['upload_id', 'seq'])
      .execute();
    await db.schema
      .createTable('blobs')
      .addColumn('sha256', 'text', (c) => c.primaryKey())
      .addColumn('bytes', 'bigint', (c) => c.notNull())
      .addColumn('upload_id', 'text', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .execute();
  },
};

migrations['0012_referral_blobs'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // Which referral documents name which blob (src/blobs): a blob no row names is collected (retention), and a
    // refused upload's blob is removed at once unless a referral names it. Deleting a referral deletes its rows.
    await db.schema
      .createTable('referral_blobs')
      .addColumn('referral_id', 'text', (c) => c.notNull().references('referrals.id').onDelete('cascade'))
      .addColumn('document_n', 'integer', (c) => c.notNull())
      .addColumn('sha256', 'text', (c) => c.notNull())
      .addColumn('bytes', 'bigint', (c) => c.notNull())
      .addPrimaryKeyConstraint('referral_blobs_pk', ['referral_id', 'document_n'])
      .execute();
    await db.schema.createIndex('referral_blobs_sha256_idx').on('referral_blobs').column('sha256').execute();
  },
};

migrations['0013_console'] = {
  async up(db: Kysely<unknown>): Promise<void> {
    // The browser console (src/console): its sessions, kept by the SHA-256 of the cookie's value (never the value
    // itself), with the CSRF token of each; and the audit of who revealed which referral's patient identity.
    await db.schema
      .createTable('console_sessions')
      .addColumn('id_hash', 'text', (c) => c.primaryKey())
      .addColumn('role', 'text', (c) => c.notNull())
      .addColumn('client_id', 'text')
      .addColumn('csrf_token', 'text', (c) => c.notNull())
      .addColumn('created_at', 'text', (c) => c.notNull())
      .addColumn('last_seen_at', 'text', (c) => c.notNull())
      .addColumn('expires_at', 'text', (c) => c.notNull())
      .execute();
    await db.schema.createIndex('console_sessions_expires_idx').on('console_sessions').column('expires_at').execute();
    await db.schema
      .createTable('console_audit')
      .addColumn('id', 'text', (c) => c.primaryKey())
      .addColumn('at', 'text', (c) => c.notNull())
      .addColumn('actor', 'text', (c) => c.notNull())
      .addColumn('action', 'text', (c) => c.notNull())
      .addColumn('referral_id', 'text', (c) => c.notNull())
      .execute();
    await db.schema.createIndex('console_audit_referral_idx').on('console_audit').columns(['referral_id', 'at']).execute();
    // The operator's referral list pages every client's referrals newest first (keyset on created_at, id), optionally
    // by status or external id: the existing indexes all lead with client_id or destination.
    await db.schema.createIndex('referrals_created_idx').on('referrals').columns(['created_at', 'id']).execute();
    await db.schema.createIndex('referrals_status_created_idx').on('referrals').columns(['status', 'created_at', 'id']).execute();
    await db.schema.createIndex('referrals_external_idx').on('referrals').column('external_id').execute();
  },
};

class StaticProvider implements MigrationProvider {
  async getMigrations(): Promise<Record<string, Migration>> {
    return migrations;
  }
}

/** Runs pending migrations (up to `target`, default all); throws with the failing migration's name. */
export async function migrate<DB>(db: Kysely<DB>, target?: string): Promise<string[]> {
  const migrator = new Migrator({ db, provider: new StaticProvider() });
  const { error, results } = target ? await migrator.migrateTo(target) : await migrator.migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === 'Error');
    throw new Error(`database migration ${failed?.migrationName ?? ''} failed: ${(error as Error).message}`);
  }
  return (results ?? []).filter((r) => r.status === 'Success').map((r) => r.migrationName);
}
