import type { OperationOutcome } from '@medplum/fhirtypes';
import type { Destination, DestinationDirectory } from '../config';
import { logger, deliveries } from '../observability';
import { ageSeconds, isExhausted, LeasedQueueRunner, notPastAgeLimit, settleRetry } from '../queue';
import type { MemoryBudget, Release } from '../memory';
import { changeStatus, type Db, deliveryQueue, getReferral, leasedQueue, noteStatus, type OutboxEntry, payloadBytes, type Settled, ulid } from '../store';
import { CircuitBreaker } from './circuit';
import { base64Length, type BlobStore } from '../blobs';
import type { DeliveryContext, DeliveryEvent, DestinationAdapter, DestinationAdapters, Outcome, ReferralSummary } from '../destinations';
import type { DeliveryTask, DocumentsTask, ReferralDocument, StoredReferral, UnreadableTask } from '../model';

/** An outbox entry without its task's payload (handed to the adapter once, see operationFor). */
type Entry = DistributiveOmit<OutboxEntry, 'payload'>;
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

export interface DeliveryOptions {
  maxAttempts: number;
  maxAgeMs: number;
  baseDelayMs: number;
  maxDelayMs: number;
  concurrency: number;
  /** How often the worker looks for due entries when nothing wakes it. */
  idleMs: number;
  /** Where streamed documents' bytes are (documents with `blob`): adapters read them from here. */
  blobs: BlobStore;
  /**
   * Outbox lease. Default: derived from the destinations' request timeouts (entryBudgetMs of the slowest
   * destination + its timeout + 2 s), e.g. 122 s for 30 s timeouts, 6 s for 1 s timeouts. An attempt that runs
   * longer (a large document's upload, whose budget grows with its size) renews it every third of it.
   */
  leaseMs?: number;
  /**
   * The slowest transfer rate an attempt's time budget allows for the documents it sends (default 1 MiB/s): the
   * budget grows by their size at this rate, so a large upload that keeps moving is not cut.
   */
  floorBytesPerSecond?: number;
  /** Clock for the circuit breakers (tests). */
  now?: () => number;
  /**
   * The process's memory budget (shared with intake): an entry reserves its referral's stored size before the
   * payload is read, and waits up to `waitMs` for room; after that it is put off for a moment, no attempt counted.
   */
  memory?: { budget: MemoryBudget; waitMs: number };
}

/** The holder name delivery reserves memory under (an API client's id cannot contain parentheses). */
const DELIVERY_HOLDER = '(delivery)';
/** How long an entry that found no room in the memory budget is put off. */
const MEMORY_RETRY_MS = 1_000;

/** Requests' worth of time one entry may take (a search, a token, the send and a re-authenticated resend). */
const REQUESTS_PER_ENTRY = 3;

/** The default floor of the transfer rate an attempt's budget allows for its documents: 1 MiB/s. */
export const FLOOR_BYTES_PER_SECOND = 1024 * 1024;

/**
 * Time one attempt at an entry may take before it is abandoned as "outcome unknown": three requests' worth of the
 * destination's timeout, plus the time its documents take at the floor rate (`bytesToSend`: what documentBytes
 * counts; e.g. 1 GiB of document adds 1,366 s at 1 MiB/s). Each request's own timeout is separate: a streamed
 * upload's is one of inactivity (src/http fetchWithDeadline).
 */
export function entryBudgetMs(destination: Pick<Destination, 'timeoutMs'>, bytesToSend = 0, floorBytesPerSecond = FLOOR_BYTES_PER_SECOND): number {
  return REQUESTS_PER_ENTRY * destination.timeoutMs + Math.ceil((bytesToSend / floorBytesPerSecond) * 1000);
}

/**
 * The bytes of document content an attempt may send, as base64 (what a transaction carries; a raw upload sends
 * three quarters of it): inline data by its length, a document in the blob store by its size.
 */
export function documentBytes(documents: ReadonlyArray<ReferralDocument>): number {
  return documents.reduce((sum, d) => sum + (d.data?.length ?? (d.blob ? base64Length(d.blob.bytes) : 0)), 0);
}

/**
 * Takes outbox entries and sends them to their destination.
 *
 * Exactly-once effect at the centre: each entry is leased by one worker (src/store's leased queue); the attempt is
 * recorded before anything is sent, so after a crash or a lost answer the next attempt knows the outcome is
 * unknown and first searches the centre for what the earlier one created (read-before-retry); and every
 * bundle entry is a conditional create (Binaries: a PUT to an id derived from the referral), so a resend
 * matches what the server already holds. An attempt that overruns its time budget is abandoned before the
 * lease can expire under it.
 *
 * Failures: exponential backoff with full jitter (Retry-After honoured), a per-destination circuit breaker
 * (entries for an open circuit are put off to the probe time without an attempt being counted), and a dead
 * letter after `maxAttempts` or `maxAgeMs`.
 */

export class DeliveryWorker extends LeasedQueueRunner<OutboxEntry> {
  private readonly workerId = `w_${ulid()}`;
  protected readonly kind = 'delivery';
  private readonly breakers = new Map<string, CircuitBreaker>();
  /** Lease renewals of the entries in flight, stopped when their outcome is recorded. */
  private readonly renewals = new Map<string, () => void>();

  constructor(
    private readonly db: Db,
    private readonly destinations: DestinationDirectory,
    private readonly adapters: DestinationAdapters,
    protected readonly opts: DeliveryOptions,
    private readonly onStatusChange: (e: DeliveryEvent) => void = () => undefined
  ) {
    super();
  }

  start(): void {
    this.startLoop();
  }

  protected claim(free: number): Promise<OutboxEntry[]> {
    return leasedQueue.claim(this.db, deliveryQueue, this.workerId, free, this.leaseMs());
  }

  /** Circuit state per destination that has had a delivery: 0 closed, 1 half-open, 2 open (for /metrics). */
  circuitStates(): Array<{ destination: string; state: number }> {
    const code = { closed: 0, 'half-open': 1, open: 2 } as const;
    return [...this.breakers].map(([destination, b]) => ({ destination, state: code[b.currentState] }));
  }

  /** The circuit breaker of a destination (created on first use). */
  circuit(destination: Destination): CircuitBreaker {
    let b = this.breakers.get(destination.id);
    if (!b) {
      const probeWaitMs = Math.min(Math.max(destination.timeoutMs, 500), 5_000);
      b = CircuitBreaker.fromSettings(destination.circuitBreaker, probeWaitMs, this.opts.now, (t) => {
        const meta = { destination: destination.id, from: t.from, to: t.to, cooldownMs: t.cooldownMs, consecutiveFailures: t.consecutiveFailures };
        if (t.to === 'open') logger.warn('destination circuit opened: deliveries paused', meta);
        else logger.info(`destination circuit ${t.to}`, meta);
        // An entry put off to the probe time wakes the loop by the idle timer; make sure one is not far away.
        if (t.to === 'closed') this.wake();
      });
      this.breakers.set(destination.id, b);
    }
    return b;
  }

  /**
   * The lease must outlast one attempt: its time budget, a token request that may have started just before
   * the budget ran out, and the store writes that follow. Short timeouts give short leases, so entries held by
   * a crashed process are taken over soon. An attempt whose budget is longer (large documents) keeps its entry
   * by renewing the lease every third of it while it runs (keepLease), so the lease stays ahead of the attempt
   * and a crash still frees the entry within one lease.
   */
  leaseMs(): number {
    if (this.opts.leaseMs !== undefined) return this.opts.leaseMs;
    const timeouts = this.destinations.ids().map((id) => this.destinations.get(id)?.timeoutMs ?? 30_000);
    const longest = timeouts.length > 0 ? Math.max(...timeouts) : 30_000;
    return entryBudgetMs({ timeoutMs: longest }) + longest + 2_000;
  }

  /** Stops taking entries and waits for the ones in flight. */
  async stop(): Promise<void> {
    await this.stopLoop();
    await Promise.allSettled([...this.inFlight]);
    await leasedQueue.releaseLeases(this.db, deliveryQueue, this.workerId).catch(() => undefined);
  }

  protected async process(claimed: OutboxEntry): Promise<void> {
    const lost = new AbortController();
    this.renewals.set(claimed.id, this.keepLease(claimed, lost));
    try {
      await this.processHeld(claimed, lost.signal);
    } finally {
      this.stopRenewing(claimed.id);
    }
  }

  /**
   * Renews the lease of an entry every third of it until its outcome is recorded; aborts `lost` when the entry is
   * no longer this worker's (its lease was taken over), so the attempt stops sending.
   */
  private keepLease(entry: { id: string; referralId: string }, lost: AbortController): () => void {
    const leaseMs = this.leaseMs();
    const timer = setInterval(
      () => {
        leasedQueue.extendLease(this.db, deliveryQueue, entry.id, this.workerId, leaseMs).then(
          (held) => {
            if (held || !this.renewals.has(entry.id)) return;
            logger.warn('outbox entry lease was taken over during the attempt; abandoning it', { outboxId: entry.id, referralId: entry.referralId });
            lost.abort();
          },
          (err: Error) => logger.warn('outbox entry lease could not be renewed', { outboxId: entry.id, referralId: entry.referralId, error: err.message })
        );
      },
      Math.max(100, Math.floor(leaseMs / 3))
    );
    timer.unref();
    return () => clearInterval(timer);
  }

  private stopRenewing(id: string): void {
    this.renewals.get(id)?.();
    this.renewals.delete(id);
  }

  private async processHeld(claimed: OutboxEntry, lost: AbortSignal): Promise<void> {
    // The payloads (a referral's documents, documents added later) may be megabytes of base64: they are handed
    // to the operation once and not kept here, so they can be collected as soon as it has sent them.
    const { payload: _entryPayload, ...entry } = claimed;
    const task = { held: taskOf(claimed) };
    (claimed as { payload: unknown }).payload = null; // the loop's copy of the entry no longer holds it either
    // The referral's submission (megabytes of documents, read and parsed below) is held within the memory budget
    // that request bodies draw from, so a backlog of large deliveries and a burst of large uploads together
    // stay within MAX_INTAKE_BYTES_IN_FLIGHT.
    let release: Release = () => undefined;
    if (this.opts.memory) {
      const granted = await this.opts.memory.budget.reserve(DELIVERY_HOLDER, await payloadBytes(this.db, entry.referralId), {
        waitMs: this.opts.memory.waitMs,
      });
      if (typeof granted !== 'function') {
        await this.settle(entry, {
          state: 'retry',
          attempts: entry.attempts,
          nextAttemptAt: new Date(Date.now() + MEMORY_RETRY_MS).toISOString(),
          lastError: entry.lastError ?? 'waiting for room in the memory budget',
        });
        logger.debug('delivery put off: no room in the memory budget', { referralId: entry.referralId });
        return;
      }
      release = granted;
    }
    try {
      await this.deliver(entry, task, lost);
    } finally {
      release();
    }
  }

  /** One attempt at an entry; its task is handed to the operation once (and no longer held here then). */
  private async deliver(entry: Entry, task: { held: DeliveryTask | UnreadableTask | undefined }, lost: AbortSignal): Promise<void> {
    const loaded = await this.load(entry.referralId);
    if (!loaded) {
      await this.settle(entry, { state: 'failed', attempts: entry.attempts, lastError: 'referral no longer exists' });
      return;
    }
    const referral = loaded.summary;
    let source: StoredReferral | undefined = loaded.stored;
    loaded.stored = undefined;
    const destination = this.destinations.get(referral.destination);
    if (!destination) {
      await this.retryLater(entry, referral, entry.attempts + 1, {
        kind: 'retry',
        reason: `destination ${referral.destination} is not configured`,
        neutral: true,
      });
      return;
    }
    const held = task.held;
    task.held = undefined;
    if (!held || held.kind === 'unreadable') {
      await this.settle(entry, { state: 'failed', attempts: entry.attempts, lastError: held?.problem ?? 'the entry was already delivered' });
      return;
    }
    const operation = operationFor(this.adapters.for(destination), held);

    const breaker = this.circuit(destination);
    const admission = breaker.admit();
    if (!admission.allowed) {
      await this.deferForCircuit(entry, referral, destination, admission.retryAt);
      return;
    }
    const permit = admission.permit;
    let attempt: number | undefined;
    try {
      attempt = await leasedQueue.beginAttempt(this.db, deliveryQueue, entry, this.workerId);
    } finally {
      if (attempt === undefined) breaker.released(permit);
    }
    if (attempt === undefined) {
      logger.warn('outbox entry is no longer held by this worker; skipped', { outboxId: entry.id, referralId: referral.id });
      return;
    }

    const budget = entryBudgetMs(destination, bytesToSend(held, source), this.opts.floorBytesPerSecond);
    const signal = AbortSignal.any([AbortSignal.timeout(budget), lost]);
    const ctx: DeliveryContext = {
      db: this.db,
      blobs: this.opts.blobs,
      entry,
      attempt,
      referral,
      destination,
      signal,
      emit: (e) => this.onStatusChange(e),
      takePayload: () => {
        // The store parses the payload on first access; reading it here is the only access.
        const from = source;
        source = undefined;
        if (!from) throw new Error('the referral payload was already taken');
        return from.payload;
      },
    };
    let outcome: Outcome;
    try {
      outcome = await operation(ctx);
    } catch (err) {
      if (lost.aborted) outcome = { kind: 'retry', reason: 'the lease was taken over during the attempt; outcome unknown', neutral: true };
      else if (signal.aborted) outcome = { kind: 'retry', reason: `the attempt overran its ${budget} ms budget; outcome unknown` };
      else outcome = { kind: 'retry', reason: `unexpected error: ${(err as Error).message}`, neutral: true };
    }

    if (outcome.kind === 'retry') {
      if (outcome.neutral) breaker.released(permit);
      else breaker.failed(permit);
    } else {
      breaker.succeeded(permit);
    }
    deliveries.inc({ destination: destination.id, result: outcome.kind === 'done' ? 'ok' : outcome.kind });

    switch (outcome.kind) {
      case 'done':
        await this.settle(entry, { state: 'done', attempts: attempt });
        return;
      case 'fail':
        await this.failPermanently(entry, referral, attempt, outcome.status ? `${outcome.status}: ${outcome.reason}` : outcome.reason, outcome.outcome);
        return;
      case 'retry':
        await this.retryLater(entry, referral, attempt, outcome);
        return;
    }
  }

  /**
   * The referral as a summary without its payload, and the stored object to take the payload from (once; the
   * store parses it on first access, so an operation that needs no payload, e.g. a cancel, never parses it).
   */
  private async load(id: string): Promise<{ summary: ReferralSummary; stored: StoredReferral | undefined } | undefined> {
    const stored = await getReferral(this.db, id);
    if (!stored) return undefined;
    const summary: ReferralSummary = {
      id: stored.id,
      clientId: stored.clientId,
      externalId: stored.externalId,
      destination: stored.destination,
      status: stored.status,
      statusReason: stored.statusReason,
      createdAt: stored.createdAt,
      updatedAt: stored.updatedAt,
      fhir: stored.fhir,
      report: stored.report,
      taskVersion: stored.taskVersion,
      documentsRemovedAt: stored.documentsRemovedAt,
    };
    return { summary, stored };
  }

  /** The circuit is open: put the entry off to the probe time, counting no attempt (unless it is too old). */
  private async deferForCircuit(entry: Entry, referral: ReferralSummary, destination: Destination, retryAt: number): Promise<void> {
    const lastError = entry.lastError ?? `destination ${destination.id} circuit open`;
    if (isExhausted(0, new Date(entry.createdAt), new Date(), { maxAttempts: Number.POSITIVE_INFINITY, maxAgeMs: this.opts.maxAgeMs })) {
      await this.failPermanently(
        entry,
        referral,
        entry.attempts,
        `gave up after ${entry.attempts} attempts over ${ageSeconds(Date.parse(entry.createdAt))} s (the age limit; destination circuit open); last error: ${lastError}`
      );
      return;
    }
    await this.settle(entry, {
      state: 'retry',
      attempts: entry.attempts,
      nextAttemptAt: new Date(notPastAgeLimit(retryAt, new Date(entry.createdAt), this.opts.maxAgeMs)).toISOString(),
      lastError,
    });
    deliveries.inc({ destination: destination.id, result: 'deferred' });
    logger.debug('delivery deferred: destination circuit open', {
      referralId: referral.id,
      destination: destination.id,
      until: new Date(retryAt).toISOString(),
    });
  }

  private async retryLater(entry: Entry, referral: ReferralSummary, attempts: number, outcome: Extract<Outcome, { kind: 'retry' }>): Promise<void> {
    const error = outcome.status ? `${outcome.status}: ${outcome.reason}` : outcome.reason;
    const settled = settleRetry(attempts, Date.parse(entry.createdAt), error, this.opts, { retryAfterMs: outcome.retryAfterMs, mentionAge: true });
    if (settled.kind === 'dead-letter') {
      // The dead letter keeps the server's last OperationOutcome, when it sent one.
      await this.failPermanently(entry, referral, attempts, settled.reason, outcome.outcome);
      return;
    }
    await this.settle(entry, { state: 'retry', attempts, nextAttemptAt: new Date(settled.at).toISOString(), lastError: error });
    logger.warn('delivery will be retried', {
      referralId: referral.id,
      destination: referral.destination,
      kind: entry.kind,
      attempts,
      delayMs: settled.delayMs,
      reason: error,
    });
  }

  /** Records how the worker's attempt at an entry it holds ended (nothing, when its lease was taken over). */
  private async settle(entry: Entry, outcome: Settled): Promise<void> {
    this.stopRenewing(entry.id);
    if (!(await leasedQueue.settle(this.db, deliveryQueue, entry.id, this.workerId, outcome))) {
      logger.warn('outbox entry lease was lost before the outcome was recorded', { outboxId: entry.id, referralId: entry.referralId });
    }
  }

  /**
   * Dead letter. A referral whose submission fails becomes delivery-failed; a failed documents or cancel entry
   * leaves the status alone (the referral is at the centre) and is noted in the history.
   */
  private async failPermanently(entry: Entry, referral: ReferralSummary, attempts: number, error: string, outcome?: OperationOutcome): Promise<void> {
    const lastError = outcome ? `${error} ${JSON.stringify(outcome)}` : error;
    if (entry.kind === 'submit') {
      const changed = await changeStatus(
        this.db,
        referral.id,
        { status: 'delivery-failed', reason: error, detail: outcome ? { outcome } : undefined },
        (cur) => cur.status === 'queued'
      );
      if (changed) this.onStatusChange({ referralId: referral.id, status: 'delivery-failed', previous: changed.previous, reason: error });
    } else {
      const cur = await getReferral(this.db, referral.id, { payload: false });
      await noteStatus(this.db, referral.id, (cur ?? referral).status, `${entry.kind} could not be delivered: ${error}`, outcome ? { outcome } : undefined);
    }
    await this.settle(entry, { state: 'failed', attempts, lastError });
    logger.error('delivery failed permanently', { referralId: referral.id, destination: referral.destination, kind: entry.kind, attempts, reason: error });
  }
}

/**
 * What an attempt at a task may send of document content (documentBytes), for its time budget: a submission's
 * documents (the payload is parsed here rather than in the operation; it is parsed once either way), a documents
 * task's, none for a cancel. A payload that cannot be read counts none (the operation meets the same error).
 */
function bytesToSend(task: DeliveryTask, source: StoredReferral | undefined): number {
  try {
    switch (task.kind) {
      case 'submit':
        return source ? documentBytes(source.payload.documents) : 0;
      case 'documents':
        return task.payload ? documentBytes(task.payload.documents) : 0;
      case 'cancel':
        return 0;
    }
  } catch {
    return 0;
  }
}

/** An entry's task: its kind and typed payload. */
function taskOf(entry: OutboxEntry): DeliveryTask | UnreadableTask {
  switch (entry.kind) {
    case 'submit':
      return { kind: entry.kind, payload: null };
    case 'documents':
      return { kind: entry.kind, payload: entry.payload };
    case 'cancel':
      return { kind: entry.kind, payload: entry.payload };
    case 'unreadable':
      return entry;
  }
}

/**
 * The adapter's operation for a task. A documents task's payload (megabytes of base64) is handed over once, so
 * the adapter can let it go as soon as it has sent it.
 */
function operationFor(adapter: DestinationAdapter, task: DeliveryTask): (ctx: DeliveryContext) => Promise<Outcome> {
  switch (task.kind) {
    case 'submit':
      return (ctx) => adapter.submit(ctx);
    case 'documents': {
      let held: DocumentsTask | undefined = task.payload;
      return (ctx) =>
        adapter.addDocuments(ctx, () => {
          const p = held;
          held = undefined;
          if (!p) throw new Error('the documents were already taken');
          return p;
        });
    }
    case 'cancel':
      return (ctx) => adapter.cancel(ctx, task.payload);
  }
}
