// Generic HTTP client helpers shared by every outbound caller (FHIR destinations, webhooks, the doctor): a
// fetch with a hard deadline, the low-level error code of a failed fetch, and Retry-After parsing.

import { once } from 'node:events';
import http from 'node:http';
import https from 'node:https';

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
  constructor(
    readonly timeoutMs: number,
    /** The deadline was one of inactivity (a streamed request body that stopped moving). */
    readonly idle = false
  ) {
    super(idle ? `no progress for ${timeoutMs} ms` : `no complete response within ${timeoutMs} ms`);
    this.name = 'DeadlineExceeded';
  }
}

/**
 * One fetch, body included, within `timeoutMs`. The deadline aborts the request and wins the race even if
 * the fetch implementation is slow to honour the abort (a stalled body, a mock that ignores signals).
 * An abort of `init.signal` by the caller rejects as the fetch implementation reports it.
 *
 * A streamed request body (a ReadableStream: a large document sent as it is read) makes the deadline one of
 * inactivity: each piece of the body the connection takes starts it again, so an upload of any size that keeps
 * moving is not cut, and one that stalls (the server stops reading, the source stops giving) is; after the last
 * piece the server has `timeoutMs` to answer.
 */
export async function fetchWithDeadline(fetchImpl: FetchImpl, url: string, init: RequestInit, timeoutMs: number): Promise<TimedResponse> {
  const controller = new AbortController();
  const signal = init.signal ? AbortSignal.any([init.signal, controller.signal]) : controller.signal;
  const idle = init.body instanceof ReadableStream;
  let timer: NodeJS.Timeout | undefined;
  let expire: (err: Error) => void = () => undefined;
  const deadline = new Promise<never>((_, reject) => {
    expire = reject;
  });
  const arm = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      expire(new DeadlineExceeded(timeoutMs, idle)); // settle first, so the race reports the deadline
      controller.abort();
    }, timeoutMs);
  };
  arm();
  const body = idle ? progressing(init.body as ReadableStream<Uint8Array>, arm) : init.body;
  const work = (async (): Promise<TimedResponse> => {
    const res = await fetchImpl(url, { ...init, body, signal });
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

/** What a streamed request body may have written to the socket and not yet sent before the next piece is read. */
const STREAM_BUFFER_BYTES = 1024 * 1024;

/**
 * One request whose body is a stream (a large document read as it is sent), over node:http(s) rather than fetch:
 * undici's fetch keeps every piece of a streamed request body until the request ends (nodejs/undici#4058), so a
 * 1 GiB upload would sit in memory whole; here each piece is written when the socket has taken the previous one
 * (backpressure) and dropped. The deadline is one of inactivity as in fetchWithDeadline (each piece written starts
 * it again; after the last, the server has `timeoutMs` to answer); the answer is read whole (a small JSON body).
 * No redirect is followed; failures reject with the socket's error (its `code`, e.g. ECONNRESET) or DeadlineExceeded.
 */
export async function sendStreamed(
  url: string,
  init: { method: string; headers: Headers; body: ReadableStream<Uint8Array>; signal?: AbortSignal | null },
  timeoutMs: number
): Promise<TimedResponse> {
  const target = new URL(url);
  const client = target.protocol === 'https:' ? https : http;
  const controller = new AbortController();
  const signal = init.signal ? AbortSignal.any([init.signal, controller.signal]) : controller.signal;
  const headers: Record<string, string> = {};
  init.headers.forEach((value, key) => {
    headers[key] = value;
  });
  const reader = init.body.getReader();
  let timer: NodeJS.Timeout | undefined;
  let expired: DeadlineExceeded | undefined;
  return new Promise<TimedResponse>((resolve, reject) => {
    let answered = false;
    const fail = (err: unknown): void => {
      clearTimeout(timer);
      reader.cancel(err).catch(() => undefined);
      reject(expired ?? err);
    };
    const arm = (): void => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        expired = new DeadlineExceeded(timeoutMs, true);
        controller.abort();
      }, timeoutMs);
    };
    arm();
    // A connection of its own (agent: false), closed after the answer: a long upload never waits for, or lands on, a
    // kept-alive socket the server may be closing.
    const req = client.request(target, { method: init.method, headers, signal, agent: false }, (res) => {
      answered = true;
      reader.cancel().catch(() => undefined); // an early answer (e.g. 413): the rest of the body is not sent
      const pieces: Buffer[] = [];
      res.on('data', (piece: Buffer) => {
        arm();
        pieces.push(piece);
      });
      res.on('error', fail);
      res.on('end', () => {
        clearTimeout(timer);
        // Answered before the whole body was sent: the connection is left mid-request, so it is not reused.
        if (!req.writableFinished) req.destroy();
        const answer = new Headers();
        for (const [key, value] of Object.entries(res.headers)) {
          for (const one of Array.isArray(value) ? value : [value]) if (one !== undefined) answer.append(key, one);
        }
        resolve({ status: res.statusCode ?? 0, statusText: res.statusMessage ?? '', headers: answer, bytes: new Uint8Array(Buffer.concat(pieces)) });
      });
    });
    req.on('error', fail);
    void (async () => {
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (answered) return;
          arm();
          if (done) {
            req.end();
            return;
          }
          req.write(value);
          // Up to STREAM_BUFFER_BYTES handed to the socket before waiting for it to drain (not one piece at a time,
          // which would cost an event-loop turn per 64 KiB).
          if (req.writableLength >= STREAM_BUFFER_BYTES) await once(req, 'drain', { signal });
        }
      } catch (err) {
        if (!answered) req.destroy(err as Error);
      }
    })();
  });
}

/** The same stream, calling `progress` each time its reader asks for more (the connection took the previous piece). */
function progressing(source: ReadableStream<Uint8Array>, progress: () => void): ReadableStream<Uint8Array> {
  const reader = source.getReader();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      progress();
      const { done, value } = await reader.read();
      progress();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
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
