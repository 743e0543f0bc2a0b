import { requestContext, logger } from '../observability';

/**
 * The loop shared by the delivery worker and the webhook dispatcher: claim due rows of a durable
 * queue with a lease (at most `concurrency` in flight), process each in its own correlation context,
 * and look again when woken or after `idleMs`. Subclasses say how to claim and how to process.
 */
export abstract class LeasedQueueRunner<E extends { id: string; referralId: string }> {
  protected running = false;
  protected readonly inFlight = new Set<Promise<void>>();
  private timer: NodeJS.Timeout | undefined;
  private wakeRequested = false;
  private loopPromise: Promise<void> | undefined;

  /** `delivery` or `webhook`: names correlation ids and log lines. */
  protected abstract readonly kind: string;
  /** At most `concurrency` entries in flight; look again after `idleMs` when not woken. */
  protected abstract readonly opts: { readonly concurrency: number; readonly idleMs: number };
  protected abstract claim(free: number): Promise<E[]>;
  protected abstract process(entry: E): Promise<void>;

  /** Starts looking for work. */
  protected startLoop(): void {
    if (this.running) return;
    this.running = true;
    this.wake();
  }

  /** Asks the runner to look for due rows now. */
  wake(): void {
    if (!this.running) return;
    this.wakeRequested = true;
    if (!this.loopPromise) {
      if (this.timer) clearTimeout(this.timer);
      this.timer = undefined;
      // The loop belongs to no request: leave the caller's correlation context.
      this.loopPromise = requestContext
        .exit(() => this.loop())
        .finally(() => {
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
      let claimed: E[];
      try {
        const free = this.opts.concurrency - this.inFlight.size;
        if (free <= 0) {
          await Promise.race(this.inFlight);
          this.wakeRequested = true;
          continue;
        }
        claimed = await this.claim(free);
      } catch (err) {
        logger.error(`${this.kind} claim failed`, { error: (err as Error).message });
        return;
      }
      for (const entry of claimed) {
        const p: Promise<void> = requestContext
          .run({ correlationId: `${this.kind}-${entry.id}` }, () => this.process(entry))
          .catch((err: Error) => {
            logger.error(`${this.kind} crashed on an entry`, { entryId: entry.id, referralId: entry.referralId, error: err.message });
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

  /** Stops taking rows and waits for the loop itself; the rows in flight are the caller's to wait for. */
  protected async stopLoop(): Promise<void> {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.loopPromise;
  }

  /**
   * Stops taking rows; the attempts in flight get `graceMs` to finish, then `abort()` ends them. An aborted attempt
   * is not counted and its row stays pending (leased until the caller releases it): it is sent again after a restart.
   */
  protected async stopWithGrace(graceMs: number, abort: () => void): Promise<void> {
    await this.stopLoop();
    if (this.inFlight.size === 0) return;
    let grace: NodeJS.Timeout | undefined;
    const expired = new Promise<void>((resolve) => {
      grace = setTimeout(resolve, graceMs);
    });
    await Promise.race([Promise.allSettled([...this.inFlight]), expired]);
    clearTimeout(grace);
    abort();
    await Promise.allSettled([...this.inFlight]);
  }

  /** Waits until nothing is in flight (for tests and benchmarks). */
  async idle(): Promise<void> {
    while (this.loopPromise || this.inFlight.size > 0) {
      await this.loopPromise;
      await Promise.allSettled([...this.inFlight]);
    }
  }
}
