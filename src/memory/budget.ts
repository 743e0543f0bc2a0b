import { Counter, Gauge } from 'prom-client';
import { metricsRegistry } from '../observability';

export interface MemoryBudgetOptions {
  /** Bytes of request bodies and delivery payloads the process holds at once (MAX_INTAKE_BYTES_IN_FLIGHT). */
  maxBytes: number;
  /** INTAKE_CLIENT_SHARE: the fraction of maxBytes one holder (an API client, or delivery) may hold while others wait. */
  holderShare?: number;
}

/** Why a reservation was not granted: no room came in time, or the caller gave up (its signal). */
export type Refusal = 'timeout' | 'aborted';

/** Gives a reservation's room back; calling it again does nothing. */
export type Release = () => void;

const inFlightGauge = new Gauge({
  name: 'referral_intake_bytes_in_flight',
  help: 'Bytes reserved in the memory budget (MAX_INTAKE_BYTES_IN_FLIGHT): request bodies being received, parsed and stored, and payloads being delivered',
  registers: [metricsRegistry],
});

const holderGauge = new Gauge({
  name: 'referral_intake_client_bytes_in_flight',
  help: 'Bytes reserved per holder: an API client, or "(delivery)" (bounded by INTAKE_CLIENT_SHARE x MAX_INTAKE_BYTES_IN_FLIGHT)',
  labelNames: ['client'] as const,
  registers: [metricsRegistry],
});

const waitedOutCounter = new Counter({
  name: 'referral_intake_wait_timeouts_total',
  help: 'Reservations that got no room in the memory budget in time (an intake 503, or a delivery put off), per holder',
  labelNames: ['client'] as const,
  registers: [metricsRegistry],
});

interface Waiter {
  holder: string;
  cost: number;
  admit: () => void;
}

/**
 * A budget of bytes held in memory at once, shared fairly between holders. A referral's body is held while it
 * is received, parsed, checked and stored, and a referral's payload while it is delivered; fifty clients
 * uploading 20 MB documents at once (or a backlog of large referrals being delivered) could otherwise take all
 * the heap.
 *
 * - The budget: the reservations held stay within maxBytes; one reservation is always granted when nothing else
 *   is held, so a body the size of MAX_BODY_BYTES never waits forever.
 * - The share: one holder holds at most holderShare x maxBytes, so a client that opens many slow uploads cannot
 *   take the room the others (and delivery) need; a holder that holds nothing always has one reservation
 *   granted (when the budget has room for it), so a single big body still passes.
 * - Order: waiting reservations are granted in arrival order, except that those of a holder over its share are
 *   passed over (they wait for that holder's own reservations to end) and the next holder's go first.
 */
export class MemoryBudget {
  readonly maxBytes: number;
  readonly #shareBytes: number;
  #held = 0;
  readonly #byHolder = new Map<string, number>();
  readonly #waiting: Waiter[] = [];
  #pumping = false;
  #again = false;

  constructor(opts: MemoryBudgetOptions) {
    this.maxBytes = opts.maxBytes;
    this.#shareBytes = Math.max(1, Math.floor(Math.min(1, opts.holderShare ?? 1) * opts.maxBytes));
  }

  /** Bytes reserved now, in all. */
  get held(): number {
    return this.#held;
  }

  /**
   * Reserves `cost` bytes for `holder`: resolves with the release once granted, or with why not ('timeout' after
   * `waitMs`, 'aborted' when `signal` fires first). A cost of 0 is granted at once.
   */
  reserve(holder: string, cost: number, opts: { waitMs: number; signal?: AbortSignal }): Promise<Release | Refusal> {
    if (cost <= 0) return Promise.resolve(() => undefined);
    if (opts.signal?.aborted) return Promise.resolve('aborted');
    return new Promise((resolve) => {
      // eslint-disable-next-line prefer-const -- leave/admit read it before it is set (#pump can admit synchronously): a const there would throw
      let timer: NodeJS.Timeout | undefined;
      const leave = (why: Refusal): void => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        const i = this.#waiting.indexOf(entry);
        if (i >= 0) this.#waiting.splice(i, 1);
        if (why === 'timeout') waitedOutCounter.inc({ client: holder });
        resolve(why);
        // It may have held back others (the oldest that did not fit, or its holder's later reservations).
        this.#pump();
      };
      const onAbort = (): void => leave('aborted');
      const entry: Waiter = {
        holder,
        cost,
        admit: () => {
          clearTimeout(timer);
          opts.signal?.removeEventListener('abort', onAbort);
          this.#add(holder, cost);
          let released = false;
          resolve(() => {
            if (released) return;
            released = true;
            this.#add(holder, -cost);
            this.#pump();
          });
        },
      };
      this.#waiting.push(entry);
      this.#pump();
      if (!this.#waiting.includes(entry)) return; // granted
      timer = setTimeout(() => leave('timeout'), opts.waitMs);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  #globalFits(cost: number): boolean {
    return this.#held === 0 || this.#held + cost <= this.maxBytes;
  }

  #holderFits(holder: string, cost: number): boolean {
    const h = this.#byHolder.get(holder) ?? 0;
    return h === 0 || h + cost <= this.#shareBytes;
  }

  /** Grants waiting reservations in order; a holder over its share is passed over, the first other that does not fit stops it. */
  #pump(): void {
    // A grant may release room synchronously and call pump again: run once more instead.
    if (this.#pumping) {
      this.#again = true;
      return;
    }
    this.#pumping = true;
    try {
      do {
        this.#again = false;
        let passedOver: Set<string> | undefined;
        for (let i = 0; i < this.#waiting.length;) {
          const w = this.#waiting[i];
          if (passedOver?.has(w.holder) || !this.#holderFits(w.holder, w.cost)) {
            (passedOver ??= new Set()).add(w.holder);
            i++;
            continue;
          }
          if (!this.#globalFits(w.cost)) break;
          this.#waiting.splice(i, 1);
          w.admit();
        }
      } while (this.#again);
    } finally {
      this.#pumping = false;
    }
  }

  #add(holder: string, delta: number): void {
    const h = (this.#byHolder.get(holder) ?? 0) + delta;
    if (h <= 0) {
      this.#byHolder.delete(holder);
      holderGauge.remove({ client: holder });
    } else {
      this.#byHolder.set(holder, h);
      holderGauge.set({ client: holder }, h);
    }
    this.#held += delta;
    inFlightGauge.set(this.#held);
  }
}
