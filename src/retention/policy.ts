import type { ReferralStatus } from '../model';

/**
 * Statuses in which a referral's loop is closed: the centre answered for good (completed, rejected,
 * failed) or the referral was cancelled. Nothing is sent for it again, so the gateway no longer needs
 * its documents' bytes. `delivery-failed` is not closed: an operator may still re-queue it.
 */
export const closedStatuses: readonly ReferralStatus[] = ['completed', 'rejected', 'failed', 'cancelled', 'expired'];

export interface RetentionPolicy {
  /** Days after closing when the inline document bytes are removed (0: kept). */
  documentDays: number;
  /** Days after closing when the whole referral is deleted (0: kept). */
  referralDays: number;
}

/** The cut-off time for a retention period: referrals closed before it are due. */
export function cutoff(now: Date, days: number): string {
  return new Date(now.getTime() - days * 24 * 3600_000).toISOString();
}
