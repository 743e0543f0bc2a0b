import { isExhausted, nextDelay, notPastAgeLimit } from '../../src/queue';

const opts = { baseMs: 1_000, capMs: 60_000 };
const justBelowOne = () => 0.999_999;

describe('nextDelay', () => {
  it('uses full jitter: random 0 gives 0, random just below 1 gives just below the exponential ceiling', () => {
    expect(nextDelay(1, opts, () => 0)).toBe(0);
    expect(nextDelay(1, opts, justBelowOne)).toBe(999);
    expect(nextDelay(2, opts, justBelowOne)).toBe(1_999);
    expect(nextDelay(3, opts, justBelowOne)).toBe(3_999);
    expect(nextDelay(4, opts, () => 0.5)).toBe(4_000);
  });

  it('stays within [0, min(cap, base * 2^(attempt-1))) for many random draws', () => {
    for (let attempt = 1; attempt <= 12; attempt++) {
      const ceiling = Math.min(opts.capMs, opts.baseMs * 2 ** (attempt - 1));
      for (let i = 0; i < 200; i++) {
        const d = nextDelay(attempt, opts);
        expect(d).toBeGreaterThanOrEqual(0);
        expect(d).toBeLessThan(ceiling);
        expect(Number.isInteger(d)).toBe(true);
      }
    }
  });

  it('is capped, including for huge attempt numbers', () => {
    expect(nextDelay(7, opts, justBelowOne)).toBe(59_999); // 64 s ceiling capped to 60 s
    expect(nextDelay(50, opts, justBelowOne)).toBeLessThan(60_000);
    expect(nextDelay(10_000, opts, justBelowOne)).toBeLessThan(60_000);
    expect(nextDelay(Number.MAX_SAFE_INTEGER, opts, () => 0.5)).toBe(30_000);
  });

  it('spreads retries: draws differ across the range (jitter is not constant)', () => {
    const draws = new Set(Array.from({ length: 50 }, () => nextDelay(6, opts)));
    expect(draws.size).toBeGreaterThan(40);
  });

  it('waits at least Retry-After, even beyond the cap', () => {
    expect(nextDelay(1, { ...opts, retryAfterMs: 2_000 }, () => 0)).toBe(2_000);
    expect(nextDelay(1, { ...opts, retryAfterMs: 120_000 }, justBelowOne)).toBe(120_000);
  });

  it('keeps the jittered delay when it is already longer than Retry-After', () => {
    expect(nextDelay(6, { ...opts, retryAfterMs: 1_000 }, () => 0.5)).toBe(16_000);
  });

  it('treats attempt < 1, NaN and negative inputs defensively', () => {
    expect(nextDelay(0, opts, justBelowOne)).toBe(999);
    expect(nextDelay(Number.NaN, opts, justBelowOne)).toBe(999);
    expect(nextDelay(1, { ...opts, retryAfterMs: -5 }, () => 0)).toBe(0);
    expect(nextDelay(3, { baseMs: 1_000, capMs: 0 }, justBelowOne)).toBe(0);
    expect(nextDelay(3, opts, () => 1.5)).toBeLessThanOrEqual(4_000); // a misbehaving random source is clamped
  });
});

describe('isExhausted', () => {
  const limits = { maxAttempts: 5, maxAgeMs: 24 * 3600_000 };
  const first = new Date('2026-03-01T10:00:00Z');

  it('is exhausted once attempts reach maxAttempts', () => {
    const soon = new Date(first.getTime() + 60_000);
    expect(isExhausted(4, first, soon, limits)).toBe(false);
    expect(isExhausted(5, first, soon, limits)).toBe(true);
    expect(isExhausted(6, first, soon, limits)).toBe(true);
  });

  it('is exhausted once the first attempt is maxAgeMs old, whatever the count', () => {
    expect(isExhausted(1, first, new Date(first.getTime() + limits.maxAgeMs - 1), limits)).toBe(false);
    expect(isExhausted(1, first, new Date(first.getTime() + limits.maxAgeMs), limits)).toBe(true);
  });

  it('accepts epoch milliseconds as well as Dates', () => {
    const t = first.getTime();
    expect(isExhausted(1, t, t + 1_000, limits)).toBe(false);
    expect(isExhausted(1, t, t + limits.maxAgeMs + 1, limits)).toBe(true);
  });
});

describe('notPastAgeLimit', () => {
  const queued = Date.parse('2026-03-01T10:00:00Z');
  const maxAgeMs = 60_000;

  it('keeps a retry time before the deadline, and moves a later one back to the deadline', () => {
    const now = queued + 10_000;
    expect(notPastAgeLimit(now + 5_000, queued, maxAgeMs, now)).toBe(now + 5_000);
    expect(notPastAgeLimit(now + 3_600_000, queued, maxAgeMs, now)).toBe(queued + maxAgeMs);
  });

  it('never goes back before now once the deadline has passed', () => {
    const now = queued + 2 * maxAgeMs;
    expect(notPastAgeLimit(now + 5_000, new Date(queued), maxAgeMs, now)).toBe(now);
  });
});
