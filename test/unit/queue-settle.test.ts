import { type RetryPolicy, settleRetry } from '../../src/queue';

/**
 * The retry decision both leased queues (the delivery outbox, the webhook outbox) now share: retry with
 * jittered exponential backoff that honours Retry-After and never goes past the age limit, or the dead letter
 * once the attempts are spent or the entry is as old as the age limit.
 */
describe('settleRetry: the one retry / age limit / dead-letter decision', () => {
  const policy: RetryPolicy = { maxAttempts: 5, maxAgeMs: 60_000, baseDelayMs: 1_000, maxDelayMs: 10_000 };
  const queuedAt = 1_000_000;
  const half = (): number => 0.5;

  test('retries with the jittered exponential delay of the attempt count', () => {
    expect(settleRetry(1, queuedAt, 'HTTP 503', policy, { now: queuedAt + 10, random: half })).toEqual({
      kind: 'retry',
      at: queuedAt + 10 + 500,
      delayMs: 500,
    });
    expect(settleRetry(3, queuedAt, 'HTTP 503', policy, { now: queuedAt + 10, random: half })).toEqual({
      kind: 'retry',
      at: queuedAt + 10 + 2_000,
      delayMs: 2_000,
    });
    // Capped at maxDelayMs.
    expect(settleRetry(4, queuedAt, 'x', { ...policy, maxAttempts: 100 }, { now: queuedAt, random: () => 0.999 })).toMatchObject({ delayMs: 7_992 });
    expect(settleRetry(20, queuedAt, 'x', { ...policy, maxAttempts: 100 }, { now: queuedAt, random: () => 0.999 })).toMatchObject({ delayMs: 9_990 });
  });

  test("a server's Retry-After is a floor, even above the cap, but the age limit still bounds it", () => {
    expect(settleRetry(1, queuedAt, 'HTTP 429', policy, { now: queuedAt, random: half, retryAfterMs: 30_000 })).toEqual({
      kind: 'retry',
      at: queuedAt + 30_000,
      delayMs: 30_000,
    });
    // 50 s old, Retry-After 30 s: the retry happens at the deadline (60 s), where it is then given up.
    expect(settleRetry(1, queuedAt, 'HTTP 429', policy, { now: queuedAt + 50_000, random: half, retryAfterMs: 30_000 })).toEqual({
      kind: 'retry',
      at: queuedAt + 60_000,
      delayMs: 10_000,
    });
  });

  test('the attempts spent: the dead letter with the last error', () => {
    expect(settleRetry(5, queuedAt, '503: POST (base): HTTP 503', policy, { now: queuedAt + 1_000 })).toEqual({
      kind: 'dead-letter',
      reason: 'gave up after 5 attempts; last error: 503: POST (base): HTTP 503',
      byAge: false,
    });
  });

  test('the age limit reached with attempts left: the dead letter, saying so where the queue asks for it', () => {
    expect(settleRetry(2, queuedAt, 'HTTP 503', policy, { now: queuedAt + 61_000, mentionAge: true })).toEqual({
      kind: 'dead-letter',
      reason: 'gave up after 2 attempts over 61 s (the age limit); last error: HTTP 503',
      byAge: true,
    });
    expect(settleRetry(2, queuedAt, 'HTTP 503', policy, { now: queuedAt + 60_000 })).toEqual({
      kind: 'dead-letter',
      reason: 'gave up after 2 attempts; last error: HTTP 503',
      byAge: true,
    });
  });
});
