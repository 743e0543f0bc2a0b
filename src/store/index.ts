// The public surface of src/store: what other folders use. Import from here, not from its files.
export { binaryUploadsOf, markUploadDone, markUploadPending, possiblyOrphanedUploads } from './binary-uploads';
export { openDb, type Db } from './db';
export { isStoreUnavailable } from './errors';
export { createStoreProbe, type StoreProbeResult } from './health';
export { newReferralId, nowIso, ulid } from './ids';
export { migrate } from './migrations';
export { ReferralStore, type HistoryEntry, type ListFilter, type OutboxEntry, type WebhookEvent } from './referral-store';
export { WebhookStore, type WebhookEntry, type WebhookState } from './webhook-store';
