import type { Bundle, OperationOutcome } from '@medplum/fhirtypes';
import type { Destination } from '../config/destinations';
import { mapReferralToBundle } from '../mapping/bundle';
import { requestContext } from '../observability/context';
import { logger } from '../observability/logger';
import type { DestinationDirectory } from '../referral/service';
import type { FhirRefs, StoredReferral } from '../referral/types';
import { ulid } from '../store/ids';
import type { OutboxEntry, ReferralStore } from '../store/referral-store';
import { isExhausted, nextDelay } from './policy';
import type { FhirClients } from './clients';
import { sendTransaction, type TransactionResult } from '../fhir/transaction';

export interface DeliveryOptions {
  maxAttempts: number;
  maxAgeMs: number;
  baseDelayMs: number;
  maxDelayMs: number;
  concurrency: number;
  /** How often the worker looks for due entries when nothing wakes it. */
  idleMs: number;
}

export type DeliveryEvent = { referralId: string; status: string; previous: string; reason?: string };

/**
 * Takes outbox entries and sends them to their destination. Each entry is leased by one worker;
 * a crash leaves the lease to expire and another run resumes it. Every bundle uses conditional
 * creates, so a resend after a lost response matches what the server already holds.
 */
export class DeliveryWorker {
  private readonly workerId = `w_${ulid()}`;
  private running = false;
  private timer: NodeJS.Timeout | undefined;
  private inFlight = new Set<Promise<void>>();
  private wakeRequested = false;
  private loopPromise: Promise<void> | undefined;

  constructor(
    private readonly store: ReferralStore,
    private readonly destinations: DestinationDirectory,
    private readonly clients: FhirClients,
    private readonly opts: DeliveryOptions,
    private readonly onStatusChange: (e: DeliveryEvent) => void = () => undefined
  ) {}

  start(): void {
    if (this.running) return;
    this.running = true;
    this.wake();
  }

  /** Asks the worker to look for work now (called after a referral is queued). */
  wake(): void {
    if (!this.running) return;
    this.wakeRequested = true;
    if (!this.loopPromise) {
      if (this.timer) clearTimeout(this.timer);
      this.timer = undefined;
      // The loop belongs to no request: leave the caller's correlation context.
      this.loopPromise = requestContext.exit(() => this.loop()).finally(() => {
        this.loopPromise = undefined;
        this.schedule();
      });
    }
  }

  private schedule(): void {
    if (!this.running) return;
    if (this.wakeRequested) {
      this.wake();
      return;
    }
    this.timer = setTimeout(() => this.wake(), this.opts.idleMs);
    this.timer.unref();
  }

  private async loop(): Promise<void> {
    while (this.running && this.wakeRequested) {
      this.wakeRequested = false;
      let claimed: OutboxEntry[] = [];
      try {
        const free = this.opts.concurrency - this.inFlight.size;
        if (free <= 0) {
          await Promise.race(this.inFlight);
          this.wakeRequested = true;
          continue;
        }
        claimed = await this.store.claim(this.workerId, free, this.leaseMs());
      } catch (err) {
        logger.error('outbox claim failed', { error: (err as Error).message });
        return;
      }
      for (const entry of claimed) {
        const p: Promise<void> = requestContext
          .run({ correlationId: `delivery-${entry.id}` }, () => this.process(entry))
          .catch((err: Error) => {
            logger.error('delivery crashed on an entry', { outboxId: entry.id, referralId: entry.referralId, error: err.message });
          })
          .finally(() => {
            this.inFlight.delete(p);
            this.wake();
          });
        this.inFlight.add(p);
      }
      if (claimed.length > 0) this.wakeRequested = true;
    }
  }

  private leaseMs(): number {
    const longest = Math.max(30_000, ...this.destinations.ids().map((id) => this.destinations.get(id)?.timeoutMs ?? 30_000));
    return longest * 2 + 10_000;
  }

  /** Stops taking entries and waits for the ones in flight. */
  async stop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    await this.loopPromise;
    await Promise.allSettled([...this.inFlight]);
    await this.store.releaseLeases(this.workerId).catch(() => undefined);
  }

  /** Waits until nothing is in flight (for tests and benchmarks). */
  async idle(): Promise<void> {
    while (this.loopPromise || this.inFlight.size > 0) {
      await this.loopPromise;
      await Promise.allSettled([...this.inFlight]);
    }
  }

  private async process(entry: OutboxEntry): Promise<void> {
    const referral = await this.store.getById(entry.referralId);
    if (!referral) {
      await this.store.finishOutbox(entry.id, 'failed', entry.attempts, 'referral no longer exists');
      return;
    }
    const destination = this.destinations.get(referral.destination);
    if (!destination) {
      await this.retryLater(entry, referral, `destination ${referral.destination} is not configured`);
      return;
    }
    if (entry.kind !== 'submit') {
      await this.store.finishOutbox(entry.id, 'failed', entry.attempts, `outbox kind ${entry.kind} is not supported by this version`);
      return;
    }
    const bundle = mapReferralToBundle({
      referralId: referral.id,
      clientId: referral.clientId,
      referral: referral.payload,
      destination,
      createdAt: referral.createdAt,
    });
    let result: TransactionResult;
    try {
      result = await sendTransaction(this.clients.get(destination), bundle);
    } catch (err) {
      result = { kind: 'retry', reason: `unexpected error: ${(err as Error).message}` };
    }
    const attempts = entry.attempts + 1;
    switch (result.kind) {
      case 'ok': {
        const fhir = collectRefs(destination, bundle, result.locations);
        await this.store.finishOutbox(entry.id, 'done', attempts, null);
        const changed = await this.store.changeStatus(
          referral.id,
          { status: 'sent', fhir, reason: null, detail: { attempts } },
          (cur) => cur.status === 'queued' || cur.status === 'delivery-failed'
        );
        logger.info('referral delivered', { referralId: referral.id, destination: destination.id, attempts, task: fhir.task });
        if (changed) this.onStatusChange({ referralId: referral.id, status: 'sent', previous: changed.previous });
        return;
      }
      case 'fail':
        await this.failPermanently(entry, referral, attempts, `${result.status}: ${result.reason}`, result.outcome);
        return;
      case 'retry':
        await this.retryLater({ ...entry, attempts: attempts - 1 }, referral, result.reason, result.retryAfterMs, result.status);
        return;
    }
  }

  private async retryLater(entry: OutboxEntry, referral: StoredReferral, reason: string, retryAfterMs?: number, status?: number): Promise<void> {
    const attempts = entry.attempts + 1;
    const error = status ? `${status}: ${reason}` : reason;
    if (isExhausted(attempts, new Date(entry.createdAt), new Date(), { maxAttempts: this.opts.maxAttempts, maxAgeMs: this.opts.maxAgeMs })) {
      await this.failPermanently(entry, referral, attempts, `gave up after ${attempts} attempts; last error: ${error}`);
      return;
    }
    const delay = nextDelay(attempts, { baseMs: this.opts.baseDelayMs, capMs: this.opts.maxDelayMs, retryAfterMs });
    const next = new Date(Date.now() + delay).toISOString();
    await this.store.rescheduleOutbox(entry.id, attempts, next, error);
    logger.warn('delivery will be retried', { referralId: referral.id, destination: referral.destination, attempts, delayMs: delay, reason: error });
  }

  private async failPermanently(entry: OutboxEntry, referral: StoredReferral, attempts: number, error: string, outcome?: OperationOutcome): Promise<void> {
    const lastError = outcome ? `${error} ${JSON.stringify(outcome)}` : error;
    await this.store.finishOutbox(entry.id, 'failed', attempts, lastError);
    const changed = await this.store.changeStatus(referral.id, { status: 'delivery-failed', reason: error, detail: outcome ? { outcome } : undefined }, (cur) => cur.status === 'queued');
    logger.error('referral delivery failed permanently', { referralId: referral.id, destination: referral.destination, attempts, reason: error });
    if (changed) this.onStatusChange({ referralId: referral.id, status: 'delivery-failed', previous: changed.previous, reason: error });
  }
}

/** Server-assigned ids, by the role each bundle entry plays. */
export function collectRefs(destination: Destination, bundle: Bundle, locations: Array<{ resourceType: string; id: string }>): FhirRefs {
  const refs: FhirRefs = { baseUrl: destination.baseUrl, documents: [] };
  (bundle.entry ?? []).forEach((e, i) => {
    const loc = locations[i];
    if (!loc) return;
    const ref = `${loc.resourceType}/${loc.id}`;
    switch (e.resource?.resourceType) {
      case 'ServiceRequest':
        refs.serviceRequest = ref;
        break;
      case 'Task':
        refs.task = ref;
        break;
      case 'Patient':
        refs.patient = ref;
        break;
      case 'DocumentReference':
        refs.documents.push(ref);
        break;
    }
  });
  return refs;
}
