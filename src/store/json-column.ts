import { type RawBuilder, sql } from 'kysely';
import type { Db } from './db';

/**
 * A JSON column's value for a payload that may carry megabytes of document data: its UTF-8 bytes (jsonBytes),
 * bound as they are. PostgreSQL takes the bytes as the text parameter's binary form; SQLite would store a
 * bound Buffer as a BLOB, so it is cast to TEXT there (the column keeps its type, readers are unchanged).
 */
export function jsonValue(db: Db, bytes: Buffer): RawBuilder<string> {
  return db.dialect === 'sqlite' ? sql<string>`cast(${bytes} as text)` : sql<string>`${bytes}`;
}
