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
export function isExhausted(
  attempts: number,
  firstAttemptAt: Date | number,
  now: Date | number,
  limits: ExhaustionLimits
): boolean {
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
