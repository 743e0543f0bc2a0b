import type { Readable } from 'node:stream';
import type { BlobStore } from '../blobs';
import type { OperationOutcome } from '@medplum/fhirtypes';
import type { Destination } from '../config';
import type { CancelTask, DocumentsTask, Referral, ReportInfo, StoredReferral } from '../model';
import type { Db, OutboxEntry } from '../store';

/** A status change a delivery made (sent, delivery-failed...), for webhooks and logs. */
export type DeliveryEvent = { referralId: string; status: string; previous: string; reason?: string };

/** What one attempt at an outbox entry came to. */
export type Outcome =
  /** Finished: the entry is done. */
  | { kind: 'done' }
  /**
   * Try again later. `neutral` says the destination is not to blame (e.g. the referral has not reached the
   * centre yet), so the circuit breaker does not count it.
   */
  | { kind: 'retry'; reason: string; retryAfterMs?: number; status?: number; outcome?: OperationOutcome; neutral?: boolean }
  /** A resend will not help: dead letter. */
  | { kind: 'fail'; reason: string; status?: number; outcome?: OperationOutcome };

/** A stored referral without its payload (which may carry megabytes of document data). */
export type ReferralSummary = Omit<StoredReferral, 'payload'>;

/** What the delivery worker hands an adapter for one attempt at one outbox entry. */
export interface DeliveryContext {
  /** The store, for the adapter's records of what reached the centre (its refs, raw uploads): src/store's repositories. */
  db: Db;
  /** The blob store: the bytes of documents that carry a `blob` (streamed uploads), read as streams. */
  blobs: BlobStore;
  /** The entry as claimed, without its payload (the task's own argument): `entry.attempts` counts earlier attempts. */
  entry: Pick<OutboxEntry, 'id' | 'referralId' | 'kind' | 'attempts' | 'createdAt'>;
  /** This attempt's number (entry.attempts + 1), already recorded. */
  attempt: number;
  referral: ReferralSummary;
  /**
   * The referral's payload, handed over once: after the call the context no longer holds it, so once the
   * adapter has sent it, a large document's data can be collected before the store writes that follow.
   */
  takePayload(): Referral;
  destination: Destination;
  /** Aborts when the entry's time budget (within its lease) runs out. */
  signal: AbortSignal;
  emit: (e: DeliveryEvent) => void;
}

/**
 * A report's bytes as the centre serves them, as a stream: the reader consumes or destroys `body` (destroying it
 * stops the read at the centre). `bytes` is its length when known beforehand (the centre's Content-Length, or
 * inline data). The body fails mid-way when the centre's answer breaks off.
 */
export interface ReportContent {
  contentType: string;
  bytes?: number;
  body: Readable;
}

export interface ReadReportOptions {
  /** Stops the read (a client gone, a shutdown). */
  signal?: AbortSignal;
}

/** How a tracking cycle read the centre: changes since the watermark, or the open referrals one batch of ids at a time. */
export type TrackingMode = 'delta' | 'ids';

/** What the centre says of one referral, for the tracker to apply (src/tracking decides what it means). */
export type CentreObservation =
  /**
   * The centre's Task (the FHIR Task state machine is the gateway's vocabulary for where a referral is) in
   * `taskStatus`, at `version` (a version seen already is skipped), with the centre's reason. `report` reads the
   * opinion report; it is called only when the referral completes with this observation.
   */
  | {
      kind: 'task';
      /** The referral it belongs to (undefined: not one of the gateway's). */
      referralId: string | undefined;
      taskStatus: string;
      version: string | null;
      reason?: string;
      businessStatus?: string;
      /** The codes of Task.businessStatus (the tracker matches them against the booking codes). */
      businessStatusCodes?: { system?: string; code: string }[];
      /** When the centre scheduled the work: Task.executionPeriod.start, else Task.restriction.period.start. */
      appointmentStart?: string;
      report: (referral: ReferralSummary) => Promise<ReportInfo | null>;
    }
  /** The centre withdrew the referral (revoked its request, deleted its Task): it is cancelled, with the reason. */
  | { kind: 'withdrawn'; referralId: string; reason: string; detail: Record<string, unknown> };

/** What the tracker hands an adapter for one cycle at one destination. */
export interface TrackingContext {
  destination: Destination;
  options: {
    /** Look back this far before the watermark, against clock skew and late commits. */
    overlapMs: number;
    pageSize: number;
    /** How often the open referrals are read one by one (batched) even when changes can be searched. */
    sweepEveryMs: number;
    /** Longest URL for a batched read. */
    maxUrlLength: number;
  };
  /** Referrals at this destination whose state at the centre may still change. */
  openReferrals(): Promise<ReferralSummary[]>;
  /** How far the last cycle read (the centre's clock), or null before the first. */
  watermark(): Promise<string | null>;
  /** Moves the watermark forward (never back). */
  advanceWatermark(to: string): Promise<void>;
  /** Applies an observation; `resource` names what it came from in logs. Never throws: a failure is logged. */
  observe(o: CentreObservation, resource?: string): Promise<void>;
  /** Counts requests made and resources seen, for the cycle's stats. */
  counted(c: { requests?: number; seen?: number }): void;
}

/**
 * A kind of destination (README.md beside this file): how a referral reaches a centre of that kind, and how
 * what the centre answered is read back. The delivery worker calls submit / addDocuments / cancel for the
 * outbox entries of that kind (retries, leases, circuit breaking and the dead letter are the worker's); the
 * report route calls readReport.
 */
export interface DestinationAdapter {
  /** The `type` of the destinations it serves (`fhir` is the default). */
  readonly type: string;
  /** Sends a new referral (outbox kind `submit`). */
  submit(ctx: DeliveryContext): Promise<Outcome>;
  /**
   * Sends documents added to a referral already at the centre (outbox kind `documents`). `take` hands the documents
   * over once, in the same way as takePayload.
   */
  addDocuments(ctx: DeliveryContext, take: () => DocumentsTask): Promise<Outcome>;
  /** Withdraws a referral at the centre (outbox kind `cancel`). */
  cancel(ctx: DeliveryContext, task: CancelTask): Promise<Outcome>;
  /** One tracking cycle at a destination: reads what changed at the centre and observes it (src/tracking applies it). */
  track(ctx: TrackingContext): Promise<TrackingMode>;
  /** The bytes of a referral's opinion report at its destination. */
  readReport(referral: StoredReferral, destination: Destination, opts?: ReadReportOptions): Promise<ReportContent>;
}
