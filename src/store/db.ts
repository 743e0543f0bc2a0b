import { EventEmitter } from 'node:events';
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import {
  type CompiledQuery,
  type DatabaseConnection,
  type Driver,
  Kysely,
  PostgresDialect,
  type QueryCompiler,
  type QueryResult,
  sql,
  type TransactionSettings,
} from 'kysely';
import { Client, Pool } from 'pg';
import { logger } from '../observability';
import { type CheckpointStats, startCheckpointer } from './checkpointer';
import { classifyStoreError, errorMessage } from './errors';
import { NodeSqliteDialect } from './sqlite-driver';
import type { Database } from './schema';

export type Dialect = 'sqlite' | 'postgres';

export interface Db {
  kysely: Kysely<Database>;
  dialect: Dialect;
  /**
   * Runs `fn` for writes the gateway acknowledges to a client (a 202 after which the client will not resend):
   * on SQLite they are committed with `synchronous = FULL`, so the WAL is on disk before the answer, even
   * across a power loss. Every other write keeps `synchronous = NORMAL` (safe across a process crash): what
   * it records can be redone idempotently (a resend matches by identifier, a poll reads the Task again).
   * PostgreSQL commits durably anyway.
   */
  durably<T>(fn: (k: Kysely<Database>) => Promise<T>): Promise<T>;
  /**
   * Takes (or confirms it holds) a lock that only one process sharing this database holds at a time, until
   * it closes the store or dies: on PostgreSQL a session advisory lock on a connection of its own, released
   * by the server when that connection ends. SQLite has one process per database file, so it is always true.
   */
  holdLock(name: string): Promise<boolean>;
  /**
   * Told after a transaction that queued work has committed, so the worker of that queue looks now instead of at
   * its next idle tick (graphile-worker's NOTIFY, within the process): `queued` with the queue's name.
   */
  readonly signals: QueueSignals;
  /** SQLite file databases: what the background WAL checkpointer has done (see checkpointer.ts). */
  checkpoints?: () => CheckpointStats;
  close(): Promise<void>;
}

/** The queues a committed transaction can have added to. */
export type QueueName = 'delivery' | 'webhook' | 'hl7';
export type QueueSignals = EventEmitter<{ queued: [queue: QueueName] }>;

/**
 * With the background checkpointer, the main connection checkpoints by itself only when the log reaches
 * this many pages (32 MiB at 4 KiB pages): a safety net for writes that never pause. SQLite's default is 1000.
 */
const SAFETY_NET_PAGES = 8000;

/** Session advisory locks on one dedicated PostgreSQL connection (not from the pool, so they stay held). */
function advisoryLocks(url: string): { hold(name: string): Promise<boolean>; close(): Promise<void> } {
  // Locks are per database; the schema (tests and deployments sharing one database) is part of the key.
  let scope = '';
  try {
    scope = new URL(url).searchParams.get('options') ?? '';
  } catch {
    // a connection string URL cannot parse: pg reports it on connect
  }
  let client: Client | undefined;
  let connecting: Promise<Client> | undefined;
  const held = new Set<string>();
  const connection = (): Promise<Client> => {
    if (client) return Promise.resolve(client);
    connecting ??= (async () => {
      const c = new Client({ connectionString: url });
      // A lost connection has lost its locks too.
      const lost = (): void => {
        held.clear();
        if (client === c) client = undefined;
      };
      c.on('error', lost);
      c.on('end', lost);
      try {
        await c.connect();
        client = c;
        return c;
      } finally {
        connecting = undefined;
      }
    })();
    return connecting;
  };
  return {
    async hold(name) {
      if (held.has(name) && client) return true;
      const c = await connection();
      const r = await c.query<{ ok: boolean }>('select pg_try_advisory_lock(hashtextextended($1, 0)) as ok', [`referral-gateway|${scope}|${name}`]);
      if (r.rows[0]?.ok) held.add(name);
      return Boolean(r.rows[0]?.ok);
    },
    async close() {
      held.clear();
      const c = client;
      client = undefined;
      await c?.end().catch(() => undefined);
    },
  };
}

/**
 * Wraps a driver (PostgreSQL's) so every store call reports a store that cannot take requests (connection
 * refused or lost, server shutting down, too many connections, disk full, read-only) as StoreUnavailableError,
 * and a ROLLBACK that fails after a failed statement (on a connection that is gone, usually) never replaces
 * the statement's error.
 */
class StoreErrorsDriver implements Driver {
  readonly #inner: Driver;
  readonly #wrapped = new WeakMap<DatabaseConnection, WrappedConnection>();

  constructor(inner: Driver) {
    this.#inner = inner;
  }

  #unwrap(c: DatabaseConnection): DatabaseConnection {
    return c instanceof WrappedConnection ? c.inner : c;
  }

  async #call<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw classifyStoreError(err);
    }
  }

  init(): Promise<void> {
    return this.#call(() => this.#inner.init());
  }

  async acquireConnection(): Promise<DatabaseConnection> {
    const c = await this.#call(() => this.#inner.acquireConnection());
    let w = this.#wrapped.get(c);
    if (!w) {
      w = new WrappedConnection(c);
      this.#wrapped.set(c, w);
    }
    return w;
  }

  beginTransaction(c: DatabaseConnection, settings: TransactionSettings): Promise<void> {
    return this.#call(() => this.#inner.beginTransaction(this.#unwrap(c), settings));
  }

  commitTransaction(c: DatabaseConnection): Promise<void> {
    return this.#call(() => this.#inner.commitTransaction(this.#unwrap(c)));
  }

  async rollbackTransaction(c: DatabaseConnection): Promise<void> {
    try {
      await this.#inner.rollbackTransaction(this.#unwrap(c));
    } catch (err) {
      logger.warn('ROLLBACK failed after a failed statement; the statement error is reported', {
        error: errorMessage(err),
        code: (err as { code?: unknown })?.code,
      });
    }
  }

  savepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']): Promise<void> {
    return this.#call(() => {
      if (!this.#inner.savepoint) throw new Error('the database driver does not support savepoints (savepoint)');
      return this.#inner.savepoint(this.#unwrap(c), name, compile);
    });
  }

  rollbackToSavepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']): Promise<void> {
    return this.#call(() => {
      if (!this.#inner.rollbackToSavepoint) throw new Error('the database driver does not support savepoints (rollbackToSavepoint)');
      return this.#inner.rollbackToSavepoint(this.#unwrap(c), name, compile);
    });
  }

  releaseSavepoint(c: DatabaseConnection, name: string, compile: QueryCompiler['compileQuery']): Promise<void> {
    return this.#call(() => {
      if (!this.#inner.releaseSavepoint) throw new Error('the database driver does not support savepoints (releaseSavepoint)');
      return this.#inner.releaseSavepoint(this.#unwrap(c), name, compile);
    });
  }

  releaseConnection(c: DatabaseConnection): Promise<void> {
    return this.#inner.releaseConnection(this.#unwrap(c));
  }

  destroy(): Promise<void> {
    return this.#inner.destroy();
  }
}

class WrappedConnection implements DatabaseConnection {
  constructor(readonly inner: DatabaseConnection) {}

  async executeQuery<R>(q: CompiledQuery): Promise<QueryResult<R>> {
    try {
      return await this.inner.executeQuery<R>(q);
    } catch (err) {
      throw classifyStoreError(err);
    }
  }

  async *streamQuery<R>(q: CompiledQuery, chunkSize?: number): AsyncIterableIterator<QueryResult<R>> {
    try {
      yield* this.inner.streamQuery<R>(q, chunkSize);
    } catch (err) {
      throw classifyStoreError(err);
    }
  }
}

/** PostgresDialect whose driver reports store failures as StoreUnavailableError (see StoreErrorsDriver). */
class StoreErrorsPostgresDialect extends PostgresDialect {
  override createDriver(): Driver {
    return new StoreErrorsDriver(super.createDriver());
  }
}

export interface OpenDbOptions {
  /** STORE_BUSY_WAIT_MS: how long a SQLite statement waits, asynchronously, for a locked database (default 5000). */
  busyWaitMs?: number;
}

/** Opens the store named by DATABASE_URL: `sqlite:<path>` (or `sqlite::memory:`) or `postgres://...`. */
export function openDb(url: string, opts: OpenDbOptions = {}): Db {
  const busyWaitMs = opts.busyWaitMs ?? 5000;
  if (url.startsWith('sqlite:')) {
    const path = url.slice('sqlite:'.length);
    if (path !== ':memory:') {
      mkdirSync(dirname(path), { recursive: true });
    }
    const raw = new DatabaseSync(path);
    // The busy timeout is set short by the driver: a locked database is waited for asynchronously (sqlite-driver.ts).
    raw.exec('PRAGMA busy_timeout = 5000');
    raw.exec('PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;');
    // Checkpoints run on a worker thread, off the event loop; if it fails, SQLite's own auto-checkpoint is back.
    const checkpointer =
      path === ':memory:'
        ? undefined
        : startCheckpointer(path, {
            onError: (message) => {
              logger.warn('SQLite WAL checkpointer failed; checkpointing on the main thread again', { error: message });
              try {
                raw.exec('PRAGMA wal_autocheckpoint = 1000');
              } catch {
                // the database is already closed
              }
            },
          });
    if (checkpointer) raw.exec(`PRAGMA wal_autocheckpoint = ${SAFETY_NET_PAGES}`);
    const kysely = new Kysely<Database>({ dialect: new NodeSqliteDialect({ database: raw, busyWaitMs }) });
    // The connection is held for the whole callback, so no other query runs with FULL by accident, and none
    // of the callback's with NORMAL.
    const durably = <T>(fn: (k: Kysely<Database>) => Promise<T>): Promise<T> =>
      kysely.connection().execute(async (k) => {
        await sql`PRAGMA synchronous = FULL`.execute(k);
        try {
          return await fn(k);
        } finally {
          try {
            await sql`PRAGMA synchronous = NORMAL`.execute(k);
          } catch (err) {
            // Never in place of fn's own error; the connection stays at FULL (slower, never less safe) until it works.
            logger.warn('SQLite: could not set synchronous = NORMAL again', { error: errorMessage(err) });
          }
        }
      });
    return {
      kysely,
      dialect: 'sqlite',
      durably,
      holdLock: async () => true,
      signals: new EventEmitter(),
      checkpoints: checkpointer?.stats,
      close: async () => {
        await checkpointer?.stop();
        await kysely.destroy();
      },
    };
  }
  // A host that drops packets fails a checkout in 10 s (a 503 store-unavailable) instead of holding the request.
  const pool = new Pool({ connectionString: url, max: 10, connectionTimeoutMillis: 10_000 });
  pool.on('error', () => undefined); // idle client errors surface on the next query
  // pg-pool listens for errors on idle clients only: a connection the server ends while it is checked out
  // (between two statements of a transaction) would emit an 'error' nobody hears, and that ends the process.
  // The statement in progress, or the next one, fails instead (StoreUnavailableError), and the pool drops it.
  pool.on('connect', (client) => {
    client.on('error', (err) => {
      logger.warn('PostgreSQL connection lost while in use', { error: err.message, code: (err as { code?: unknown }).code });
    });
  });
  const kysely = new Kysely<Database>({ dialect: new StoreErrorsPostgresDialect({ pool }) });
  const locks = advisoryLocks(url);
  return {
    kysely,
    dialect: 'postgres',
    durably: (fn) => fn(kysely),
    holdLock: (name) => locks.hold(name),
    signals: new EventEmitter(),
    close: async () => {
      await locks.close();
      await kysely.destroy();
    },
  };
}
