import { AsyncLocalStorage } from 'node:async_hooks';
import type { OperationOutcome } from '@medplum/fhirtypes';
import { destinationSettings } from '../../../config';
import type { Destination, DestinationSettings } from '../../../config';
import { logger as defaultLogger } from '../../../observability';
import { jsonSkeleton, LONG_STRING_CHARS, StreamedString } from '../../../json';
import { DeadlineExceeded, errorCode, fetchWithDeadline, parseRetryAfterHeader, sendStreamed, type TimedResponse } from '../../../http';
import { createAuthProvider, TokenRequestError } from './auth';
import { FhirRequestError } from './errors';

// The transport of the FHIR client: one destination's base URL, auth (and the one re-authentication on a 401),
// the per-attempt deadline, the refusal to send anything outside the base, and the mapping of every failure to a
// FhirRequestError. The resource operations (client.ts) are built on it.

/** The subset of a winston logger this module uses. Only ids, methods, targets, statuses and timings are logged. */
export interface FhirLogger {
  debug(message: string, meta?: Record<string, unknown>): unknown;
  warn(message: string, meta?: Record<string, unknown>): unknown;
}

export interface FhirClientOptions {
  fetchImpl?: typeof fetch;
  env?: NodeJS.ProcessEnv;
  logger?: FhirLogger;
  /** Clock for token expiry, for tests. */
  now?: () => number;
}

export type RawResponse = TimedResponse;

/** What the fetch wrapper saw for the current logical call (MedplumClient drops statuses and headers). */
export interface CallRecord {
  status?: number;
  headers?: Headers;
}

const callRecord = new AsyncLocalStorage<CallRecord>();
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** One destination's transport (createFhirTransport). */
export interface FhirTransport {
  readonly dest: Destination;
  readonly settings: DestinationSettings;
  /** The base URL parsed, and normalised without a trailing slash. */
  readonly base: URL;
  readonly basePath: string;
  readonly baseUrl: string;
  readonly log: FhirLogger;
  isUnderBase(u: URL): boolean;
  /** "GET Task?…", "PUT Task/…", "POST (base)": enough to debug, nothing from queries, ids or bodies. */
  describeTarget(method: string, url: string): string;
  /** One attempt with the given auth headers (none for a presigned URL). */
  attempt(url: string, init: ExchangeInit, authz: Record<string, string>, target: string): Promise<RawResponse>;
  /** One logical request under the base: auth, attempt, and on a 401 with refreshable auth one more. */
  exchange(url: string, init: ExchangeInit): Promise<RawResponse>;
  /** The FhirRequestError for a non-2xx answer (status, Retry-After, the server's OperationOutcome codes). */
  httpError(res: RawResponse, target: string): FhirRequestError;
  /** The fetch MedplumClient calls: it only ever hands back 2xx/304 answers whose body is empty or a JSON object. */
  medplumFetch(url: string, init?: RequestInit): Promise<Response>;
  /** Runs a MedplumClient call with a fresh CallRecord, so the status survives into the caller's own checks. */
  withRecord<R>(fn: (record: CallRecord) => Promise<R>): Promise<R>;
  /** An attachment URL outside the base that may be fetched without credentials (attachmentOrigins, presignedUrls). */
  credentialFreeUrl(link: string): string | undefined;
  /** A URL (absolute, or relative to the base) when it is under the base. */
  resolveUnderBase(link: string): string | undefined;
  /** The fetch every request goes through (streamed reads call it themselves: stream.ts). */
  readonly fetchImpl: typeof fetch;
  /** The auth headers for a request under the base (a token-endpoint failure is a FhirRequestError). */
  authHeaders(target: string): Promise<Record<string, string>>;
  /** After a 401 answered to `used`: fresh auth headers to try once more, or undefined when the auth cannot be refreshed. */
  reauthenticate(used: Record<string, string>, target: string): Promise<Record<string, string> | undefined>;
}

/**
 * The transport to one destination: a fetch wrapper that adds auth, applies `dest.timeoutMs` per attempt,
 * re-authenticates once on a 401 (client-credentials only), refuses URLs outside the base, and turns a non-2xx
 * answer into a FhirRequestError carrying the real status.
 */
export function createFhirTransport(dest: Destination, opts: FhirClientOptions = {}): FhirTransport {
  const fetchImpl = opts.fetchImpl ?? fetch;
  const log = opts.logger ?? defaultLogger;
  const auth = createAuthProvider(dest.auth, opts.env ?? process.env, fetchImpl, {
    timeoutMs: dest.timeoutMs,
    now: opts.now,
  });

  const settings = destinationSettings(dest);
  const base = new URL(dest.baseUrl);
  const basePath = base.pathname.replace(/\/+$/, '');
  const baseUrl = base.origin + basePath;

  function isUnderBase(u: URL): boolean {
    return u.origin === base.origin && (basePath === '' || u.pathname === basePath || u.pathname.startsWith(basePath + '/'));
  }

  /** "GET Task?…", "PUT Task/…", "POST (base)": enough to debug, nothing from queries, ids or bodies. */
  function describeTarget(method: string, url: string): string {
    let rest: string;
    let hasQuery = false;
    try {
      const u = new URL(url);
      rest = isUnderBase(u) ? u.pathname.slice(basePath.length).replace(/^\/+/, '') : '(outside base)';
      hasQuery = u.search.length > 1;
    } catch {
      rest = '(invalid url)';
    }
    const [first, ...more] = rest.split('/').filter((s) => s !== '');
    const target = first === undefined ? '(base)' : first + (more.length > 0 ? '/…' : '');
    return `${method} ${target}${hasQuery ? '?…' : ''}`;
  }

  async function authHeaders(target: string): Promise<Record<string, string>> {
    try {
      return await auth.getHeaders();
    } catch (err) {
      if (err instanceof TokenRequestError) {
        throw new FhirRequestError(err.kind, `${target}: ${err.message}`, {
          status: err.status,
          retryAfterMs: err.retryAfterMs,
          source: 'token-endpoint',
        });
      }
      throw err;
    }
  }

  async function attempt(url: string, init: ExchangeInit, authz: Record<string, string>, target: string): Promise<RawResponse> {
    const headers = new Headers(init.headers);
    headers.delete('authorization');
    for (const [k, v] of Object.entries(authz)) {
      headers.set(k, v);
    }
    const started = Date.now();
    try {
      // A streamed body is single-use: a factory gives each attempt (e.g. the one after a 401) its own.
      const body = requestBody(init.body);
      const method = init.method ?? 'GET';
      // A stream goes over node:http unless a fetch was given (tests): fetch would keep all of it (sendStreamed).
      const res =
        body.body instanceof ReadableStream && !opts.fetchImpl
          ? await sendStreamed(url, { method, headers, body: body.body as ReadableStream<Uint8Array>, signal: init.signal }, dest.timeoutMs)
          : await fetchWithDeadline(
              fetchImpl,
              url,
              {
                method,
                headers,
                ...body,
                signal: init.signal,
                // A redirect could carry the token elsewhere; a 3xx is reported as an http error instead.
                redirect: 'manual',
              },
              dest.timeoutMs
            );
      log.debug('fhir request', { destination: dest.id, target, status: res.status, durationMs: Date.now() - started });
      return res;
    } catch (err) {
      if (err instanceof DeadlineExceeded) {
        log.debug('fhir request timed out', { destination: dest.id, target, timeoutMs: dest.timeoutMs, idle: err.idle });
        throw new FhirRequestError('timeout', `${target}: ${err.message}`);
      }
      if (init.signal?.aborted) {
        throw err; // the caller cancelled
      }
      const code = errorCode(err);
      log.debug('fhir request network error', { destination: dest.id, target, code });
      throw new FhirRequestError('network', `${target}: network error (${code})`);
    }
  }

  async function reauthenticate(used: Record<string, string>, target: string): Promise<Record<string, string> | undefined> {
    if (!auth.refreshable) {
      return undefined;
    }
    log.warn('fhir server answered 401; re-authenticating once', { destination: dest.id, target });
    let fresh = await authHeaders(target);
    if (fresh.Authorization === used.Authorization) {
      auth.invalidate();
      fresh = await authHeaders(target);
    }
    return fresh;
  }

  /** One logical request: attempt, and on a 401 with refreshable auth, re-authenticate and attempt once more. */
  async function exchange(url: string, init: ExchangeInit): Promise<RawResponse> {
    const method = (init.method ?? 'GET').toUpperCase();
    const target = describeTarget(method, url);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new Error(`${target}: invalid URL`);
    }
    if (!isUnderBase(parsed)) {
      // MedplumClient only builds URLs under the base; anything else would leak credentials.
      throw new Error(`${target}: refusing to send a request outside the destination base`);
    }
    const used = await authHeaders(target);
    let res = await attempt(url, init, used, target);
    const fresh = res.status === 401 ? await reauthenticate(used, target) : undefined;
    if (fresh) {
      res = await attempt(url, init, fresh, target);
    }
    const record = callRecord.getStore();
    if (record) {
      record.status = res.status;
      record.headers = res.headers;
    }
    return res;
  }

  function httpError(res: RawResponse, target: string): FhirRequestError {
    const outcome = parseOutcome(res);
    const retryAfterMs = res.status === 429 || res.status === 503 ? parseRetryAfterHeader(res.headers.get('retry-after'), Date.now()) : undefined;
    const codes = outcome?.issue?.map((i) => i.code).filter((c): c is NonNullable<typeof c> => typeof c === 'string' && /^[a-z-]{1,40}$/.test(c));
    const suffix = codes && codes.length > 0 ? ` (OperationOutcome: ${[...new Set(codes)].join(', ')})` : '';
    return new FhirRequestError('http', `${target}: HTTP ${res.status}${suffix}`, {
      status: res.status,
      retryAfterMs,
      outcome,
    });
  }

  /** The fetch MedplumClient calls. It only ever hands back 2xx/304 responses whose body is empty or a JSON object. */
  async function medplumFetch(url: string, init: RequestInit = {}): Promise<Response> {
    const res = await exchange(url, init);
    const target = describeTarget((init.method ?? 'GET').toUpperCase(), url);
    const ok = (res.status >= 200 && res.status < 300) || res.status === 304;
    if (!ok) {
      throw httpError(res, target);
    }
    if (res.status === 204 || res.status === 304 || res.bytes.length === 0) {
      return new Response(null, { status: res.status, statusText: res.statusText, headers: { 'content-length': '0' } });
    }
    if (parseJsonObject(res.bytes) === undefined) {
      // Checked here so MedplumClient never tries (and logs) a failed parse of the body.
      const ct = contentTypeOf(res);
      const what = `HTTP ${res.status} body is not a JSON object (${ct})`;
      throw new FhirRequestError('invalid-response', `${target}: ${what}`, { status: res.status });
    }
    const headers = new Headers(res.headers);
    headers.delete('content-encoding');
    headers.set('content-length', String(res.bytes.length));
    headers.set('content-type', 'application/fhir+json');
    const bytes = res.bytes as Uint8Array<ArrayBuffer>;
    return new Response(bytes, { status: res.status, statusText: res.statusText, headers });
  }

  /** Runs a MedplumClient call with a fresh CallRecord, so the status survives into our own checks. */
  async function withRecord<R>(fn: (record: CallRecord) => Promise<R>): Promise<R> {
    const record: CallRecord = {};
    return callRecord.run(record, () => fn(record));
  }

  /**
   * An attachment URL outside the base that may be fetched without credentials: its origin is in
   * `attachmentOrigins`, or `presignedUrls` is set and it is on the base's host name. http(s) only.
   */
  function credentialFreeUrl(link: string): string | undefined {
    let u: URL;
    try {
      u = new URL(link);
    } catch {
      return undefined;
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') {
      return undefined;
    }
    if (u.username || u.password) {
      return undefined;
    }
    const origins = new Set(settings.attachmentOrigins.map((o) => new URL(o).origin));
    if (origins.has(u.origin)) {
      return u.toString();
    }
    if (settings.presignedUrls && u.hostname === base.hostname && (base.protocol === 'http:' || u.protocol === 'https:')) {
      return u.toString();
    }
    return undefined;
  }

  function resolveUnderBase(link: string): string | undefined {
    let u: URL;
    try {
      u = new URL(link, baseUrl + '/');
    } catch {
      return undefined;
    }
    return isUnderBase(u) ? u.toString() : undefined;
  }

  return {
    dest,
    settings,
    base,
    basePath,
    baseUrl,
    log,
    isUnderBase,
    describeTarget,
    attempt,
    exchange,
    httpError,
    medplumFetch,
    withRecord,
    credentialFreeUrl,
    resolveUnderBase,
    fetchImpl,
    authHeaders,
    reauthenticate,
  };
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function parseJsonObject(bytes: Uint8Array): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(utf8.decode(bytes));
    return isObject(v) ? v : undefined;
  } catch {
    return undefined;
  }
}

function parseOutcome(res: RawResponse): OperationOutcome | undefined {
  if (res.bytes.length === 0) {
    return undefined;
  }
  const body = parseJsonObject(res.bytes);
  return body?.resourceType === 'OperationOutcome' ? (body as unknown as OperationOutcome) : undefined;
}

export function contentTypeOf(res: RawResponse): string {
  const ct = res.headers.get('content-type') ?? 'no content-type';
  return ct.split(';')[0].trim().slice(0, 80);
}

/** RequestInit whose body may be a factory, called once per attempt (streamed bodies are single-use). */
export type BodyInit = NonNullable<RequestInit['body']>;
export type ExchangeInit = Omit<RequestInit, 'body'> & { body?: BodyInit | null | (() => BodyInit) };

function requestBody(body: ExchangeInit['body']): { body?: BodyInit | null; duplex?: 'half' } {
  if (typeof body !== 'function') {
    return { body };
  }
  const made = body();
  // Node's fetch needs duplex 'half' for a stream body.
  return made instanceof ReadableStream ? { body: made, duplex: 'half' } : { body: made };
}

const STREAM_SLICE = 1024 * 1024;

/**
 * A JSON request body for `value`. Small values become one string. When the value holds long strings that
 * JSON leaves as they are (base64 `data` of a large document), the body is a stream: the rest of the JSON is
 * serialized once with placeholders, and each long string is written in 1 MiB slices, so the process never
 * holds the whole request as a string or a Buffer next to the strings it came from. A StreamedString (a blob
 * document's base64, encoded from the blob store as it is read) is written piece by piece as its source gives it,
 * and must give exactly its `length` bytes. Each call of the factory starts every source again (a resend).
 */
export function jsonRequestBody(value: unknown): BodyInit | (() => BodyInit) {
  if (!hasLongString(value, 0)) {
    return JSON.stringify(value);
  }
  const { parts, longs } = jsonSkeleton(value);
  return () => {
    let i = 0;
    let offset = -1;
    let streamed: AsyncIterator<Uint8Array> | undefined;
    const encoder = new TextEncoder();
    return new ReadableStream<Uint8Array>({
      async pull(controller) {
        // parts: text, index, text, index, ..., text
        while (i < parts.length) {
          if (i % 2 === 0) {
            const text = parts[i++];
            if (text.length > 0) {
              controller.enqueue(encoder.encode(text));
              return;
            }
            continue;
          }
          const long = longs[Number(parts[i])];
          if (offset < 0) {
            offset = 0;
            controller.enqueue(encoder.encode('"'));
            return;
          }
          if (long instanceof StreamedString) {
            streamed ??= long.chunks()[Symbol.asyncIterator]();
            const next = await streamed.next();
            if (!next.done) {
              offset += next.value.length;
              if (offset > long.length) throw new Error(`a streamed JSON string gave more than its ${long.length} characters`);
              controller.enqueue(next.value);
              return;
            }
            streamed = undefined;
            if (offset !== long.length) throw new Error(`a streamed JSON string gave ${offset} of its ${long.length} characters`);
          } else if (offset < long.length) {
            const end = Math.min(offset + STREAM_SLICE, long.length);
            controller.enqueue(Buffer.from(long.slice(offset, end), 'latin1'));
            offset = end;
            return;
          }
          controller.enqueue(encoder.encode('"'));
          offset = -1;
          i++;
          return;
        }
        controller.close();
      },
      async cancel(reason) {
        await streamed?.return?.(reason);
      },
    });
  };
}

function hasLongString(value: unknown, depth: number): boolean {
  if (value instanceof StreamedString) {
    return true;
  }
  if (typeof value === 'string') {
    return value.length >= LONG_STRING_CHARS;
  }
  if (depth > 64 || value === null || typeof value !== 'object') {
    return false;
  }
  if (Array.isArray(value)) {
    return value.some((v) => hasLongString(v, depth + 1));
  }
  for (const v of Object.values(value as Record<string, unknown>)) {
    if (hasLongString(v, depth + 1)) {
      return true;
    }
  }
  return false;
}
