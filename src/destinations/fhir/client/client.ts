import { ClientStorage, MedplumClient, MemoryStorage } from '@medplum/core';
import type { Bundle, Resource, ResourceType } from '@medplum/fhirtypes';
import type { Destination } from '../../../config';
import { FhirRequestError } from './errors';
import { openUrl, type OpenUrlOptions, type OpenUrlResult } from './stream';
import {
  type BodyInit,
  type CallRecord,
  contentTypeOf,
  createFhirTransport,
  type ExchangeInit,
  type FhirClientOptions,
  isObject,
  jsonRequestBody,
  parseJsonObject,
  type RawResponse,
} from './transport';

// The FHIR client's resource operations (read, update, search and its pages, transaction, batch, raw Binary
// upload, URL reads, probes), over one destination's transport (transport.ts). MedplumClient does the FHIR REST
// for the plain operations, with its retries and cache off; the operations with large or raw bodies go straight
// through the transport.

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

/**
 * Bytes to upload that are not in memory (a document in the blob store): their length, sent as Content-Length, and
 * a fresh stream of them for each request made (a resend after a 401 reads them again).
 */
export interface StreamedBytes {
  readonly length: number;
  stream(): ReadableStream<Uint8Array>;
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
   * readUrl as a stream (stream.ts): the same URL rules (the gateway's auth only under the base, an allowed
   * attachment URL elsewhere without it, a 3xx followed only to such places), the body handed over as it arrives.
   * The destination's timeout bounds the wait for the headers and then each wait for more of the body.
   */
  openUrl(url: string, opts?: OpenUrlOptions): Promise<OpenUrlResult>;
  /**
   * POSTs a `batch` Bundle to the base (e.g. several searches or reads in one request) and returns the
   * batch-response Bundle (each entry with its own status).
   */
  batch(bundle: Bundle, opts?: SearchOptions): Promise<Bundle>;
  /**
   * Uploads raw bytes as a Binary: `PUT Binary/<id>` when `id` is given (a client-assigned id), else
   * `POST Binary`. The body is the bytes with their own Content-Type (not FHIR JSON, no base64); StreamedBytes are
   * streamed with their Content-Length, and the request's timeout is then one of inactivity (it does not cut a long
   * upload that is still moving). Returns the Binary's id and version from the Location header (or the answer's body).
   */
  uploadBinary(
    contentType: string,
    bytes: Uint8Array | StreamedBytes,
    opts?: { id?: string; signal?: AbortSignal }
  ): Promise<{ id: string; versionId?: string }>;
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

const DEFAULT_MAX_PAGES = 50;
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A FHIR client for one destination: the resource operations over its transport. */
export function createFhirClient(dest: Destination, opts: FhirClientOptions = {}): FhirClient {
  const transport = createFhirTransport(dest, opts);
  const { base, basePath, baseUrl, log, attempt, exchange, httpError, describeTarget, withRecord, resolveUnderBase, credentialFreeUrl } = transport;
  const medplum = new MedplumClient({
    baseUrl: base.origin + '/',
    fhirUrlPath: basePath.replace(/^\/+/, ''),
    fetch: transport.medplumFetch,
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

    openUrl: (url: string, o: OpenUrlOptions = {}): Promise<OpenUrlResult> => openUrl(transport, url, o),

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

    async uploadBinary(
      contentType: string,
      bytes: Uint8Array | StreamedBytes,
      o: { id?: string; signal?: AbortSignal } = {}
    ): Promise<{ id: string; versionId?: string }> {
      if (o.id !== undefined) {
        assertId(o.id);
      }
      const url = o.id === undefined ? `${baseUrl}/Binary` : `${baseUrl}/Binary/${o.id}`;
      const method = o.id === undefined ? 'POST' : 'PUT';
      const target = `${method} Binary${o.id === undefined ? '' : '/…'} (raw)`;
      const headers: Record<string, string> = { 'Content-Type': contentType, Accept: 'application/fhir+json' };
      let upload: ExchangeInit['body'];
      if (bytes instanceof Uint8Array) {
        upload = bytes as Uint8Array<ArrayBuffer>;
      } else {
        headers['Content-Length'] = String(bytes.length);
        upload = () => bytes.stream();
      }
      const res = await exchange(url, { method, headers, body: upload, signal: o.signal });
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
