// The public surface of src/store: what other folders use. Import from here, not from its files.
// Repository functions take the database (or a transaction) first, one file an aggregate (the Kysely example's
// style): referrals, history, status changes, the three leased queues, poll state, retention, backlog.
export { binaryUploadsOf, markUploadDone, markUploadPending, possiblyOrphanedUploads } from './binary-uploads';
export { openDb, type Db, type QueueName } from './db';
export { isStoreUnavailable } from './errors';
export { createStoreProbe, type StoreProbeResult } from './health';
export { newReferralId, nowIso, ulid } from './ids';
export { migrate } from './migrations';
export {
  findForIdempotency,
  getReferral,
  insertReferral,
  isUniqueViolation,
  listReferrals,
  openAtDestination,
  payloadBytes,
  type ListFilter,
  type NewReferral,
  type ReadOptions,
} from './referrals';
export { referralHistory, type HistoryEntry } from './history';
export { cancelBeforeDelivery, changeStatus, noteStatus, queueCancel, queueDocuments, type StatusChange } from './status';
export * as leasedQueue from './leased-queue-api';
export type { LeasedQueue, Settled } from './leased-queue';
export { deliveryQueue, type OutboxEntry, type OutboxKind } from './delivery-queue';
export { webhookQueue, type WebhookEntry, type WebhookEvent, type WebhookState } from './webhook-queue';
export {
  type AppointmentObservation,
  hl7Origin,
  hl7ReturnQueue,
  type Hl7Origin,
  type Hl7ReturnEntry,
  type Hl7ReturnMessage,
  type Hl7ReturnState,
} from './hl7-return';
export { getWatermark, setWatermark } from './poll-state';
export { closedBefore, deleteClosed, removeDocumentBytes, type Due } from './retention';
export { backlog, type BacklogCounts } from './backlog';
export { forgetAnswersBefore, recordAnswer, recordedAnswer, type InboundMessageKey } from './inbound-messages';
export { blobReferenced, blobsOf, expireOverdueUploads, storeUpload, unlinkBlobs, unreferencedBlobs, type UploadStored } from './uploads';
export {
  consoleAuditOf,
  createConsoleSession,
  deleteConsoleSession,
  deleteExpiredConsoleSessions,
  findConsoleSession,
  listConsoleAudit,
  recordConsoleAudit,
  touchConsoleSession,
  type ConsoleAuditEntry,
  type ConsoleRole,
  type ConsoleSession,
} from './console-sessions';
export { consoleReferralPage, openCountAt, type ConsoleListFilter } from './console-views';
