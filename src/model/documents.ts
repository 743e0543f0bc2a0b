import { createHash } from 'node:crypto';

/** What stays of a removed inline document: its size and digest, so what was sent can still be matched. */
export interface RemovedData {
  bytes: number;
  sha256: string;
  removedAt: string;
}

type Doc = { data?: unknown; blob?: unknown; dataRemoved?: RemovedData; [k: string]: unknown };

/**
 * The same documents without their bytes: inline base64 `data`, or the `blob` naming streamed bytes in the blob store
 * (whose removal follows: retention collects a blob no document names), each replaced by `dataRemoved`.
 * Documents sent by URL, or already stripped, are returned as they are. Pure.
 */
export function withoutDocumentBytes<T extends Doc>(documents: readonly T[], removedAt: string): { documents: T[]; removed: number } {
  let removed = 0;
  const out = documents.map((d) => {
    const blob = d.blob as { sha256?: unknown; bytes?: unknown } | undefined;
    if (blob && typeof blob.sha256 === 'string' && typeof blob.bytes === 'number') {
      removed++;
      const { blob: _blob, ...rest } = d;
      return { ...rest, dataRemoved: { bytes: blob.bytes, sha256: blob.sha256, removedAt } } as unknown as T;
    }
    if (typeof d.data !== 'string') return d;
    removed++;
    const bytes = Buffer.from(d.data, 'base64');
    const { data: _data, ...rest } = d;
    return { ...rest, dataRemoved: { bytes: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex'), removedAt } } as unknown as T;
  });
  return { documents: out, removed };
}
