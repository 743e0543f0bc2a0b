import type { DatabaseSync, StatementSync } from 'node:sqlite';
import { setImmediate as yieldToLoop, setTimeout as sleep } from 'node:timers/promises';
import {
  type CompiledQuery,
  createQueryId,
  IdentifierNode,
  type DatabaseConnection,
  type DatabaseIntrospector,
  type Dialect,
  type DialectAdapter,
  type Driver,
  type Kysely,
  type QueryCompiler,
  type QueryResult,
  RawNode,
  SelectQueryNode,
  SqliteAdapter,
  SqliteIntrospector,
  SqliteQueryCompiler,
} from 'kysely';
import { logger } from '../observability';
import { classifyStoreError, errorMessage, isSqliteBusy, sqliteCodeName, sqliteErrcode, StoreUnavailableError } from './errors';

/**
 * A Kysely driver for node:sqlite (DatabaseSync), with no native addon.
 *
 * node:sqlite is synchronous: SQLite's own busy handler (PRAGMA busy_timeout) sleeps on the event loop while
 * another connection (a `sqlite3` shell, a VACUUM, the checkpointer) holds a lock. So the busy timeout is kept
 * short (BUSY_TIMEOUT_MS per attempt) and a statement that meets a lock is tried again after an asynchronous,
 * jittered pause, until `busyWaitMs` in all; then it fails with StoreUnavailableError. Only what is safe to
 * try again is tried again: BEGIN, COMMIT (a COMMIT that answers SQLITE_BUSY leaves the transaction open),
 * and statements outside a transaction. Transactions begin with BEGIN IMMEDIATE, so the write lock is taken
 * (and waited for) at BEGIN, and a statement inside never meets SQLITE_BUSY_SNAPSHOT halfway.
 *
 * Errors that mean the store cannot take requests (read-only, I/O error, disk full, corrupt...) become
 * StoreUnavailableError; a ROLLBACK that fails after a failed statement is logged and never replaces the
 * statement's error.
 */

/** How long one attempt may wait for a lock on the event loop. */
export const BUSY_TIMEOUT_MS = 5;

export interface NodeSqliteDriverOptions {
  database: DatabaseSync;
  /** How long, in all, a statement waits (asynchronously) for a locked database before StoreUnavailableError. */
  busyWaitMs: number;
  /** Prepared statements kept (Kysely prepares every query anew; preparing is a large part of a small query's cost). */
  statementCacheSize?: number;
}

type Param = null | number | bigint | string | Uint8Array;

const toParam = (v: unknown): Param => {
  if (v === undefined) return null;
  if (typeof v === 'boolean') return Number(v);
  return v as Param;
};

const toParams = (p: ReadonlyArray<unknown>): Param[] => p.map(toParam);

const describe = (err: unknown): { error: string; code?: string } => {
  const code = sqliteErrcode(err);
  return { error: errorMessage(err), ...(code === undefined ? {} : { code: sqliteCodeName(code) }) };
};

/** One node:sqlite connection as Kysely sees it. */
export class NodeSqliteConnection implements DatabaseConnection {
  readonly #db: DatabaseSync;
  readonly #busyWaitMs: number;
  readonly #cacheSize: number;
  readonly #cache = new Map<string, { stmt: StatementSync; reader: boolean }>();
  /** Between a BEGIN that succeeded and its COMMIT or ROLLBACK. */
  #inTransaction = false;
  /** A ROLLBACK failed and the transaction may still be open: ended before the connection is used again. */
  #mustRollback = false;
  /** The last attempt met a lock. */
  #lockedSeen = false;
  /** When the current holder asked for the connection: its wait for a lock counts from then (see #retryBusy). */
  #askedAt = Date.now();

  constructor(db: DatabaseSync, busyWaitMs: number, cacheSize: number) {
    this.#db = db;
    this.#busyWaitMs = busyWaitMs;
    this.#cacheSize = cacheSize;
  }

  /** Called by the driver as it hands the connection to a caller that asked for it at `at`. */
  handedOut(at: number): void {
    this.#askedAt = at;
  }

  get inTransaction(): boolean {
    return this.#inTransaction;
  }

  /** What SQLite says (node:sqlite 22.16+/24), else what this connection last did. */
  #sqliteInTransaction(): boolean {
    const v = (this.#db as { isTransaction?: unknown }).isTransaction;
    return typeof v === 'boolean' ? v : this.#inTransaction;
  }

  #prepare(sql: string): { stmt: StatementSync; reader: boolean } {
    let cached = this.#cache.get(sql);
    if (!cached) {
      const stmt = this.#db.prepare(sql);
      cached = { stmt, reader: stmt.columns().length > 0 };
      if (this.#cache.size >= this.#cacheSize) this.#cache.delete(this.#cache.keys().next().value as string);
      this.#cache.set(sql, cached);
    }
    return cached;
  }

  /**
   * Runs `attempt` until it does not meet a lock, pausing asynchronously between attempts (5 ms growing to
   * 100 ms, jittered so that waiting processes do not retry in step). The wait counts from when the caller
   * asked for the connection: callers queued behind one that waits for a lock have waited as long, so while
   * the database stays locked each caller fails about busyWaitMs after it came, not one busyWaitMs after
   * another. Each gets a short window of its own (up to 100 ms) for the brief locks of normal operation.
   */
  async #retryBusy<T>(what: string, attempt: () => T): Promise<T> {
    const started = Date.now();
    const deadline = Math.max(this.#askedAt + this.#busyWaitMs, started + Math.min(this.#busyWaitMs, 100));
    let pause = 5;
    // While the database is locked each attempt may block for BUSY_TIMEOUT_MS; callers queued on the mutex
    // take over from one another in microtasks, so without this their attempts would run back to back.
    if (this.#lockedSeen) await yieldToLoop();
    for (let tries = 1; ; tries++) {
      try {
        const result = attempt();
        this.#lockedSeen = false;
        return result;
      } catch (err) {
        if (!isSqliteBusy(err)) throw classifyStoreError(err);
        this.#lockedSeen = true;
        const waited = Date.now() - Math.min(this.#askedAt, started);
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new StoreUnavailableError(
            `store unavailable: the database stayed locked for ${waited} ms (STORE_BUSY_WAIT_MS=${this.#busyWaitMs}) at ${what}, ${tries} attempts: ${sqliteCodeName(sqliteErrcode(err) ?? 5)}: ${errorMessage(err)}`,
            { cause: err, retryAfterSeconds: Math.max(1, Math.ceil(this.#busyWaitMs / 1000)) }
          );
        }
        await sleep(Math.min(left, pause / 2 + Math.random() * (pause / 2)));
        pause = Math.min(pause * 2, 100);
      }
    }
  }

  /** Ends a transaction a failed ROLLBACK may have left open, before anything else runs on the connection. */
  async #settle(): Promise<void> {
    if (!this.#mustRollback) return;
    if (this.#sqliteInTransaction()) {
      try {
        this.#db.exec('ROLLBACK');
      } catch (err) {
        throw new StoreUnavailableError(`store unavailable: an earlier transaction cannot be rolled back: ${errorMessage(err)}`, {
          cause: classifyStoreError(err),
        });
      }
    }
    this.#mustRollback = false;
    this.#inTransaction = false;
  }

  async executeQuery<R>(compiledQuery: CompiledQuery): Promise<QueryResult<R>> {
    await this.#settle();
    const { sql, parameters } = compiledQuery;
    const run = (): QueryResult<R> => {
      const { stmt, reader } = this.#prepare(sql);
      const params = toParams(parameters);
      if (reader) return { rows: stmt.all(...params) as R[] };
      const { changes, lastInsertRowid } = stmt.run(...params);
      return {
        numAffectedRows: changes !== undefined && changes !== null ? BigInt(changes) : undefined,
        insertId: lastInsertRowid !== undefined && lastInsertRowid !== null ? BigInt(lastInsertRowid) : undefined,
        rows: [],
      };
    };
    if (this.#inTransaction) {
      // Inside BEGIN IMMEDIATE this connection holds the write lock; a lock met now is not retried (what the
      // transaction read may be stale by then): it fails, and the caller's transaction is rolled back.
      try {
        return run();
      } catch (err) {
        throw classifyStoreError(err);
      }
    }
    return this.#retryBusy('a statement', run);
  }

  async *streamQuery<R>(compiledQuery: CompiledQuery): AsyncIterableIterator<QueryResult<R>> {
    await this.#settle();
    if (!SelectQueryNode.is(compiledQuery.query)) throw new Error('the SQLite driver only streams select queries');
    const { sql, parameters } = compiledQuery;
    // A statement being iterated must not be reset by another use of the cached one.
    const stmt = this.#db.prepare(sql);
    let iter: Iterator<unknown>;
    try {
      iter = stmt.iterate(...toParams(parameters));
    } catch (err) {
      throw classifyStoreError(err);
    }
    for (;;) {
      let next: IteratorResult<unknown>;
      try {
        next = iter.next();
      } catch (err) {
        throw classifyStoreError(err);
      }
      if (next.done) return;
      yield { rows: [next.value as R] };
    }
  }

  async begin(): Promise<void> {
    await this.#settle();
    await this.#retryBusy('BEGIN IMMEDIATE', () => this.#db.exec('BEGIN IMMEDIATE'));
    this.#inTransaction = true;
  }

  async commit(): Promise<void> {
    await this.#retryBusy('COMMIT', () => {
      try {
        this.#db.exec('COMMIT');
      } catch (err) {
        // SQLITE_BUSY leaves the transaction open (tried again); any other failure may have ended it.
        if (!isSqliteBusy(err) && !this.#sqliteInTransaction()) this.#inTransaction = false;
        throw err;
      }
    });
    this.#inTransaction = false;
  }

  /**
   * Rolls back after a failed statement or COMMIT. Never throws: the caller is about to rethrow the error
   * that caused the rollback, which is the one to report. A transaction SQLite already ended is left alone.
   */
  async rollback(): Promise<void> {
    this.#inTransaction = false;
    if (!this.#sqliteInTransaction() && (this.#db as { isTransaction?: unknown }).isTransaction !== undefined) return;
    try {
      this.#db.exec('ROLLBACK');
    } catch (err) {
      if (/no transaction is active/i.test(errorMessage(err))) return; // SQLite rolled it back itself
      this.#mustRollback = true;
      logger.warn('SQLite ROLLBACK failed after a failed statement; the statement error is reported', describe(err));
    }
  }

  async savepoint(name: string, compileQuery: QueryCompiler['compileQuery'], command: 'savepoint' | 'rollback to' | 'release'): Promise<void> {
    const node = RawNode.createWithChildren([RawNode.createWithSql(`${command} `), IdentifierNode.create(name)]);
    await this.executeQuery(compileQuery(node, createQueryId()));
  }

  close(): void {
    this.#cache.clear();
    this.#db.close();
  }
}

/** Kysely's own SqliteDriver's mutex: the one connection serves one caller (or transaction) at a time. */
class ConnectionMutex {
  #promise?: Promise<void>;
  #resolve?: () => void;

  async lock(): Promise<void> {
    while (this.#promise) await this.#promise;
    this.#promise = new Promise((resolve) => {
      this.#resolve = resolve;
    });
  }

  unlock(): void {
    const resolve = this.#resolve;
    this.#promise = undefined;
    this.#resolve = undefined;
    resolve?.();
  }
}

export class NodeSqliteDriver implements Driver {
  readonly #mutex = new ConnectionMutex();
  readonly #connection: NodeSqliteConnection;

  constructor(opts: NodeSqliteDriverOptions) {
    opts.database.exec(`PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
    this.#connection = new NodeSqliteConnection(opts.database, opts.busyWaitMs, opts.statementCacheSize ?? 500);
  }

  async init(): Promise<void> {}

  async acquireConnection(): Promise<DatabaseConnection> {
    const asked = Date.now();
    await this.#mutex.lock();
    this.#connection.handedOut(asked);
    return this.#connection;
  }

  async beginTransaction(connection: DatabaseConnection): Promise<void> {
    await (connection as NodeSqliteConnection).begin();
  }

  async commitTransaction(connection: DatabaseConnection): Promise<void> {
    await (connection as NodeSqliteConnection).commit();
  }

  async rollbackTransaction(connection: DatabaseConnection): Promise<void> {
    await (connection as NodeSqliteConnection).rollback();
  }

  async savepoint(connection: DatabaseConnection, name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    await (connection as NodeSqliteConnection).savepoint(name, compileQuery, 'savepoint');
  }

  async rollbackToSavepoint(connection: DatabaseConnection, name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    await (connection as NodeSqliteConnection).savepoint(name, compileQuery, 'rollback to');
  }

  async releaseSavepoint(connection: DatabaseConnection, name: string, compileQuery: QueryCompiler['compileQuery']): Promise<void> {
    await (connection as NodeSqliteConnection).savepoint(name, compileQuery, 'release');
  }

  async releaseConnection(): Promise<void> {
    this.#mutex.unlock();
  }

  async destroy(): Promise<void> {
    this.#connection.close();
  }
}

/** Kysely's SQLite dialect (compiler, adapter, introspector) over NodeSqliteDriver. */
export class NodeSqliteDialect implements Dialect {
  readonly #opts: NodeSqliteDriverOptions;

  constructor(opts: NodeSqliteDriverOptions) {
    this.#opts = opts;
  }

  createDriver(): Driver {
    return new NodeSqliteDriver(this.#opts);
  }

  createQueryCompiler(): QueryCompiler {
    return new SqliteQueryCompiler();
  }

  createAdapter(): DialectAdapter {
    return new SqliteAdapter();
  }

  createIntrospector(db: Kysely<unknown>): DatabaseIntrospector {
    return new SqliteIntrospector(db);
  }
}
