/**
 * The store (SQLite file or PostgreSQL) cannot take the request now: locked past the busy wait, read-only,
 * out of space, an I/O error, corrupt, or the server is unreachable or shutting down. The HTTP layer answers
 * it 503 with `Retry-After`; the original error is `cause`, and its message is kept in `message`.
 */
export class StoreUnavailableError extends Error {
  readonly retryAfterSeconds: number;

  constructor(message: string, opts: { cause?: unknown; retryAfterSeconds?: number } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'StoreUnavailableError';
    this.retryAfterSeconds = opts.retryAfterSeconds ?? 5;
  }
}

export function isStoreUnavailable(err: unknown): err is StoreUnavailableError {
  return err instanceof StoreUnavailableError || (typeof err === 'object' && err !== null && (err as { name?: unknown }).name === 'StoreUnavailableError');
}

/** An error's message, whatever realm made it (`instanceof Error` fails for Node's own errors under a vm context). */
export function errorMessage(err: unknown): string {
  const m = (err as { message?: unknown } | null)?.message;
  return typeof m === 'string' ? m : String(err);
}

/** SQLite primary result codes (sqlite.org/rescode.html) that mean the store cannot take the request now. */
const SQLITE_UNAVAILABLE: Record<number, string> = {
  3: 'SQLITE_PERM',
  5: 'SQLITE_BUSY',
  6: 'SQLITE_LOCKED',
  8: 'SQLITE_READONLY',
  10: 'SQLITE_IOERR',
  11: 'SQLITE_CORRUPT',
  13: 'SQLITE_FULL',
  14: 'SQLITE_CANTOPEN',
  26: 'SQLITE_NOTADB',
};

/** Extended result codes worth naming in a log line (the rest are named by their primary code and number). */
const SQLITE_EXTENDED: Record<number, string> = {
  261: 'SQLITE_BUSY_RECOVERY',
  517: 'SQLITE_BUSY_SNAPSHOT',
  773: 'SQLITE_BUSY_TIMEOUT',
  262: 'SQLITE_LOCKED_SHAREDCACHE',
  264: 'SQLITE_READONLY_RECOVERY',
  520: 'SQLITE_READONLY_CANTLOCK',
  776: 'SQLITE_READONLY_ROLLBACK',
  1032: 'SQLITE_READONLY_DBMOVED',
  1288: 'SQLITE_READONLY_CANTINIT',
  1544: 'SQLITE_READONLY_DIRECTORY',
  266: 'SQLITE_IOERR_READ',
  522: 'SQLITE_IOERR_SHORT_READ',
  778: 'SQLITE_IOERR_WRITE',
  1034: 'SQLITE_IOERR_FSYNC',
  1290: 'SQLITE_IOERR_DIR_FSYNC',
  1546: 'SQLITE_IOERR_TRUNCATE',
  1802: 'SQLITE_IOERR_FSTAT',
  2058: 'SQLITE_IOERR_UNLOCK',
  2314: 'SQLITE_IOERR_RDLOCK',
  2570: 'SQLITE_IOERR_DELETE',
  3082: 'SQLITE_IOERR_NOMEM',
  3338: 'SQLITE_IOERR_ACCESS',
  3594: 'SQLITE_IOERR_CHECKRESERVEDLOCK',
  3850: 'SQLITE_IOERR_LOCK',
  4106: 'SQLITE_IOERR_CLOSE',
  4618: 'SQLITE_IOERR_SHMOPEN',
  4874: 'SQLITE_IOERR_SHMSIZE',
  5386: 'SQLITE_IOERR_SHMMAP',
  5642: 'SQLITE_IOERR_SEEK',
  6410: 'SQLITE_IOERR_GETTEMPPATH',
  6666: 'SQLITE_IOERR_CONVPATH',
  267: 'SQLITE_CORRUPT_VTAB',
  523: 'SQLITE_CORRUPT_SEQUENCE',
  779: 'SQLITE_CORRUPT_INDEX',
  270: 'SQLITE_CANTOPEN_NOTEMPDIR',
  526: 'SQLITE_CANTOPEN_ISDIR',
  782: 'SQLITE_CANTOPEN_FULLPATH',
};

/** A node:sqlite error (Node 22 and 24: `code: 'ERR_SQLITE_ERROR'`, `errcode` the extended result code, `errstr`). */
export function sqliteErrcode(err: unknown): number | undefined {
  const e = err as { code?: unknown; errcode?: unknown } | null;
  return e && e.code === 'ERR_SQLITE_ERROR' && typeof e.errcode === 'number' ? e.errcode : undefined;
}

/** SQLITE_BUSY or SQLITE_LOCKED (any extended form): another connection holds a lock; trying again may work. */
export function isSqliteBusy(err: unknown): boolean {
  const code = sqliteErrcode(err);
  return code !== undefined && ((code & 0xff) === 5 || (code & 0xff) === 6);
}

/** The name of a SQLite result code, e.g. `SQLITE_IOERR_WRITE`, or `SQLITE_IOERR (4874)` for one not listed. */
export function sqliteCodeName(code: number): string {
  return (
    SQLITE_EXTENDED[code] ??
    SQLITE_UNAVAILABLE[code] ??
    (SQLITE_UNAVAILABLE[code & 0xff] ? `${SQLITE_UNAVAILABLE[code & 0xff]} (${code})` : `SQLite error ${code}`)
  );
}

/** Socket-level failures reaching PostgreSQL (Node's errno codes). */
const NETWORK_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ECONNABORTED']);

/** node-postgres errors that carry no code but mean the connection is gone. */
const PG_CONNECTION_MESSAGES = [
  /^Connection terminated/i,
  /not queryable/i,
  /timeout exceeded when trying to connect/i,
  /^Client was closed and is not queryable/i,
  /Connection ended/i,
];

/**
 * Why a PostgreSQL error means the store is unavailable (a connection failure, the server shutting down or
 * refusing connections, out of resources, or read-only), or undefined when it is a normal query error.
 */
function postgresReason(err: unknown, depth = 0): string | undefined {
  // Duck-typed, not `instanceof Error`: socket errors come from Node's own realm (a test runner's vm context
  // has another Error).
  if (typeof err !== 'object' || err === null || depth > 2) return undefined;
  const { code, message, errors } = err as { code?: unknown; message?: unknown; errors?: unknown };
  if (typeof code === 'string') {
    if (NETWORK_CODES.has(code)) return code;
    if (/^08[0-9A-Z]{3}$/.test(code)) return `SQLSTATE ${code} (connection exception)`;
    if (code === '57P01') return 'SQLSTATE 57P01 (admin shutdown)';
    if (code === '57P02') return 'SQLSTATE 57P02 (crash shutdown)';
    if (code === '57P03') return 'SQLSTATE 57P03 (cannot connect now)';
    if (/^53[0-9A-Z]{3}$/.test(code)) return `SQLSTATE ${code} (insufficient resources)`;
    if (code === '25006') return 'SQLSTATE 25006 (read-only transaction)';
  }
  // Node reports a refused connection to a name with several addresses (localhost) as one AggregateError.
  if (Array.isArray(errors)) {
    for (const inner of errors) {
      const r = postgresReason(inner, depth + 1);
      if (r) return r;
    }
  }
  if (code === undefined && typeof message === 'string' && PG_CONNECTION_MESSAGES.some((re) => re.test(message))) return 'connection lost';
  return undefined;
}

/**
 * Returns the error to throw for a failed store call: a StoreUnavailableError (message naming the original
 * error, which is its `cause`) when the store cannot take requests now, or `err` itself for any other error
 * (a constraint violation, a bug), unchanged so callers can still tell what it was.
 */
export function classifyStoreError(err: unknown): unknown {
  if (isStoreUnavailable(err)) return err;
  const message = errorMessage(err);
  const code = sqliteErrcode(err);
  if (code !== undefined) {
    const primary = code & 0xff;
    if (!SQLITE_UNAVAILABLE[primary]) return err;
    const busy = primary === 5 || primary === 6;
    return new StoreUnavailableError(`store unavailable: ${sqliteCodeName(code)}: ${message}`, { cause: err, retryAfterSeconds: busy ? 2 : 5 });
  }
  const reason = postgresReason(err);
  if (reason) {
    const c = (err as { code?: unknown }).code;
    const contention = c === '53300' || c === '57P03';
    return new StoreUnavailableError(`store unavailable: PostgreSQL ${reason}: ${message}`, { cause: err, retryAfterSeconds: contention ? 2 : 5 });
  }
  return err;
}
