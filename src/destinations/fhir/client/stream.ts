import { Readable } from 'node:stream';
import { errorCode } from '../../../http';
import { FhirRequestError } from './errors';
import type { FhirTransport, RawResponse } from './transport';

// A streamed GET for the FHIR client (openUrl): the bytes of a Binary or of an attachment URL handed to the caller
// as they arrive, never held whole. The same rules as the buffered reads: the gateway's credentials only under the
// destination base (one re-authentication on a 401), an attachment URL elsewhere only when its origin is allowed
// (attachmentOrigins, presignedUrls) and then without credentials, a 3xx followed only to such places. The
// destination's timeout bounds the wait for the answer's headers, and then each wait for more of the body.

export interface OpenUrlOptions {
  /** Accept header (default `*\/*`). */
  accept?: string;
  /** Aborts the request, before or after the headers (the body stream then fails with the abort). */
  signal?: AbortSignal;
}

export interface OpenUrlResult {
  status: number;
  /** Media type without parameters, lower case; `application/octet-stream` when the server sent none. */
  contentType: string;
  /** The body's length in bytes, when the server said (and sent it uncompressed). */
  contentLength?: number;
  /**
   * The body as it arrives. Destroying it (or the caller's signal) aborts the request. It fails with a
   * FhirRequestError `timeout` when the server sends nothing for the destination's timeout, `network` when the
   * connection breaks (a body shorter than its Content-Length included).
   */
  body: Readable;
}

/** Redirects followed at most (each to an allowed place only). */
const MAX_REDIRECTS = 2;
/** What is read of an error answer's body (its OperationOutcome). */
const ERROR_BODY_BYTES = 64 * 1024;

interface Opened {
  res: Response;
  target: string;
  controller: AbortController;
}

/**
 * GETs an absolute URL under the destination base, or relative to it, with the gateway's auth; or an attachment
 * URL outside the base that credentialFreeUrl allows, without it. A non-2xx answer is a FhirRequestError `http`
 * (as the buffered reads report it); a 3xx to an allowed place is followed.
 */
export async function openUrl(t: FhirTransport, url: string, o: OpenUrlOptions = {}): Promise<OpenUrlResult> {
  let link = url;
  for (let hop = 0; ; hop++) {
    const { res, target, controller } = await openOnce(t, link, o);
    const location = res.headers.get('location');
    if (res.status >= 300 && res.status < 400 && res.status !== 304 && location && hop < MAX_REDIRECTS) {
      discard(res);
      link = new URL(location, res.url || link).toString();
      continue;
    }
    if (res.status < 200 || res.status >= 300) {
      const bytes = await readCapped(res, ERROR_BODY_BYTES, t.dest.timeoutMs, controller).catch(() => new Uint8Array(0));
      const raw: RawResponse = { status: res.status, statusText: res.statusText, headers: res.headers, bytes };
      throw t.httpError(raw, target);
    }
    const ct = res.headers.get('content-type');
    const contentType = ct ? ct.split(';')[0].trim().toLowerCase() : 'application/octet-stream';
    const length = res.headers.get('content-length');
    const encoding = res.headers.get('content-encoding');
    const known = length !== null && /^\d{1,15}$/.test(length.trim()) && (!encoding || encoding.trim().toLowerCase() === 'identity');
    return {
      status: res.status,
      contentType,
      ...(known ? { contentLength: Number(length.trim()) } : {}),
      body: bodyStream(res, controller, t.dest.timeoutMs, target, o.signal),
    };
  }
}

async function openOnce(t: FhirTransport, link: string, o: OpenUrlOptions): Promise<Opened> {
  const resolved = t.resolveUnderBase(link);
  if (resolved) {
    const target = t.describeTarget('GET', resolved);
    const used = await t.authHeaders(target);
    const first = await start(t, resolved, used, target, o);
    if (first.res.status !== 401) return first;
    const fresh = await t.reauthenticate(used, target);
    if (!fresh) return first;
    discard(first.res);
    return start(t, resolved, fresh, target, o);
  }
  const external = t.credentialFreeUrl(link);
  if (!external) {
    // Typically an attachment URL the server rewrote to other storage: not sent, credentials included.
    throw new FhirRequestError(
      'invalid-response',
      'GET (url): URL is not under the destination base (list its origin in attachmentOrigins, or set presignedUrls)'
    );
  }
  // No Authorization header: a presigned URL carries its own signature.
  return start(t, external, {}, 'GET (presigned url)', o);
}

/** One request, up to its headers within the destination's timeout. */
async function start(t: FhirTransport, url: string, authz: Record<string, string>, target: string, o: OpenUrlOptions): Promise<Opened> {
  const controller = new AbortController();
  const signal = o.signal ? AbortSignal.any([o.signal, controller.signal]) : controller.signal;
  const headers = new Headers({ Accept: o.accept ?? '*/*' });
  for (const [k, v] of Object.entries(authz)) headers.set(k, v);
  const timeoutMs = t.dest.timeoutMs;
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new FhirRequestError('timeout', `${target}: no answer within ${timeoutMs} ms`)); // settle first, so the race reports it
      controller.abort();
    }, timeoutMs);
  });
  const started = Date.now();
  const work = t.fetchImpl(url, { method: 'GET', headers, signal, redirect: 'manual' });
  work.then(
    (late) => (controller.signal.aborted ? discard(late) : undefined),
    () => undefined
  );
  try {
    const res = await Promise.race([work, deadline]);
    t.log.debug('fhir request (streamed)', { destination: t.dest.id, target, status: res.status, durationMs: Date.now() - started });
    return { res, target, controller };
  } catch (err) {
    if (err instanceof FhirRequestError) {
      t.log.debug('fhir request timed out', { destination: t.dest.id, target, timeoutMs });
      throw err;
    }
    if (o.signal?.aborted) throw err; // the caller cancelled
    const code = errorCode(err);
    t.log.debug('fhir request network error', { destination: t.dest.id, target, code });
    throw new FhirRequestError('network', `${target}: network error (${code})`);
  } finally {
    clearTimeout(timer);
  }
}

/** The body as a Readable: pulled as the reader wants it, each wait bounded by `timeoutMs`, destroy aborts the request. */
function bodyStream(res: Response, controller: AbortController, timeoutMs: number, target: string, callerSignal: AbortSignal | undefined): Readable {
  const reader = res.body?.getReader();
  let timer: NodeJS.Timeout | undefined;
  let done = reader === undefined;
  const stream: Readable = new Readable({
    highWaterMark: 64 * 1024,
    read() {
      if (!reader) {
        stream.push(null);
        return;
      }
      pull(reader);
    },
    destroy(err, callback) {
      clearTimeout(timer);
      if (!done) {
        done = true;
        controller.abort(); // stops the transfer: the server sees the connection close
        reader?.cancel().catch(() => undefined);
      }
      callback(err);
    },
  });
  function pull(r: ReadableStreamDefaultReader<Uint8Array>): void {
    clearTimeout(timer);
    timer = setTimeout(() => stream.destroy(new FhirRequestError('timeout', `${target}: no data for ${timeoutMs} ms`)), timeoutMs);
    r.read().then(
      (next) => {
        clearTimeout(timer);
        if (stream.destroyed) return;
        if (next.done) {
          done = true;
          stream.push(null);
        } else if (next.value.byteLength === 0) {
          pull(r);
        } else {
          stream.push(Buffer.from(next.value.buffer, next.value.byteOffset, next.value.byteLength));
        }
      },
      (err: unknown) => {
        clearTimeout(timer);
        if (stream.destroyed) return;
        stream.destroy(callerSignal?.aborted ? (err as Error) : new FhirRequestError('network', `${target}: the transfer broke off (${errorCode(err)})`));
      }
    );
  }
  return stream;
}

/** Up to `cap` bytes of an answer's body (an error's OperationOutcome), within `timeoutMs`. */
async function readCapped(res: Response, cap: number, timeoutMs: number, controller: AbortController): Promise<Uint8Array> {
  const reader = res.body?.getReader();
  if (!reader) return new Uint8Array(0);
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    for (;;) {
      const next = await reader.read();
      if (next.done) break;
      chunks.push(next.value);
      total += next.value.byteLength;
      if (total >= cap) {
        await reader.cancel().catch(() => undefined);
        break;
      }
    }
  } finally {
    clearTimeout(timer);
  }
  return new Uint8Array(Buffer.concat(chunks).subarray(0, cap));
}

/** Drops an answer's body (a redirect, the 401 before a retry, a late answer after the deadline). */
function discard(res: Response): void {
  res.body?.cancel().catch(() => undefined);
}
