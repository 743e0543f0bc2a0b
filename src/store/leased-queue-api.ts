// The leased-queue operations, exported from src/store as the namespace `leasedQueue` (leasedQueue.claim(db, deliveryQueue, ...)).
export { beginAttempt, claim, entry, extendLease, forReferral, list, pendingCount, releaseLeases, requeue, settle } from './leased-queue';
