import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { Kysely, PostgresDialect, sql, SqliteDialect, type SqliteDatabase, type SqliteStatement } from 'kysely';
import { Client, Pool } from 'pg';
import { logger } from '../observability/logger';
import { type CheckpointStats, startCheckpointer } from './checkpointer';
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
  /** SQLite file databases: what the background WAL checkpointer has done (see checkpointer.ts). */
  checkpoints?: () => CheckpointStats;
  close(): Promise<void>;
}

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
 * Kysely's SqliteDialect expects better-sqlite3's statement API (parameters as one array, `reader`);
 * node:sqlite spreads parameters and tells readers by their columns. This adapter bridges them so we
 * need no native addon.
 */
function nodeSqliteAdapter(db: DatabaseSync): SqliteDatabase {
  const cache = new Map<string, { stmt: StatementSync; reader: boolean }>();
  return {
    close: () => db.close(),
    prepare(sql: string): SqliteStatement {
      // Kysely prepares every query anew; preparing is a large part of a small query's cost.
      let cached = cache.get(sql);
      if (!cached) {
        const prepared = db.prepare(sql);
        cached = { stmt: prepared, reader: prepared.columns().length > 0 };
        if (cache.size >= 500) cache.delete(cache.keys().next().value as string);
        cache.set(sql, cached);
      }
      const { stmt, reader } = cached;
      const params = (p: ReadonlyArray<unknown>): Array<null | number | bigint | string | Uint8Array> =>
        p.map((v) => (v === undefined ? null : typeof v === 'boolean' ? Number(v) : (v as string)));
      return {
        reader,
        all: (p) => stmt.all(...params(p)),
        run: (p) => {
          const r = stmt.run(...params(p));
          return { changes: r.changes, lastInsertRowid: r.lastInsertRowid };
        },
        iterate: (p) => stmt.iterate(...params(p)) as IterableIterator<unknown>,
      };
    },
  };
}

/** Opens the store named by DATABASE_URL: `sqlite:<path>` (or `sqlite::memory:`) or `postgres://...`. */
export function openDb(url: string): Db {
  if (url.startsWith('sqlite:')) {
    const path = url.slice('sqlite:'.length);
    if (path !== ':memory:') {
      mkdirSync(dirname(path), { recursive: true });
    }
    const raw = new DatabaseSync(path);
    raw.exec('PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;');
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
    const kysely = new Kysely<Database>({ dialect: new SqliteDialect({ database: nodeSqliteAdapter(raw) }) });
    // The connection is held for the whole callback, so no other query runs with FULL by accident, and none
    // of the callback's with NORMAL.
    const durably = <T>(fn: (k: Kysely<Database>) => Promise<T>): Promise<T> =>
      kysely.connection().execute(async (k) => {
        await sql`PRAGMA synchronous = FULL`.execute(k);
        try {
          return await fn(k);
        } finally {
          await sql`PRAGMA synchronous = NORMAL`.execute(k);
        }
      });
    return {
      kysely,
      dialect: 'sqlite',
      durably,
      holdLock: async () => true,
      checkpoints: checkpointer?.stats,
      close: async () => {
        await checkpointer?.stop();
        await kysely.destroy();
      },
    };
  }
  const pool = new Pool({ connectionString: url, max: 10 });
  pool.on('error', () => undefined); // idle client errors surface on the next query
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  const locks = advisoryLocks(url);
  return {
    kysely,
    dialect: 'postgres',
    durably: (fn) => fn(kysely),
    holdLock: (name) => locks.hold(name),
    close: async () => {
      await locks.close();
      await kysely.destroy();
    },
  };
}
