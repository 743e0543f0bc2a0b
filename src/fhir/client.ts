import { AsyncLocalStorage } from 'node:async_hooks';
import { ClientStorage, MedplumClient, MemoryStorage } from '@medplum/core';
import type { Bundle, OperationOutcome, Resource, ResourceType } from '@medplum/fhirtypes';
import { destinationSettings } from '../config';
import type { Destination } from '../config';
import { logger as defaultLogger } from '../observability';
import { jsonSkeleton, LONG_STRING_CHARS } from '../json';
import { DeadlineExceeded, errorCode, fetchWithDeadline, parseRetryAfterHeader, type TimedResponse } from '../http';
import { createAuthProvider, TokenRequestError } from './auth';

export type FhirErrorKind = 'network' | 'timeout' | 'http' | 'invalid-response';

/**
 * Every failure of a request to a destination. The message names the operation, the target (resource type
 * only, never ids from queries or bodies) and the status; it never contains response or request bodies.
 */
export class FhirRequestError extends Error {
  readonly kind: FhirErrorKind;
  /** HTTP status of the response that failed, when there was one. */
  readonly status?: number;
  /** From Retry-After on 429/503 (seconds or HTTP-date), in ms. */
  readonly retryAfterMs?: number;
  /** The server's OperationOutcome for an HTTP error, if it sent one. Kept for callers; never put in messages. */
  readonly outcome?: OperationOutcome;
  /** Which endpoint failed: the FHIR server, or the OAuth token endpoint used to reach it. */
  readonly source: 'fhir-server' | 'token-endpoint';

  constructor(
    kind: FhirErrorKind,
    message: string,
    extra: {
      status?: number;
      retryAfterMs?: number;
      outcome?: OperationOutcome;
      source?: 'fhir-server' | 'token-endpoint';
    } = {}
  ) {
    super(message);
    this.name = 'FhirRequestError';
    this.kind = kind;
    this.status = extra.status;
    this.retryAfterMs = extra.retryAfterMs;
    this.outcome = extra.outcome;
    this.source = extra.source ?? 'fhir-server';
  }
}

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

/** Search parameters; an array repeats the parameter (e.g. two `_lastUpdated` bounds). */
export type SearchParams = Record<string, string | string[]>;

export interface SearchOptions {
  signal?: AbortSignal;
}

export interface TransactionOptions {
  signal?: AbortSignal;
  /** Send `Prefer: return=minimal`: entries answer with status and location only. */
  preferMinimal?: boolean;
  /** sendTransaction: called with each answer entry's HTTP status (0 when it has none) before it is classified. */
  onEntryStatuses?: (statuses: number[]) => void;
}

export interface SearchAllOptions extends SearchOptions {
  /** Stop after this many pages (default 50); the result then says `truncated: true`. */
  maxPages?: number;
}

export interface SearchAllResult<T extends Resource> {
  /** Matches of the searched type from every page, in server order. */
  resources: T[];
  /** Other resources in the pages (`_include`, `_revinclude`), OperationOutcomes excluded. */
  included: Resource[];
  /** HTTP requests made (pages fetched). */
  requests: number;
  /** True when the page cap stopped the walk while a `next` link remained. */
  truncated: boolean;
}

export interface ReadUrlResult {
  status: number;
  /** Media type without parameters, e.g. `application/pdf`; `application/octet-stream` when the server sent none. */
  contentType: string;
  /** The raw bytes as received. */
  body: Buffer;
  /** The parsed body when the content type is JSON (`application/json`, `application/fhir+json`). */
  json?: unknown;
}

export interface FhirClient {
  readonly destinationId: string;
  /** Normalised FHIR base URL, without trailing slash. */
  readonly baseUrl: string;
  /** The underlying client (retries off, no cache, our fetch wrapper). */
  readonly medplum: MedplumClient;
  /**
   * POSTs a transaction Bundle to the base. Returns the response Bundle after checking only that it is a Bundle.
   * The body is serialized once; strings of 64 KiB or more (base64 document data) are streamed in slices
   * rather than copied into one request string, and the answer is asked for as `Prefer: return=minimal` when
   * `preferMinimal` is set (so a server does not echo a large Binary back). A 2xx with an empty body (what
   * Medplum answers to `Prefer: return=minimal`) is `null`: the caller must confirm what was written.
   */
  transaction(bundle: Bundle, opts?: TransactionOptions): Promise<Bundle | null>;
  read<T extends Resource = Resource>(type: T['resourceType'], id: string, opts?: SearchOptions): Promise<T>;
  /** PUT; with `ifMatchVersion` sends `If-Match: W/"<version>"` (a mismatch is an http 412 error). */
  update<T extends Resource>(resource: T, ifMatchVersion?: string, opts?: SearchOptions): Promise<T>;
  search<T extends Resource = Resource>(type: T['resourceType'], params: SearchParams, opts?: SearchOptions): Promise<Bundle<T>>;
  /** Searches and follows `next` links (absolute or relative, only under the base) up to `maxPages`. */
  searchAll<T extends Resource = Resource>(type: T['resourceType'], params: SearchParams, opts?: SearchAllOptions): Promise<SearchAllResult<T>>;
  /**
   * GETs an absolute URL under the destination base, or a URL relative to it (`Binary/1`, `/fhir/R4/Binary/1`).
   * JSON content types are parsed; anything else is returned as bytes. Absolute URLs elsewhere are refused.
   */
  readUrl(url: string, opts?: { accept?: string; signal?: AbortSignal }): Promise<ReadUrlResult>;
  /**
   * POSTs a `batch` Bundle to the base (e.g. several searches or reads in one request) and returns the
   * batch-response Bundle (each entry with its own status).
   */
  batch(bundle: Bundle, opts?: SearchOptions): Promise<Bundle>;
  /**
   * Uploads raw bytes as a Binary: `PUT Binary/<id>` when `id` is given (a client-assigned id), else
   * `POST Binary`. The body is the bytes with their own Content-Type (not FHIR JSON, no base64). Returns the
   * Binary's id and version from the Location header (or the answer's body).
   */
  uploadBinary(contentType: string, bytes: Uint8Array, opts?: { id?: string; signal?: AbortSignal }): Promise<{ id: string; versionId?: string }>;
  /**
   * One request as it is, for probes (the doctor): a path relative to the base (or an absolute URL under it),
   * the gateway's auth, the per-attempt deadline. Never throws for an HTTP status; network errors and timeouts
   * throw FhirRequestError.
   */
  raw(
    method: string,
    url: string,
    opts?: { headers?: Record<string, string>; body?: string | Uint8Array; signal?: AbortSignal; auth?: boolean }
  ): Promise<RawResult>;
}

export interface RawResult {
  status: number;
  headers: Headers;
  body: Buffer;
  /** Milliseconds from sending to the whole body. */
  durationMs: number;
}

type RawResponse = TimedResponse;

/** What the fetch wrapper saw for the current logical call (MedplumClient drops statuses and headers). */
interface CallRecord {
  status?: number;
  headers?: Headers;
}

const callRecord = new AsyncLocalStorage<CallRecord>();
const DEFAULT_MAX_PAGES = 50;
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * A FHIR client for one destination: MedplumClient for the FHIR operations, with its retries and cache off,
 * and a fetch wrapper that adds auth, applies `dest.timeoutMs` per attempt, re-authenticates once on a 401
 * (client-credentials only), and turns every non-2xx answer into a FhirRequestError carrying the real status.
 */
export function createFhirClient(dest: Destination, opts: FhirClientOptions = {}): FhirClient {
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
      const res = await fetchWithDeadline(
        fetchImpl,
        url,
        {
          method: init.method ?? 'GET',
          headers,
          // A streamed body is single-use: a factory gives each attempt (e.g. the one after a 401) its own.
          ...requestBody(init.body),
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
        log.debug('fhir request timed out', { destination: dest.id, target, timeoutMs: dest.timeoutMs });
        throw new FhirRequestError('timeout', `${target}: no complete response within ${dest.timeoutMs} ms`);
      }
      if (init.signal?.aborted) {
        throw err; // the caller cancelled
      }
      const code = errorCode(err);
      log.debug('fhir request network error', { destination: dest.id, target, code });
      throw new FhirRequestError('network', `${target}: network error (${code})`);
    }
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
    if (res.status === 401 && auth.refreshable) {
      log.warn('fhir server answered 401; re-authenticating once', { destination: dest.id, target });
      let fresh = await authHeaders(target);
      if (fresh.Authorization === used.Authorization) {
        auth.invalidate();
        fresh = await authHeaders(target);
      }
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

  const medplum = new MedplumClient({
    baseUrl: base.origin + '/',
    fhirUrlPath: basePath.replace(/^\/+/, ''),
    fetch: medplumFetch,
    // Retries belong to the delivery policy. MedplumClient's own (default 2) resend POSTs on 429/5xx, ignore
    // Retry-After, and also re-run the request when our fetch throws; with 0 every error surfaces at once.
    maxRetries: 0,
    maxRetryTime: 0,
    cacheTime: 0,
    autoBatchTime: 0,
    extendedMode: false,
    logLevel: 'none',
    storage: new ClientStorage(new MemoryStorage()),
  });

  /** Runs a MedplumClient call with a fresh CallRecord, so the status survives into our own checks. */
  async function withRecord<R>(fn: (record: CallRecord) => Promise<R>): Promise<R> {
    const record: CallRecord = {};
    return callRecord.run(record, () => fn(record));
  }

  function invalid(target: string, record: CallRecord, what: string): FhirRequestError {
    return new FhirRequestError('invalid-response', `${target}: ${what}`, { status: record.status });
  }

  function toQuery(params: SearchParams): URLSearchParams {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      for (const one of Array.isArray(v) ? v : [v]) {
        q.append(k, one);
      }
    }
    return q;
  }

  function assertBundle(value: unknown, target: string, record: CallRecord): asserts value is Bundle {
    if (!isObject(value) || value.resourceType !== 'Bundle') {
      throw invalid(target, record, `HTTP ${record.status ?? '?'} response is not a Bundle`);
    }
  }

  async function search<T extends Resource = Resource>(type: T['resourceType'], params: SearchParams, o: SearchOptions = {}): Promise<Bundle<T>> {
    assertType(type);
    return withRecord(async (record) => {
      const bundle: unknown = await medplum.search(type as ResourceType, toQuery(params), { signal: o.signal });
      assertBundle(bundle, `GET ${type}?…`, record);
      return bundle as Bundle<T>;
    });
  }

  return {
    destinationId: dest.id,
    baseUrl,
    medplum,

    async transaction(bundle: Bundle, o: TransactionOptions = {}): Promise<Bundle | null> {
      if (bundle?.resourceType !== 'Bundle' || bundle.type !== 'transaction') {
        throw new Error('transaction(): expected a Bundle of type "transaction"');
      }
      // Straight through the wrapper, not MedplumClient: it would stringify the bundle itself, and hold the
      // request string and its UTF-8 copy at once.
      const target = 'POST (base)';
      const body = jsonRequestBody(bundle);
      const headers: Record<string, string> = {
        'Content-Type': 'application/fhir+json',
        Accept: 'application/fhir+json',
      };
      if (o.preferMinimal) {
        headers.Prefer = 'return=minimal';
      }
      const res = await exchange(baseUrl, { method: 'POST', headers, body, signal: o.signal });
      if (res.status < 200 || res.status >= 300) {
        throw httpError(res, target);
      }
      if (res.bytes.length === 0) {
        return null;
      }
      const parsed = parseJsonObject(res.bytes);
      if (parsed === undefined) {
        const what = `HTTP ${res.status} body is not a JSON object (${contentTypeOf(res)})`;
        throw new FhirRequestError('invalid-response', `${target}: ${what}`, { status: res.status });
      }
      if (parsed.resourceType !== 'Bundle') {
        throw new FhirRequestError('invalid-response', `${target}: HTTP ${res.status} response is not a Bundle`, {
          status: res.status,
        });
      }
      return parsed as unknown as Bundle;
    },

    async read<T extends Resource = Resource>(type: T['resourceType'], id: string, o: SearchOptions = {}): Promise<T> {
      assertType(type);
      assertId(id);
      return withRecord(async (record) => {
        const resource: unknown = await medplum.readResource(type as ResourceType, id, { signal: o.signal });
        if (!isObject(resource) || resource.resourceType !== type) {
          throw invalid(`GET ${type}/…`, record, `HTTP ${record.status ?? '?'} response is not a ${type}`);
        }
        return resource as unknown as T;
      });
    },

    async update<T extends Resource>(resource: T, ifMatchVersion?: string, o: SearchOptions = {}): Promise<T> {
      assertType(resource.resourceType);
      assertId(resource.id);
      const headers: Record<string, string> = { Prefer: 'return=representation' };
      if (ifMatchVersion !== undefined) {
        if (!FHIR_ID.test(ifMatchVersion)) {
          throw new Error('update(): invalid version id');
        }
        headers['If-Match'] = `W/"${ifMatchVersion}"`;
      }
      const target = `PUT ${resource.resourceType}/…`;
      return withRecord(async (record) => {
        const result: unknown = await medplum.updateResource(resource, { headers, signal: o.signal });
        if (result === resource) {
          // Empty body (or 304): MedplumClient hands back our input; take the new version from the ETag.
          const version = parseEtag(record.headers?.get('etag'));
          return version ? { ...resource, meta: { ...resource.meta, versionId: version } } : resource;
        }
        if (!isObject(result) || result.resourceType !== resource.resourceType || result.id !== resource.id) {
          throw invalid(target, record, `HTTP ${record.status ?? '?'} response is not the updated resource`);
        }
        return result as T;
      });
    },

    search,

    async searchAll<T extends Resource = Resource>(type: T['resourceType'], params: SearchParams, o: SearchAllOptions = {}): Promise<SearchAllResult<T>> {
      const maxPages = o.maxPages ?? DEFAULT_MAX_PAGES;
      if (!Number.isInteger(maxPages) || maxPages < 1) {
        throw new Error('searchAll(): maxPages must be a positive integer');
      }
      const resources: T[] = [];
      const included: Resource[] = [];
      const seen = new Set<string>();
      let page: Bundle = await search<T>(type, params, o);
      let requests = 1;
      for (;;) {
        for (const entry of page.entry ?? []) {
          const r = entry.resource;
          if (!r || r.resourceType === 'OperationOutcome') {
            continue;
          }
          if (r.resourceType === type && entry.search?.mode !== 'include') {
            resources.push(r as T);
          } else {
            included.push(r);
          }
        }
        const next = page.link?.find((l) => l.relation === 'next')?.url;
        if (!next) {
          return { resources, included, requests, truncated: false };
        }
        if (requests >= maxPages) {
          log.warn('fhir search stopped at the page cap', { destination: dest.id, type, maxPages });
          return { resources, included, requests, truncated: true };
        }
        const nextUrl = resolveUnderBase(next);
        const target = `GET ${type} (page ${requests + 1})`;
        if (!nextUrl) {
          throw new FhirRequestError('invalid-response', `${target}: next link points outside the destination base`);
        }
        if (seen.has(nextUrl)) {
          throw new FhirRequestError('invalid-response', `${target}: next link repeats an earlier page`);
        }
        seen.add(nextUrl);
        page = await withRecord(async (record) => {
          const b: unknown = await medplum.get(nextUrl, { signal: o.signal });
          assertBundle(b, target, record);
          return b;
        });
        requests++;
      }
    },

    async readUrl(url: string, o: { accept?: string; signal?: AbortSignal } = {}): Promise<ReadUrlResult> {
      const resolved = resolveUnderBase(url);
      const accept = o.accept ?? '*/*';
      let res: RawResponse;
      let target: string;
      if (resolved) {
        target = describeTarget('GET', resolved);
        // Straight through the wrapper: MedplumClient would decode binary content as text.
        res = await exchange(resolved, { method: 'GET', headers: { Accept: accept }, signal: o.signal });
      } else {
        const external = credentialFreeUrl(url);
        if (!external) {
          // Typically an attachment URL the server rewrote to other storage: not sent, credentials included.
          throw new FhirRequestError(
            'invalid-response',
            'GET (url): URL is not under the destination base (list its origin in attachmentOrigins, or set presignedUrls)'
          );
        }
        target = 'GET (presigned url)';
        // No Authorization header: a presigned URL carries its own signature.
        res = await attempt(external, { method: 'GET', headers: { Accept: accept }, signal: o.signal }, {}, target);
      }
      if (res.status < 200 || res.status >= 300) {
        throw httpError(res, target);
      }
      const ct = res.headers.get('content-type');
      const contentType = ct ? ct.split(';')[0].trim().toLowerCase() : 'application/octet-stream';
      const body = Buffer.from(res.bytes.buffer, res.bytes.byteOffset, res.bytes.byteLength);
      if (!/[/+]json$/.test(contentType)) {
        return { status: res.status, contentType, body };
      }
      try {
        return { status: res.status, contentType, body, json: JSON.parse(utf8.decode(res.bytes)) as unknown };
      } catch {
        throw new FhirRequestError('invalid-response', `${target}: HTTP ${res.status} body is not valid JSON`, {
          status: res.status,
        });
      }
    },

    async batch(bundle: Bundle, o: SearchOptions = {}): Promise<Bundle> {
      if (bundle?.resourceType !== 'Bundle' || bundle.type !== 'batch') {
        throw new Error('batch(): expected a Bundle of type "batch"');
      }
      const target = 'POST (base, batch)';
      const res = await exchange(baseUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/fhir+json', Accept: 'application/fhir+json' },
        body: JSON.stringify(bundle),
        signal: o.signal,
      });
      if (res.status < 200 || res.status >= 300) {
        throw httpError(res, target);
      }
      const parsed = parseJsonObject(res.bytes);
      if (parsed?.resourceType !== 'Bundle' || (parsed.type !== 'batch-response' && parsed.type !== 'transaction-response')) {
        throw new FhirRequestError('invalid-response', `${target}: HTTP ${res.status} answer is not a batch-response Bundle`, { status: res.status });
      }
      return parsed as unknown as Bundle;
    },

    async uploadBinary(contentType: string, bytes: Uint8Array, o: { id?: string; signal?: AbortSignal } = {}): Promise<{ id: string; versionId?: string }> {
      if (o.id !== undefined) {
        assertId(o.id);
      }
      const url = o.id === undefined ? `${baseUrl}/Binary` : `${baseUrl}/Binary/${o.id}`;
      const method = o.id === undefined ? 'POST' : 'PUT';
      const target = `${method} Binary${o.id === undefined ? '' : '/…'} (raw)`;
      const res = await exchange(url, {
        method,
        headers: { 'Content-Type': contentType, Accept: 'application/fhir+json' },
        body: bytes as Uint8Array<ArrayBuffer>,
        signal: o.signal,
      });
      if (res.status < 200 || res.status >= 300) {
        throw httpError(res, target);
      }
      const location = res.headers.get('location') ?? res.headers.get('content-location');
      const fromLocation = location ? parseBinaryLocation(location) : undefined;
      if (fromLocation) {
        return fromLocation;
      }
      const body = res.bytes.length > 0 ? parseJsonObject(res.bytes) : undefined;
      if (body?.resourceType === 'Binary' && typeof body.id === 'string' && FHIR_ID.test(body.id)) {
        const meta = body.meta as { versionId?: unknown } | undefined;
        return typeof meta?.versionId === 'string' ? { id: body.id, versionId: meta.versionId } : { id: body.id };
      }
      if (o.id !== undefined) {
        return { id: o.id };
      }
      throw new FhirRequestError('invalid-response', `${target}: HTTP ${res.status} names no Binary id`, { status: res.status });
    },

    async raw(
      method: string,
      url: string,
      o: { headers?: Record<string, string>; body?: string | Uint8Array; signal?: AbortSignal; auth?: boolean } = {}
    ): Promise<RawResult> {
      const resolved = resolveUnderBase(url);
      if (!resolved) {
        throw new Error('raw(): URL is not under the destination base');
      }
      const started = Date.now();
      const init: ExchangeInit = {
        method: method.toUpperCase(),
        headers: o.headers ?? {},
        body: o.body as BodyInit | undefined,
        signal: o.signal,
      };
      const res = o.auth === false ? await attempt(resolved, init, {}, describeTarget(method.toUpperCase(), resolved)) : await exchange(resolved, init);
      return {
        status: res.status,
        headers: res.headers,
        body: Buffer.from(res.bytes.buffer, res.bytes.byteOffset, res.bytes.byteLength),
        durationMs: Date.now() - started,
      };
    },
  };

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
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseJsonObject(bytes: Uint8Array): Record<string, unknown> | undefined {
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

function contentTypeOf(res: RawResponse): string {
  const ct = res.headers.get('content-type') ?? 'no content-type';
  return ct.split(';')[0].trim().slice(0, 80);
}

function parseEtag(etag: string | null | undefined): string | undefined {
  const m = etag ? /^(?:W\/)?"([^"]+)"$/.exec(etag.trim()) : null;
  return m && FHIR_ID.test(m[1]) ? m[1] : undefined;
}

/** `Binary/123/_history/1` (relative or absolute) -> its id and version. */
function parseBinaryLocation(location: string): { id: string; versionId?: string } | undefined {
  const m = /(?:^|\/)Binary\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/([A-Za-z0-9\-.]{1,64}))?\/?(?:[?#].*)?$/.exec(location.trim());
  if (!m) return undefined;
  return m[2] ? { id: m[1], versionId: m[2] } : { id: m[1] };
}

function assertType(type: string): void {
  if (!/^[A-Z][A-Za-z]{1,63}$/.test(type)) {
    throw new Error('invalid FHIR resource type');
  }
}

function assertId(id: string | undefined): asserts id is string {
  if (typeof id !== 'string' || !FHIR_ID.test(id)) {
    throw new Error('invalid FHIR resource id');
  }
}

/** RequestInit whose body may be a factory, called once per attempt (streamed bodies are single-use). */
type BodyInit = NonNullable<RequestInit['body']>;
type ExchangeInit = Omit<RequestInit, 'body'> & { body?: BodyInit | null | (() => BodyInit) };

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
 * holds the whole request as a string or a Buffer next to the strings it came from.
 */
export function jsonRequestBody(value: unknown): BodyInit | (() => BodyInit) {
  if (!hasLongString(value, 0)) {
    return JSON.stringify(value);
  }
  const { parts, longs } = jsonSkeleton(value);
  return () => {
    let i = 0;
    let offset = -1;
    const encoder = new TextEncoder();
    return new ReadableStream<Uint8Array>({
      pull(controller) {
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
          if (offset < long.length) {
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
    });
  };
}

function hasLongString(value: unknown, depth: number): boolean {
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
