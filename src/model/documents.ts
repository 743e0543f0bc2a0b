import { createHash } from 'node:crypto';

/** What stays of a removed inline document: its size and digest, so what was sent can still be matched. */
export interface RemovedData {
  bytes: number;
  sha256: string;
  removedAt: string;
}

type Doc = { data?: unknown; dataRemoved?: RemovedData; [k: string]: unknown };

/**
 * The same documents without their inline bytes (base64 `data`), each replaced by `dataRemoved`.
 * Documents sent by URL, or already stripped, are returned as they are. Pure.
 */
export function withoutDocumentBytes<T extends Doc>(documents: readonly T[], removedAt: string): { documents: T[]; removed: number } {
  let removed = 0;
  const out = documents.map((d) => {
    if (typeof d.data !== 'string') return d;
    removed++;
    const bytes = Buffer.from(d.data, 'base64');
    const { data: _data, ...rest } = d;
    return { ...rest, dataRemoved: { bytes: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex'), removedAt } } as unknown as T;
  });
  return { documents: out, removed };
}
