import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { Kysely, sql } from 'kysely';
import Transport from 'winston-transport';
import { logger } from '../../src/observability/logger';
import { openDb, type Db } from '../../src/store/db';
import { classifyStoreError, isStoreUnavailable, StoreUnavailableError } from '../../src/store/errors';
import { migrate } from '../../src/store/migrations';
import { NodeSqliteDialect } from '../../src/store/sqlite-driver';

class Capture extends Transport {
  lines: Array<Record<string, unknown>> = [];
  override log(info: Record<string, unknown>, next: () => void): void {
    this.lines.push(info);
    next();
  }
}

/** The longest the event loop went without running a 1 ms timer while `during` ran. */
async function maxLoopGap<T>(during: () => Promise<T>): Promise<{ value: T; gapMs: number }> {
  let last = performance.now();
  let gapMs = 0;
  const tick = setInterval(() => {
    const now = performance.now();
    gapMs = Math.max(gapMs, now - last);
    last = now;
  }, 1);
  try {
    const value = await during();
    return { value, gapMs: Math.max(gapMs, performance.now() - last) };
  } finally {
    clearInterval(tick);
  }
}

const insertProbe = (k: Kysely<any>, id: string): Promise<unknown> => k.insertInto('store_probe').values({ id, at: new Date().toISOString() }).execute();

describe('the node:sqlite driver on a database file another connection locks', () => {
  let dir: string;
  let path: string;
  let db: Db | undefined;
  let other: DatabaseSync;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'sqlite-driver-'));
    path = join(dir, 'gateway.db');
  });
  afterEach(async () => {
    try {
      if (other?.isOpen && other.isTransaction) other.exec('ROLLBACK');
      other?.close();
    } catch {
      // already closed
    }
    await db?.close();
    db = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  const open = async (busyWaitMs: number): Promise<Db> => {
    db = openDb(`sqlite:${path}`, { busyWaitMs });
    await migrate(db.kysely);
    // The second connection, as a `sqlite3` shell or a VACUUM would hold the file.
    other = new DatabaseSync(path);
    other.exec('PRAGMA busy_timeout = 0');
    return db;
  };

  test('a write that meets the lock waits for it without blocking the event loop, and succeeds once it is released', async () => {
    const d = await open(5000);
    other.exec('BEGIN IMMEDIATE');
    const release = setTimeout(() => other.exec('COMMIT'), 1000);
    const started = Date.now();
    let gapMs: number;
    try {
      ({ gapMs } = await maxLoopGap(() => d.durably((k) => k.transaction().execute((trx) => insertProbe(trx, 'after-lock')))));
    } finally {
      clearTimeout(release);
    }
    expect(Date.now() - started).toBeGreaterThanOrEqual(900); // it did wait for the lock
    // The point of the driver: SQLite's busy wait no longer runs on the event loop (it blocked it for the
    // whole second before); the bound leaves room for a busy test machine.
    expect(gapMs).toBeLessThan(250);
    expect(await d.kysely.selectFrom('store_probe').select('id').execute()).toEqual([{ id: 'after-lock' }]);
  });

  test('a statement outside a transaction waits for the lock too', async () => {
    const d = await open(5000);
    other.exec('BEGIN IMMEDIATE');
    const release = setTimeout(() => other.exec('COMMIT'), 1000);
    let gapMs: number;
    try {
      ({ gapMs } = await maxLoopGap(() => insertProbe(d.kysely, 'autocommit')));
    } finally {
      clearTimeout(release);
    }
    expect(gapMs).toBeLessThan(250);
    expect(await d.kysely.selectFrom('store_probe').select('id').execute()).toEqual([{ id: 'autocommit' }]);
  });

  test('a lock held past the busy wait fails with StoreUnavailableError naming SQLITE_BUSY, the SQLite error as its cause', async () => {
    const d = await open(600);
    other.exec('BEGIN IMMEDIATE');
    const started = Date.now();
    const { value: err, gapMs } = await maxLoopGap(() =>
      d
        .durably((k) => k.transaction().execute((trx) => insertProbe(trx, 'never')))
        .then(
          () => undefined,
          (e: unknown) => e
        )
    );
    const waited = Date.now() - started;
    expect(isStoreUnavailable(err)).toBe(true);
    expect(err).toBeInstanceOf(StoreUnavailableError);
    expect((err as Error).message).toMatch(/SQLITE_BUSY.*database is locked/);
    expect(((err as Error).cause as { errcode?: number }).errcode).toBe(5);
    expect((err as StoreUnavailableError).retryAfterSeconds).toBeGreaterThanOrEqual(1);
    expect(waited).toBeGreaterThanOrEqual(550);
    expect(waited).toBeLessThan(2500); // STORE_BUSY_WAIT_MS, not SQLite's old 5 s busy timeout
    expect(gapMs).toBeLessThan(250);
    other.exec('ROLLBACK');
    // Nothing was left half-done: the connection takes the next transaction.
    await d.durably((k) => k.transaction().execute((trx) => insertProbe(trx, 'next')));
    expect(await d.kysely.selectFrom('store_probe').select('id').execute()).toEqual([{ id: 'next' }]);
  });

  test('a transaction holds the write lock from BEGIN (BEGIN IMMEDIATE), so a writer cannot slip in after its first read', async () => {
    const d = await open(5000);
    let otherWriter: unknown;
    await d.kysely.transaction().execute(async (trx) => {
      await trx.selectFrom('store_probe').selectAll().execute();
      try {
        other.exec("INSERT INTO store_probe (id, at) VALUES ('other', 'now')");
      } catch (err) {
        otherWriter = err;
      }
      await insertProbe(trx, 'mine');
    });
    expect((otherWriter as { errcode?: number })?.errcode).toBe(5);
    expect(await d.kysely.selectFrom('store_probe').select('id').execute()).toEqual([{ id: 'mine' }]);
  });

  test('durably() commits with synchronous = FULL and leaves NORMAL for every other write', async () => {
    const d = await open(5000);
    const level = async (k: Kysely<any>): Promise<number> => Number((await sql<{ synchronous: number }>`PRAGMA synchronous`.execute(k)).rows[0]!.synchronous);
    expect(await d.durably((k) => level(k))).toBe(2);
    expect(await level(d.kysely)).toBe(1);
  });
});

describe('a failed ROLLBACK never hides the error that caused it', () => {
  const capture = new Capture({ level: 'warn' });
  beforeAll(() => {
    logger.add(capture);
    // The capture reads the lines; the console stays quiet so the run's output stays readable.
    for (const t of logger.transports) if (t !== capture) t.silent = true;
  });
  afterAll(() => {
    for (const t of logger.transports) t.silent = false;
    logger.remove(capture);
  });
  beforeEach(() => {
    capture.lines = [];
  });

  test('a transaction SQLite has already ended reports the statement error, not "cannot rollback"', async () => {
    const db = openDb('sqlite::memory:');
    await migrate(db.kysely);
    const err = await db.kysely
      .transaction()
      .execute(async (trx) => {
        await insertProbe(trx, 'a');
        // As SQLite does itself after some failed COMMITs (an I/O error, a full disk): the transaction is gone.
        await sql`COMMIT`.execute(trx);
        throw new Error('the statement failed');
      })
      .catch((e: unknown) => e);
    expect((err as Error).message).toBe('the statement failed');
    await db.close();
  });

  test('a ROLLBACK that fails with the transaction open is logged at warn, the original error is thrown, and the next transaction works', async () => {
    const real = new DatabaseSync(':memory:');
    let failRollback = true;
    // A connection whose ROLLBACK fails (as on a disk that went away), otherwise the real one.
    const flaky = new Proxy(real, {
      get(target, prop) {
        if (prop === 'exec') {
          return (s: string) => {
            if (failRollback && /^ROLLBACK$/i.test(s.trim())) {
              failRollback = false;
              throw Object.assign(new Error('disk I/O error'), { code: 'ERR_SQLITE_ERROR', errcode: 10, errstr: 'disk I/O error' });
            }
            return target.exec(s);
          };
        }
        const v = Reflect.get(target, prop, target) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    const k = new Kysely<any>({ dialect: new NodeSqliteDialect({ database: flaky, busyWaitMs: 1000 }) });
    await sql`CREATE TABLE t (x INTEGER UNIQUE)`.execute(k);
    const err = await k
      .transaction()
      .execute(async (trx) => {
        await trx.insertInto('t').values({ x: 1 }).execute();
        await trx.insertInto('t').values({ x: 1 }).execute();
      })
      .catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/UNIQUE constraint failed/);
    expect(isStoreUnavailable(err)).toBe(false); // a constraint violation stays what it is
    const warn = capture.lines.find((l) => /ROLLBACK failed/.test(String(l.message)));
    expect(warn).toMatchObject({ level: 'warn', error: 'disk I/O error', code: 'SQLITE_IOERR' });
    // The transaction the failed ROLLBACK left open is ended first; the row of the failed one is not kept.
    await k.transaction().execute((trx) => trx.insertInto('t').values({ x: 2 }).execute());
    expect(await k.selectFrom('t').select('x').execute()).toEqual([{ x: 2 }]);
    await k.destroy();
  });
});

describe('store errors that mean "unavailable"', () => {
  const sqliteError = (errcode: number, message: string): Error => Object.assign(new Error(message), { code: 'ERR_SQLITE_ERROR', errcode, errstr: message });
  const pgError = (code: string, message: string): Error => Object.assign(new Error(message), { code });

  test.each([
    ['SQLITE_READONLY', sqliteError(8, 'attempt to write a readonly database')],
    ['SQLITE_IOERR_WRITE', sqliteError(778, 'disk I/O error')],
    ['SQLITE_FULL', sqliteError(13, 'database or disk is full')],
    ['SQLITE_CANTOPEN', sqliteError(14, 'unable to open database file')],
    ['SQLITE_CORRUPT', sqliteError(11, 'database disk image is malformed')],
    ['SQLITE_NOTADB', sqliteError(26, 'file is not a database')],
    ['SQLITE_PERM', sqliteError(3, 'access permission denied')],
    ['ECONNREFUSED', pgError('ECONNREFUSED', 'connect ECONNREFUSED 127.0.0.1:5432')],
    ['ECONNRESET', pgError('ECONNRESET', 'read ECONNRESET')],
    [
      'ECONNREFUSED',
      new AggregateError(
        [pgError('ECONNREFUSED', 'connect ECONNREFUSED ::1:5432'), pgError('ECONNREFUSED', 'connect ECONNREFUSED 127.0.0.1:5432')],
        'connect ECONNREFUSED'
      ),
    ],
    ['57P01', pgError('57P01', 'terminating connection due to administrator command')],
    ['57P03', pgError('57P03', 'the database system is starting up')],
    ['53300', pgError('53300', 'too many connections for role "gateway"')],
    ['25006', pgError('25006', 'cannot execute INSERT in a read-only transaction')],
    ['08006', pgError('08006', 'connection failure')],
    ['connection lost', new Error('Connection terminated unexpectedly')],
  ])('%s becomes StoreUnavailableError, keeping the original message and error', (name, original) => {
    const e = classifyStoreError(original);
    expect(isStoreUnavailable(e)).toBe(true);
    expect((e as Error).message).toContain(original.message);
    expect((e as Error).message).toContain(name);
    expect((e as Error).cause).toBe(original);
  });

  test.each([
    ['a UNIQUE violation on SQLite', sqliteError(2067, 'UNIQUE constraint failed: referrals.external_id')],
    ['a unique violation on PostgreSQL', pgError('23505', 'duplicate key value violates unique constraint')],
    ['a syntax error', sqliteError(1, 'near "selec": syntax error')],
    ['a plain bug', new TypeError('x is undefined')],
  ])('%s is left as it is', (_name, original) => {
    expect(classifyStoreError(original)).toBe(original);
  });
});
