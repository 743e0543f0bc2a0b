export interface BackoffOptions {
  /** Ceiling of the first retry's delay. */
  baseMs: number;
  /** No exponential delay is longer than this. */
  capMs: number;
  /** The server's Retry-After, in ms: the delay is never shorter (even beyond `capMs`). */
  retryAfterMs?: number;
}

export interface ExhaustionLimits {
  /** Give up once this many attempts have been made. */
  maxAttempts: number;
  /** Give up once this long has passed since the first attempt. */
  maxAgeMs: number;
}

/**
 * Delay before the next attempt, "full jitter" exponential backoff: a uniform random delay in
 * `[0, min(capMs, baseMs * 2^(attempt-1)))`. `attempt` counts attempts made so far (1 after the first
 * failure). A Retry-After from the server is a floor, not capped: the server knows when it will be ready.
 */
export function nextDelay(attempt: number, opts: BackoffOptions, random: () => number = Math.random): number {
  const baseMs = nonNegative(opts.baseMs);
  const capMs = nonNegative(opts.capMs);
  const n = Number.isFinite(attempt) ? Math.max(1, Math.floor(attempt)) : 1;
  // 2^1023 is the largest finite power; beyond ~2^52 the cap has long won anyway.
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(n - 1, 52));
  const r = random();
  const jitter = Number.isFinite(r) ? Math.min(Math.max(r, 0), 1) : 0;
  const delay = Math.floor(jitter * ceiling);
  const floor = opts.retryAfterMs === undefined ? 0 : nonNegative(opts.retryAfterMs);
  return Math.max(Math.min(delay, capMs), Math.ceil(floor));
}

/** True once `attempts` reaches `maxAttempts` or the first attempt is at least `maxAgeMs` old. */
export function isExhausted(attempts: number, firstAttemptAt: Date | number, now: Date | number, limits: ExhaustionLimits): boolean {
  const age = toMs(now) - toMs(firstAttemptAt);
  return attempts >= limits.maxAttempts || age >= limits.maxAgeMs;
}

/**
 * A retry time `at`, but never later than the age limit of work queued at `queuedAt`: the last attempt happens
 * at the deadline (where isExhausted then ends it), never after it. Never earlier than `now`.
 */
export function notPastAgeLimit(at: number, queuedAt: Date | number, maxAgeMs: number, now: number = Date.now()): number {
  return Math.min(at, Math.max(now, toMs(queuedAt) + maxAgeMs));
}

function toMs(t: Date | number): number {
  return typeof t === 'number' ? t : t.getTime();
}

function nonNegative(v: number): number {
  return Number.isFinite(v) && v > 0 ? v : 0;
}

/** How a queue retries a failed attempt and when it gives up: the same for every leased queue. */
export interface RetryPolicy extends ExhaustionLimits {
  baseDelayMs: number;
  maxDelayMs: number;
}

/**
 * The options of a dispatcher that sends a leased queue's rows to the outside (status webhooks, HL7 status
 * messages): the retry policy, one exchange's time limit, how often it looks when not woken, how many rows are in
 * flight at once (a referral's rows are never sent concurrently), and on stop how long exchanges in flight may
 * finish before they are aborted (an aborted one is not counted and is sent again after the restart).
 */
export interface DispatcherOptions extends RetryPolicy {
  timeoutMs: number;
  idleMs: number;
  concurrency: number;
  stopGraceMs: number;
}

/** What to do with an entry whose attempt failed with a reason worth retrying. */
export type Settlement =
  /** Try again at `at` (ms since the epoch), `delayMs` from now. */
  | { kind: 'retry'; at: number; delayMs: number }
  /** Give up: the dead letter, with the reason to record. */
  | { kind: 'dead-letter'; reason: string; byAge: boolean };

export interface SettleOptions {
  /** The server's Retry-After, in ms (a floor for the delay). */
  retryAfterMs?: number;
  now?: number;
  random?: () => number;
  /**
   * Say in the reason when the age limit, not the attempts, ended it ("over 90 s (the age limit)"). The delivery
   * dead letter says so; the webhook dead letter keeps its shorter wording.
   */
  mentionAge?: boolean;
}

/**
 * The one retry decision of the leased queues (delivery outbox, webhook outbox): after `attempts` attempts of an
 * entry queued at `queuedAt`, the last of which failed with `lastError`, either give up (the attempts are spent,
 * or the entry is as old as the age limit) or retry after a jittered exponential delay that honours Retry-After
 * and never goes past the age limit (the last attempt happens at the deadline).
 */
export function settleRetry(attempts: number, queuedAt: Date | number, lastError: string, policy: RetryPolicy, opts: SettleOptions = {}): Settlement {
  const now = opts.now ?? Date.now();
  if (isExhausted(attempts, queuedAt, now, policy)) {
    const byAge = attempts < policy.maxAttempts;
    const why =
      byAge && opts.mentionAge
        ? `gave up after ${attempts} attempts over ${ageSeconds(queuedAt, now)} s (the age limit)`
        : `gave up after ${attempts} attempts`;
    return { kind: 'dead-letter', reason: `${why}; last error: ${lastError}`, byAge };
  }
  const delay = nextDelay(attempts, { baseMs: policy.baseDelayMs, capMs: policy.maxDelayMs, retryAfterMs: opts.retryAfterMs }, opts.random);
  const at = notPastAgeLimit(now + delay, queuedAt, policy.maxAgeMs, now);
  return { kind: 'retry', at, delayMs: at - now };
}

/** How long ago an entry was queued, in whole seconds. */
export function ageSeconds(queuedAt: Date | number, now: number = Date.now()): number {
  return Math.round((now - toMs(queuedAt)) / 1000);
}

/** A runner's options: the defaults, with every option given (and not undefined) in their place. */
export function withDefaults<T extends object>(defaults: Readonly<T>, given: Partial<T>): T {
  const defined = Object.fromEntries(Object.entries(given).filter(([, v]) => v !== undefined)) as Partial<T>;
  return { ...defaults, ...defined };
}
