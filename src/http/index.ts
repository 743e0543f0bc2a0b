// Generic HTTP client helpers shared by every outbound caller (FHIR destinations, webhooks, the doctor): a
// fetch with a hard deadline, the low-level error code of a failed fetch, and Retry-After parsing.

type FetchImpl = typeof fetch;

/** A completed HTTP exchange: status, headers and the whole body. */
export interface TimedResponse {
  status: number;
  statusText: string;
  headers: Headers;
  bytes: Uint8Array;
}

/** Thrown by fetchWithDeadline when the deadline passes first. */
export class DeadlineExceeded extends Error {
  constructor(readonly timeoutMs: number) {
    super(`no complete response within ${timeoutMs} ms`);
    this.name = 'DeadlineExceeded';
  }
}

/**
 * One fetch, body included, within `timeoutMs`. The deadline aborts the request and wins the race even if
 * the fetch implementation is slow to honour the abort (a stalled body, a mock that ignores signals).
 * An abort of `init.signal` by the caller rejects as the fetch implementation reports it.
 */
export async function fetchWithDeadline(fetchImpl: FetchImpl, url: string, init: RequestInit, timeoutMs: number): Promise<TimedResponse> {
  const controller = new AbortController();
  const signal = init.signal ? AbortSignal.any([init.signal, controller.signal]) : controller.signal;
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new DeadlineExceeded(timeoutMs)); // settle first, so the race reports the deadline
      controller.abort();
    }, timeoutMs);
  });
  const work = (async (): Promise<TimedResponse> => {
    const res = await fetchImpl(url, { ...init, signal });
    const bytes = new Uint8Array(await res.arrayBuffer());
    return { status: res.status, statusText: res.statusText, headers: res.headers, bytes };
  })();
  work.catch(() => undefined); // a late failure after the deadline is not an unhandled rejection
  try {
    return await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** The low-level error code behind a failed fetch (e.g. ECONNRESET), without any message text. */
export function errorCode(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown } })?.cause;
  const code = (cause?.code ?? (err as { code?: unknown })?.code) as unknown;
  if (typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code)) {
    return code;
  }
  return (err as Error)?.name ?? 'unknown error';
}

/**
 * Parses an HTTP Retry-After value (delta-seconds or HTTP-date) into milliseconds from `now`.
 * Returns undefined when absent or unparseable; a date in the past gives 0.
 */
export function parseRetryAfterHeader(value: string | null | undefined, now: number): number | undefined {
  if (value === null || value === undefined) {
    return undefined;
  }
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) {
    return Number(trimmed) * 1000;
  }
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) {
    return undefined;
  }
  return Math.max(0, date - now);
}
