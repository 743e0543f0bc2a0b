import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { Kysely, PostgresDialect, sql, SqliteDialect, type SqliteDatabase, type SqliteStatement } from 'kysely';
import { Pool } from 'pg';
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
  close(): Promise<void>;
}

/**
 * Kysely's SqliteDialect expects better-sqlite3's statement API (parameters as one array, `reader`);
 * node:sqlite spreads parameters and tells readers by their columns. This adapter bridges them so we
 * need no native addon.
 */
function nodeSqliteAdapter(db: DatabaseSync): SqliteDatabase {
  const cache = new Map<string, StatementSync>();
  return {
    close: () => db.close(),
    prepare(sql: string): SqliteStatement {
      // Kysely prepares every query anew; preparing is a large part of a small query's cost.
      let stmt = cache.get(sql);
      if (!stmt) {
        stmt = db.prepare(sql);
        if (cache.size >= 500) cache.delete(cache.keys().next().value as string);
        cache.set(sql, stmt);
      }
      const params = (p: ReadonlyArray<unknown>): Array<null | number | bigint | string | Uint8Array> =>
        p.map((v) => (v === undefined ? null : typeof v === 'boolean' ? Number(v) : (v as string)));
      return {
        get reader() {
          return stmt.columns().length > 0;
        },
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
    return { kysely, dialect: 'sqlite', durably, close: () => kysely.destroy() };
  }
  const pool = new Pool({ connectionString: url, max: 10 });
  pool.on('error', () => undefined); // idle client errors surface on the next query
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool }) });
  return { kysely, dialect: 'postgres', durably: (fn) => fn(kysely), close: () => kysely.destroy() };
}
