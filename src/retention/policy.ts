import { createHash } from 'node:crypto';
import type { ReferralStatus } from '../referral/types';

/**
 * Statuses in which a referral's loop is closed: the centre answered for good (completed, rejected,
 * failed) or the referral was cancelled. Nothing is sent for it again, so the gateway no longer needs
 * its documents' bytes. `delivery-failed` is not closed: an operator may still re-queue it.
 */
export const closedStatuses: readonly ReferralStatus[] = ['completed', 'rejected', 'failed', 'cancelled'];

export interface RetentionPolicy {
  /** Days after closing when the inline document bytes are removed (0: kept). */
  documentDays: number;
  /** Days after closing when the whole referral is deleted (0: kept). */
  referralDays: number;
}

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

/** The cut-off time for a retention period: referrals closed before it are due. */
export function cutoff(now: Date, days: number): string {
  return new Date(now.getTime() - days * 24 * 3600_000).toISOString();
}
