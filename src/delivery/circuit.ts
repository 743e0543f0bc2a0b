import type { CircuitBreakerSettings } from '../config';

export type CircuitState = 'closed' | 'open' | 'half-open';

export interface CircuitOptions {
  /** Consecutive retryable failures that open the circuit (default 5). */
  failureThreshold: number;
  /** First open period (default 30 s); doubles after each failed probe. */
  cooldownMs: number;
  /** Longest open period (default 10 min). */
  maxCooldownMs: number;
  /**
   * While a half-open probe is in flight, other entries are put off this long (default 1 s): by then the
   * probe has usually closed the circuit or opened it again.
   */
  probeWaitMs: number;
}

export const DEFAULT_CIRCUIT: CircuitOptions = {
  failureThreshold: 5,
  cooldownMs: 30_000,
  maxCooldownMs: 600_000,
  probeWaitMs: 1_000,
};

/** Permission to send; hand it back with exactly one of succeeded(), failed() or released(). */
export interface Permit {
  readonly probe: boolean;
}

export type Admission = { allowed: true; permit: Permit } | { allowed: false; retryAt: number; state: CircuitState };

export interface CircuitTransition {
  from: CircuitState;
  to: CircuitState;
  /** Open period when `to` is open. */
  cooldownMs?: number;
  consecutiveFailures: number;
}

/**
 * A circuit breaker for one destination.
 *
 * closed: everything goes through; `failureThreshold` consecutive retryable failures open it.
 * open: nothing goes through until `openUntil` (callers reschedule to that time without counting an attempt).
 * half-open: after the cool-down one probe goes through; its success closes the circuit, its failure opens it
 * again for twice the previous period (capped at `maxCooldownMs`).
 *
 * "Failure" means a retryable one (network, timeout, 5xx, 429, garbage): a 4xx refusal shows the server is up
 * and counts as a success here. Only results of requests admitted under the current state count: a failure
 * that started before the circuit closed again cannot re-open it at once.
 */
export class CircuitBreaker {
  private state: CircuitState = 'closed';
  private failures = 0;
  private openUntil = 0;
  private currentCooldown: number;
  private probeInFlight = false;
  /** Bumped on every transition; permits of an older epoch do not move the state. */
  private epoch = 0;
  private readonly permits = new WeakMap<Permit, number>();
  readonly opts: CircuitOptions;

  constructor(
    opts: Partial<CircuitOptions> = {},
    private readonly now: () => number = Date.now,
    private readonly onTransition: (t: CircuitTransition) => void = () => undefined
  ) {
    this.opts = { ...DEFAULT_CIRCUIT, ...definedOnly(opts) };
    if (this.opts.maxCooldownMs < this.opts.cooldownMs) {
      this.opts.maxCooldownMs = this.opts.cooldownMs;
    }
    this.currentCooldown = this.opts.cooldownMs;
  }

  static fromSettings(
    settings: CircuitBreakerSettings | undefined,
    probeWaitMs: number,
    now?: () => number,
    onTransition?: (t: CircuitTransition) => void
  ): CircuitBreaker {
    return new CircuitBreaker({ ...settings, probeWaitMs }, now, onTransition);
  }

  /** The state as of now (an open circuit whose cool-down has passed reads as half-open). */
  get currentState(): CircuitState {
    if (this.state === 'open' && this.now() >= this.openUntil) {
      return 'half-open';
    }
    return this.state;
  }

  get consecutiveFailures(): number {
    return this.failures;
  }

  /** Asks to send one request (one outbox entry). */
  admit(): Admission {
    const now = this.now();
    if (this.state === 'open') {
      if (now < this.openUntil) {
        return { allowed: false, retryAt: this.openUntil, state: 'open' };
      }
      this.transition('half-open');
    }
    if (this.state === 'half-open') {
      if (this.probeInFlight) {
        return { allowed: false, retryAt: now + this.opts.probeWaitMs, state: 'half-open' };
      }
      this.probeInFlight = true;
      return { allowed: true, permit: this.issue(true) };
    }
    return { allowed: true, permit: this.issue(false) };
  }

  /** The server answered (a success, or a refusal that a resend would not change). */
  succeeded(permit: Permit): void {
    if (!this.settle(permit)) {
      return;
    }
    this.failures = 0;
    this.currentCooldown = this.opts.cooldownMs;
    if (this.state !== 'closed') {
      this.transition('closed');
    }
  }

  /** A retryable failure: the destination is unreachable, overloaded or answering garbage. */
  failed(permit: Permit): void {
    if (!this.settle(permit)) {
      return;
    }
    this.failures++;
    if (permit.probe) {
      this.currentCooldown = Math.min(this.currentCooldown * 2, this.opts.maxCooldownMs);
      this.open();
    } else if (this.state === 'closed' && this.failures >= this.opts.failureThreshold) {
      this.open();
    }
  }

  /** The permit was not used to learn anything about the destination (e.g. the entry was skipped). */
  released(permit: Permit): void {
    this.settle(permit);
  }

  private issue(probe: boolean): Permit {
    const permit: Permit = { probe };
    this.permits.set(permit, this.epoch);
    return permit;
  }

  /** True when the permit is live and of the current epoch; frees the probe slot either way. */
  private settle(permit: Permit): boolean {
    const epoch = this.permits.get(permit);
    if (epoch === undefined) {
      return false; // already settled
    }
    this.permits.delete(permit);
    if (permit.probe) {
      this.probeInFlight = false;
    }
    return epoch === this.epoch;
  }

  private open(): void {
    this.openUntil = this.now() + this.currentCooldown;
    this.transition('open');
  }

  private transition(to: CircuitState): void {
    const from = this.state;
    this.state = to;
    this.epoch++;
    if (to !== 'half-open') {
      this.probeInFlight = false;
    }
    this.onTransition({
      from,
      to,
      cooldownMs: to === 'open' ? this.currentCooldown : undefined,
      consecutiveFailures: this.failures,
    });
  }
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
