import { isBase64 } from '../model';
// The FHIR R4 sandbox engine: REST interactions and batch/transaction processing on top of
// @medplum/fhir-router's MemoryRepository. HTTP-framework agnostic (see sandbox.ts for express).
//
// Why transactions are processed here rather than by FhirRouter's BatchProcessor (5.2.13):
//  - with config.transactions it refuses "strict isolation" bundles (any ifNoneExist) with > 8
//    entries; without it, a 'transaction' is processed as a batch (partial writes on failure);
//  - MemoryRepository.withTransaction() never rolls back;
//  - it only rewrites lower-case urn:uuid references;
//  - response.status is '201' (not '201 Created') and response.location lacks _history/vid.
import type { SearchRequest, WithId } from '@medplum/core';
import {
  getResourceTypes,
  getSearchParameter,
  getSearchParameters,
  getStatus,
  isOk,
  isResourceType,
  isUUID,
  parseSearchRequest,
  validateResource,
} from '@medplum/core';
import type { FhirRouter, HttpMethod, MemoryRepository } from '@medplum/fhir-router';
import { randomUUID } from 'node:crypto';
import type { Bundle, BundleEntry, BundleLink, CapabilityStatement, CapabilityStatementRestResource, OperationOutcome, Resource } from '@medplum/fhirtypes';
import { SandboxFaults } from './faults';
import { resolveSandboxTraits } from './profiles';
import type { SandboxProfileName, SandboxTraits } from './profiles';
import { IndexedMemoryRepository } from './repo';
import { BinaryBlobStore, memoryContent } from './storage';
import type { BinaryContent, PresignedStorage } from './storage';
import {
  FHIR_ID,
  Journal,
  SandboxError,
  fail,
  findUnresolvedReferences,
  isPlainObject,
  normalizePlaceholder,
  outcome,
  parseETag,
  rewriteDeep,
  rewriteString,
  statusLine,
  toStatusAndOutcome,
} from './support';

export interface SandboxStats {
  /** Every HTTP request that reached the sandbox router (including failed ones). */
  requests: number;
  /** Search interactions by resource type: GET/POST _search over HTTP and search entries inside bundles. */
  searches: Record<string, number>;
  /** HTTP requests by resource type (first path segment; '(system)' for base-level requests). */
  byType: Record<string, number>;
  /** HTTP requests by FHIR interaction: read, vread, search-type, create, update, delete, patch, transaction, ... */
  interactions: Record<string, number>;
}

export interface SandboxEngineOptions {
  /** Validate created/updated resources against the R4 base StructureDefinitions (default true). */
  validate?: boolean;
  /** Page size when the client sends no _count (default 20, like most real servers). */
  defaultCount?: number;
  /** Upper bound for _count (default 1000). */
  maxCount?: number;
}

/** What the engine is built with besides the options (see createSandboxRouter). */
export interface SandboxEngineParts {
  /** Resolved server profile traits (default: the 'default' profile). */
  traits?: SandboxTraits & { profile: SandboxProfileName };
  faults?: SandboxFaults;
  blobs?: BinaryBlobStore;
  /** The presigned storage server; required when traits.presignedBinaryUrls is on. */
  storage?: PresignedStorage;
}

/** A framework-neutral request. `segments` are decoded path segments relative to the FHIR base. */
export interface RestRequest {
  method: string;
  segments: string[];
  params: URLSearchParams;
  headers: { ifMatch?: string; ifNoneExist?: string; prefer?: string; accept?: string };
  body: unknown;
  /** A raw (non-FHIR) request body for POST Binary / PUT Binary/<id>: the Binary's content. */
  raw?: BinaryContent;
  /** The request carried a body that no parser accepted (unsupported Content-Type). */
  unsupportedMediaType?: boolean;
  /** Absolute base URL of this FHIR endpoint, no trailing slash. */
  base: string;
  /** Set when the request is a GET entry inside a batch/transaction. */
  inBundle?: boolean;
}

export interface RestResponse {
  status: number;
  body?: Resource;
  /** Relative `Type/id/_history/vid`. */
  location?: string;
  etag?: string;
  lastModified?: string;
  /** Result of a create/update/patch (Location header) rather than a read (Content-Location). */
  write?: boolean;
  /** Raw content to answer instead of a FHIR body (GET Binary/<id> with a non-FHIR Accept). */
  raw?: BinaryContent;
}

interface EntryInput {
  method: string;
  url: string;
  fullUrl?: string;
  ifNoneExist?: string;
  ifMatch?: string;
  body?: unknown;
  /** Raw Binary content to store with the created/updated Binary version. */
  raw?: BinaryContent;
}

interface CreatePlan {
  kind: 'create';
  type: string;
  id: string;
  resource: Resource;
  existing?: WithId<Resource>;
  dedupeOf?: number;
  raw?: BinaryContent;
}
interface UpdatePlan {
  kind: 'update';
  type: string;
  id: string;
  resource: Resource;
  ifMatch?: string;
  /** The resource does not exist yet (update as create). */
  creates: boolean;
  raw?: BinaryContent;
}
interface DeletePlan {
  kind: 'delete';
  type: string;
  id?: string;
  ifMatch?: string;
}
interface PatchPlan {
  kind: 'patch';
  type: string;
  id: string;
  body: unknown;
  ifMatch?: string;
}
interface ReadPlan {
  kind: 'read';
  method: string;
  segments: string[];
  params: URLSearchParams;
  body: unknown;
}
type Plan = CreatePlan | UpdatePlan | DeletePlan | PatchPlan | ReadPlan;

interface EntryResult {
  status: number;
  resource?: Resource;
  location?: string;
  etag?: string;
  lastModified?: string;
  outcome?: OperationOutcome;
}

/** Failure of one entry of an atomic entry set; `index` is the index in the request bundle. */
class EntryFailure extends SandboxError {
  constructor(
    readonly index: number,
    status: number,
    failureOutcome: OperationOutcome
  ) {
    super(status, failureOutcome);
  }
}

const ABSTRACT_TYPES: ReadonlySet<string> = new Set(['Resource', 'DomainResource']);
const SEARCH_CONTROL_PARAMS = new Set(['_count', '_offset']);
const PHASE_ORDER: Record<Plan['kind'], number> = { delete: 0, create: 1, update: 2, patch: 2, read: 3 };

/** How long a transaction is held in flight when concurrentConflict is on (as if a database were behind it). */
const CONFLICT_HOLD_MS = 25;
/** Opaque paging tokens kept (oldest dropped first). */
const MAX_PAGING_TOKENS = 10_000;

export class SandboxEngine {
  private readonly tombstones = new Set<string>();
  private queue: Promise<unknown> = Promise.resolve();
  private capabilityCache: CapabilityStatement | undefined;
  private readonly validate: boolean;
  private readonly defaultCount: number;
  private readonly maxCount: number;
  readonly traits: SandboxTraits & { profile: SandboxProfileName };
  readonly faults: SandboxFaults;
  readonly blobs: BinaryBlobStore;
  private readonly storage: PresignedStorage | undefined;
  /** Transaction requests received and not answered yet (concurrentConflict). */
  private inflightTransactions = 0;
  /** opaquePagingLinks: token -> the search it pages. */
  private readonly pagingTokens = new Map<string, { type: string; query: string }>();

  constructor(
    readonly repo: MemoryRepository,
    readonly router: FhirRouter,
    readonly stats: SandboxStats,
    options: SandboxEngineOptions = {},
    parts: SandboxEngineParts = {}
  ) {
    this.validate = options.validate ?? true;
    this.defaultCount = options.defaultCount ?? 20;
    this.maxCount = options.maxCount ?? 1000;
    this.traits = parts.traits ?? resolveSandboxTraits('default');
    this.faults = parts.faults ?? new SandboxFaults();
    this.blobs = parts.blobs ?? new BinaryBlobStore();
    this.storage = parts.storage;
    if (this.traits.presignedBinaryUrls && !this.storage) {
      throw new Error('presignedBinaryUrls needs a PresignedStorage');
    }
  }

  /** Handles a request; never throws (errors become OperationOutcome responses). */
  async handle(r: RestRequest): Promise<RestResponse> {
    try {
      return await this.dispatch(r);
    } catch (err) {
      const { status, outcome: body } = toStatusAndOutcome(err);
      return { status, body };
    }
  }

  /** Writes are serialized so conditional creates cannot race each other. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private count(bucket: Record<string, number>, key: string): void {
    bucket[key] = (bucket[key] ?? 0) + 1;
  }

  private interaction(r: RestRequest, name: string): void {
    if (!r.inBundle) {
      this.count(this.stats.interactions, name);
    }
  }

  // -------------------------------------------------------------------------------------------
  // REST dispatch
  // -------------------------------------------------------------------------------------------

  private async dispatch(r: RestRequest): Promise<RestResponse> {
    const method = r.method.toUpperCase() === 'HEAD' ? 'GET' : r.method.toUpperCase();
    const segs = r.segments;
    if (!r.inBundle) {
      this.count(this.stats.byType, segs.length === 0 || segs[0] === 'metadata' ? '(system)' : segs[0]);
    }

    if (segs.length === 0) {
      if (method === 'POST') {
        this.requireBody(r);
        return this.processBundle(r);
      }
      if (method === 'GET') {
        if (this.traits.opaquePagingLinks && r.params.has('_getpages')) {
          this.interaction(r, 'search-type');
          return { status: 200, body: await this.getPage(r.params, r.base) };
        }
        throw fail(400, 'System-level search is not supported by the sandbox', 'not-supported');
      }
      throw methodNotAllowed(method, '/');
    }
    if (segs[0] === 'metadata' && segs.length === 1) {
      if (method !== 'GET') {
        throw methodNotAllowed(method, 'metadata');
      }
      this.interaction(r, 'capabilities');
      return { status: 200, body: this.capabilityStatement(r.base) };
    }
    if (segs.some((s) => s.startsWith('$'))) {
      this.interaction(r, 'operation');
      return this.viaRouter(r, method);
    }

    const type = segs[0];
    this.assertResourceType(type, 404);

    if (segs.length === 1) {
      switch (method) {
        case 'GET':
          this.interaction(r, 'search-type');
          return { status: 200, body: await this.search(type, r.params, r.base) };
        case 'POST':
          this.interaction(r, 'create');
          if (!r.raw) {
            this.requireBody(r);
          }
          return this.writeSingle(r, method);
        case 'PUT':
        case 'DELETE':
        case 'PATCH':
          if (r.params.size === 0) {
            throw fail(400, `Conditional ${method} on ${type} requires search parameters`);
          }
          this.interaction(r, method === 'PUT' ? 'update' : method.toLowerCase());
          if (method !== 'DELETE') {
            this.requireBody(r);
          }
          return this.writeSingle(r, method);
        default:
          throw methodNotAllowed(method, type);
      }
    }

    if (segs.length === 2 && segs[1] === '_search') {
      if (method !== 'POST') {
        throw methodNotAllowed(method, `${type}/_search`);
      }
      this.interaction(r, 'search-type');
      const params = new URLSearchParams(r.params);
      if (isPlainObject(r.body)) {
        for (const [key, value] of Object.entries(r.body)) {
          for (const v of Array.isArray(value) ? value : [value]) {
            params.append(key, String(v));
          }
        }
      }
      return { status: 200, body: await this.search(type, params, r.base) };
    }
    if (segs.length === 2 && segs[1] === '_history') {
      throw fail(400, 'Type-level history is not supported by the sandbox', 'not-supported');
    }

    const id = segs[1];
    if (segs.length === 2) {
      switch (method) {
        case 'GET': {
          this.interaction(r, 'read');
          const resource = await this.read(type, id);
          if (type === 'Binary' && !r.inBundle && prefersRaw(r.headers.accept)) {
            return this.rawResponse(resource);
          }
          return this.resourceResponse(200, await this.present(resource, r.base, true));
        }
        case 'PUT':
        case 'PATCH':
          this.interaction(r, method === 'PUT' ? 'update' : 'patch');
          if (!(r.raw && method === 'PUT')) {
            this.requireBody(r);
          }
          return this.writeSingle(r, method);
        case 'DELETE':
          this.interaction(r, 'delete');
          return this.writeSingle(r, method);
        default:
          throw methodNotAllowed(method, `${type}/${id}`);
      }
    }
    if (segs[2] === '_history' && segs.length <= 4) {
      if (method !== 'GET') {
        throw methodNotAllowed(method, segs.join('/'));
      }
      this.assertNotDeleted(type, id);
      if (segs.length === 3) {
        this.interaction(r, 'history-instance');
        const history = await this.repo.readHistory(type, id);
        const entry: BundleEntry[] = [];
        for (const e of history.entry ?? []) {
          entry.push({
            fullUrl: `${r.base}/${type}/${id}`,
            resource: e.resource ? await this.present(e.resource, r.base, true) : undefined,
            request: { method: 'PUT' as const, url: `${type}/${id}` },
            response: { status: '200 OK', lastModified: e.resource?.meta?.lastUpdated },
          });
        }
        return { status: 200, body: { resourceType: 'Bundle', type: 'history', total: entry.length, entry } };
      }
      this.interaction(r, 'vread');
      const version = await this.repo.readVersion(type, id, segs[3]);
      if (type === 'Binary' && !r.inBundle && prefersRaw(r.headers.accept)) {
        return this.rawResponse(version);
      }
      return this.resourceResponse(200, await this.present(version, r.base, true));
    }
    throw fail(404, `Unknown path: ${segs.join('/')}`, 'not-found');
  }

  /** The raw content of a Binary version: its uploaded bytes, else its decoded `data`. */
  binaryContent(binary: Resource): BinaryContent {
    const b = binary as Resource & { contentType?: string; data?: string };
    const stored = b.id ? this.blobs.get(b.id, b.meta?.versionId) : undefined;
    return stored ?? memoryContent(b.contentType ?? 'application/octet-stream', Buffer.from(b.data ?? '', 'base64'));
  }

  private rawResponse(binary: Resource): RestResponse {
    const vid = binary.meta?.versionId;
    return {
      status: 200,
      raw: this.binaryContent(binary),
      etag: vid ? `W/"${vid}"` : undefined,
      lastModified: binary.meta?.lastUpdated,
    };
  }

  /**
   * A resource as the server shows it to clients. Binary: a raw-uploaded Binary gets its content as
   * `data` when `materialize` (JSON reads; not write responses, which would echo large uploads).
   * presignedBinaryUrls: `url` values naming a stored Binary become presigned storage URLs.
   */
  private async present<T extends Resource>(resource: T, base: string, materialize: boolean): Promise<T> {
    if (resource.resourceType === 'Binary') {
      const b = resource as unknown as { id?: string; data?: string; meta?: { versionId?: string } };
      if (materialize && b.data === undefined && b.id) {
        const stored = this.blobs.get(b.id, b.meta?.versionId);
        if (stored) {
          return { ...resource, data: (await stored.read()).toString('base64') };
        }
      }
      return resource;
    }
    if (!this.traits.presignedBinaryUrls) {
      return resource;
    }
    return (await this.presignUrls(resource, base, new Map())) as T;
  }

  private async presignUrls(value: unknown, base: string, cache: Map<string, string>): Promise<unknown> {
    if (Array.isArray(value)) {
      const out: unknown[] = [];
      for (const item of value) {
        out.push(await this.presignUrls(item, base, cache));
      }
      return out;
    }
    if (!isPlainObject(value)) {
      return value;
    }
    if (value.resourceType === 'Binary') {
      return value; // never inside a Binary (as Medplum)
    }
    const out: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) {
      if (key === 'url' && typeof item === 'string') {
        out[key] = await this.presignedUrlFor(item, base, cache);
      } else if (item !== null && typeof item === 'object') {
        out[key] = await this.presignUrls(item, base, cache);
      } else {
        out[key] = item;
      }
    }
    return out;
  }

  private async presignedUrlFor(url: string, base: string, cache: Map<string, string>): Promise<string> {
    const ref = binaryRef(url, base);
    if (!ref || !this.storage) {
      return url;
    }
    let result = cache.get(url);
    if (result === undefined) {
      try {
        const binary = ref.versionId ? await this.repo.readVersion('Binary', ref.id, ref.versionId) : await this.read('Binary', ref.id);
        result = await this.storage.presign(ref.id, binary.meta?.versionId ?? '1');
      } catch {
        result = `Binary/${ref.id}`; // as Medplum: a Binary it cannot read stays a reference
      }
      cache.set(url, result);
    }
    return result;
  }

  /** presignedBinaryUrls: presigned URLs of this server written back are stored as `Binary/<id>`. */
  private unpresign<T>(value: T): T {
    const storage = this.storage;
    if (!storage || !this.traits.presignedBinaryUrls) {
      return value;
    }
    const walk = (v: unknown): unknown => {
      if (Array.isArray(v)) {
        return v.map(walk);
      }
      if (!isPlainObject(v)) {
        return v;
      }
      const out: Record<string, unknown> = {};
      for (const [key, item] of Object.entries(v)) {
        const id = key === 'url' && typeof item === 'string' ? storage.binaryIdOf(item) : undefined;
        if (id) out[key] = `Binary/${id}`;
        else out[key] = item !== null && typeof item === 'object' ? walk(item) : item;
      }
      return out;
    };
    return walk(value) as T;
  }

  private requireBody(r: RestRequest): void {
    if (r.body !== undefined) {
      return;
    }
    if (r.unsupportedMediaType) {
      throw fail(415, 'Unsupported Content-Type; use application/fhir+json', 'not-supported');
    }
    throw fail(400, 'Missing request body (send Content-Type: application/fhir+json)', 'required');
  }

  private assertResourceType(type: string, status: number): void {
    if (!isResourceType(type) || ABSTRACT_TYPES.has(type)) {
      throw fail(status, `Unknown resource type: ${type}`, 'not-supported');
    }
  }

  private assertNotDeleted(type: string, id: string): void {
    if (this.tombstones.has(`${type}/${id}`)) {
      throw fail(410, `${type}/${id} has been deleted`, 'deleted');
    }
  }

  private async read(type: string, id: string): Promise<Resource> {
    this.assertNotDeleted(type, id);
    return this.repo.readResource(type, id);
  }

  private resourceResponse(status: number, resource: Resource): RestResponse {
    const vid = resource.meta?.versionId;
    return {
      status,
      body: resource,
      location: vid && resource.id ? `${resource.resourceType}/${resource.id}/_history/${vid}` : undefined,
      etag: vid ? `W/"${vid}"` : undefined,
      lastModified: resource.meta?.lastUpdated,
    };
  }

  /** Fallback for interactions the sandbox does not implement itself ($operations such as $graphql). */
  private async viaRouter(r: RestRequest, method: string): Promise<RestResponse> {
    const query = r.params.size ? `?${r.params.toString()}` : '';
    const [result, resource] = await this.router.handleRequest(
      {
        method: method as HttpMethod,
        url: '/' + r.segments.map(encodeURIComponent).join('/') + query,
        pathname: '',
        body: r.body,
        params: {},
        query: {},
        headers: {},
        config: {},
      },
      this.repo
    );
    if (!isOk(result)) {
      throw new SandboxError(getStatus(result), result);
    }
    return { status: getStatus(result), body: resource ?? result };
  }

  // -------------------------------------------------------------------------------------------
  // Search
  // -------------------------------------------------------------------------------------------

  private buildSearchRequest(type: string, params: URLSearchParams): SearchRequest {
    const query: Record<string, string | string[]> = {};
    for (const [key, value] of params) {
      if (SEARCH_CONTROL_PARAMS.has(key) && !/^\d+$/.test(value)) {
        throw fail(400, `Invalid ${key}: "${value}" (expected a non-negative integer)`);
      }
      const existing = query[key];
      query[key] = existing === undefined ? value : [...(Array.isArray(existing) ? existing : [existing]), value];
    }
    const request = parseSearchRequest(type, query);
    for (const filter of request.filters ?? []) {
      const code = filter.code;
      if (code.includes('.') || code.startsWith('_has:')) {
        continue; // chained / reverse-chained parameters are left to the repository
      }
      if (!getSearchParameter(type, code)) {
        throw fail(400, `Unknown search parameter "${code}" for ${type}`, 'not-supported');
      }
    }
    for (const rule of request.sortRules ?? []) {
      if (!getSearchParameter(type, rule.code)) {
        throw fail(400, `Unknown _sort parameter "${rule.code}" for ${type}`, 'not-supported');
      }
    }
    return request;
  }

  private assertSearchable(type: string): void {
    if (type === 'Binary' && this.traits.noBinarySearch) {
      throw fail(400, 'Cannot search on Binary resource type');
    }
  }

  async search(type: string, params: URLSearchParams, base: string, pagingToken?: string): Promise<Bundle> {
    this.assertSearchable(type);
    this.count(this.stats.searches, type);
    const request = this.buildSearchRequest(type, params);
    const count = Math.min(request.count ?? this.defaultCount, this.maxCount);
    const offset = request.offset ?? 0;
    const result = await this.repo.search({ ...request, count, offset });
    const total = result.total ?? 0;

    const pageUrl = (pageOffset: number): string => {
      const p = new URLSearchParams();
      for (const [key, value] of params) {
        if (!SEARCH_CONTROL_PARAMS.has(key)) {
          p.append(key, value);
        }
      }
      p.set('_count', String(count));
      if (pageOffset > 0) {
        p.set('_offset', String(pageOffset));
      }
      return `${base}/${type}?${p.toString()}`;
    };
    const link: BundleLink[] = [];
    if (this.traits.opaquePagingLinks) {
      // HAPI: the first page's self link is the query; further pages are named by a search id.
      let token = pagingToken;
      const opaque = (pageOffset: number): string => {
        token ??= this.newPagingToken(type, params);
        return `${base}?_getpages=${token}&_getpagesoffset=${pageOffset}&_count=${count}&_bundletype=searchset`;
      };
      link.push({ relation: 'self', url: pagingToken ? opaque(offset) : pageUrl(offset) });
      if (count > 0 && offset + count < total) {
        link.push({ relation: 'next', url: opaque(offset + count) });
      }
      if (count > 0 && offset > 0) {
        link.push({ relation: 'previous', url: opaque(Math.max(0, offset - count)) });
      }
    } else {
      link.push({ relation: 'self', url: pageUrl(offset) });
      if (count > 0) {
        link.push({ relation: 'first', url: pageUrl(0) });
        if (offset + count < total) {
          link.push({ relation: 'next', url: pageUrl(offset + count) });
        }
        if (offset > 0) {
          link.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
        }
      }
    }
    const entry: BundleEntry[] = [];
    for (const e of result.entry ?? []) {
      entry.push({
        fullUrl: e.resource ? `${base}/${e.resource.resourceType}/${e.resource.id}` : undefined,
        resource: e.resource ? await this.present(e.resource, base, true) : undefined,
        search: e.search,
      });
    }
    return { resourceType: 'Bundle', type: 'searchset', total, link, entry };
  }

  private newPagingToken(type: string, params: URLSearchParams): string {
    const query = new URLSearchParams();
    for (const [key, value] of params) {
      if (!SEARCH_CONTROL_PARAMS.has(key)) {
        query.append(key, value);
      }
    }
    const token = randomUUID();
    this.pagingTokens.set(token, { type, query: query.toString() });
    if (this.pagingTokens.size > MAX_PAGING_TOKENS) {
      const oldest = this.pagingTokens.keys().next().value;
      if (oldest !== undefined) {
        this.pagingTokens.delete(oldest);
      }
    }
    return token;
  }

  /** opaquePagingLinks: GET <base>?_getpages=<token>&_getpagesoffset=<n>&_count=<n>. */
  private async getPage(params: URLSearchParams, base: string): Promise<Bundle> {
    const token = params.get('_getpages') ?? '';
    const paged = this.pagingTokens.get(token);
    if (!paged) {
      throw fail(410, `Search ID "${token}" does not exist and may have expired`, 'not-found');
    }
    const query = new URLSearchParams(paged.query);
    for (const [from, to] of [
      ['_getpagesoffset', '_offset'],
      ['_count', '_count'],
    ]) {
      const value = params.get(from);
      if (value !== null) {
        query.set(to, value);
      }
    }
    return this.search(paged.type, query, base, token);
  }

  /** Matches for conditional interactions (ifNoneExist, conditional update/delete/patch). */
  private async findMatches(type: string, criteria: string): Promise<WithId<Resource>[]> {
    this.assertSearchable(type);
    let query = criteria.trim();
    if (query.startsWith(`${type}?`)) {
      query = query.slice(type.length + 1);
    } else if (query.startsWith('?')) {
      query = query.slice(1);
    }
    const params = new URLSearchParams(query);
    const request = this.buildSearchRequest(type, params);
    if (!request.filters?.length) {
      throw fail(400, `Conditional criteria "${criteria}" contain no search parameter`);
    }
    // An IndexedMemoryRepository answers e.g. identifier criteria from its index (no store scan).
    const limited: SearchRequest = { ...request, count: 2, offset: 0, sortRules: undefined };
    const bundle = this.repo instanceof IndexedMemoryRepository ? await this.repo.searchMatches(limited) : await this.repo.search(limited);
    return (bundle.entry ?? []).flatMap((e) => (e.resource ? [e.resource] : []));
  }

  // -------------------------------------------------------------------------------------------
  // Writes (single interactions are run as a one-entry transaction)
  // -------------------------------------------------------------------------------------------

  private async writeSingle(r: RestRequest, method: string): Promise<RestResponse> {
    const query = r.params.size ? `?${r.params.toString()}` : '';
    let body = r.body;
    if (r.raw) {
      // A raw Binary: the request bytes are the content (FHIR R4 binary.html#rest).
      body = { resourceType: 'Binary', contentType: r.raw.contentType, ...(method === 'PUT' && r.segments[1] ? { id: r.segments[1] } : {}) };
    }
    const input: EntryInput = {
      method,
      url: r.segments.map(encodeURIComponent).join('/') + query,
      ifNoneExist: method === 'POST' ? r.headers.ifNoneExist : undefined,
      ifMatch: r.headers.ifMatch,
      body,
      raw: r.raw,
    };
    const [result] = await this.exclusive(() => this.processEntries([input], r.base, 0, { atomic: true }));
    const prefer = preferReturn(r.headers.prefer);
    let resource = result.resource ? await this.present(result.resource, r.base, false) : undefined;
    if (r.raw && resource?.id && this.storage && this.traits.presignedBinaryUrls) {
      // Medplum answers a raw Binary upload with the Binary and a presigned URL of its content.
      resource = { ...resource, url: await this.storage.presign(resource.id, resource.meta?.versionId ?? '1') } as Resource;
    }
    let responseBody: Resource | undefined = resource ?? result.outcome;
    if (prefer === 'minimal') {
      responseBody = undefined;
    } else if (prefer === 'OperationOutcome') {
      responseBody = result.outcome ?? outcome(result.status, statusLine(result.status), 'informational');
    }
    return {
      status: result.status,
      body: responseBody,
      location: result.location,
      etag: result.etag,
      lastModified: result.lastModified,
      write: true,
    };
  }

  private async processBundle(r: RestRequest): Promise<RestResponse> {
    const bundle = r.body as Partial<Bundle>;
    if (!isPlainObject(bundle) || bundle.resourceType !== 'Bundle') {
      throw fail(400, 'POST to the FHIR base requires a Bundle of type transaction or batch');
    }
    if (bundle.type !== 'transaction' && bundle.type !== 'batch') {
      throw fail(400, `Bundle.type must be "transaction" or "batch" (got "${String(bundle.type)}")`, 'invalid', 'Bundle.type');
    }
    if (bundle.entry !== undefined && !Array.isArray(bundle.entry)) {
      throw fail(400, 'Bundle.entry must be an array', 'structure', 'Bundle.entry');
    }
    this.interaction(r, bundle.type);
    const inputs = (bundle.entry ?? []).map((entry) => toEntryInput(entry));
    const prefer = preferReturn(r.headers.prefer);
    const emptyAnswer = prefer === 'minimal' && this.traits.emptyMinimal;

    if (bundle.type === 'transaction') {
      const atomic = !this.traits.nonAtomic;
      const limit = this.traits.strictIsolationMaxEntries;
      if (atomic && limit !== undefined && inputs.length > limit && inputs.some(isConditionalEntry)) {
        throw fail(400, 'Transaction requires strict isolation but has too many entries');
      }
      const contended = this.traits.concurrentConflict && this.inflightTransactions > 0;
      this.inflightTransactions++;
      let results: EntryResult[];
      try {
        if (this.traits.concurrentConflict) {
          await new Promise<void>((resolve) => setTimeout(resolve, CONFLICT_HOLD_MS));
        }
        results = await this.exclusive(() => this.processEntries(inputs, r.base, 0, { atomic, contended, faults: true }));
      } catch (err) {
        if (err instanceof EntryFailure) {
          throw new SandboxError(err.status, prefixOutcome(err.outcome, err.index));
        }
        throw err;
      } finally {
        this.inflightTransactions--;
      }
      if (emptyAnswer) {
        return { status: 200 };
      }
      const entry: BundleEntry[] = [];
      for (const res of results) {
        entry.push(toResponseEntry({ ...res, resource: res.resource && (await this.present(res.resource, r.base, false)) }, r.base, prefer));
      }
      return { status: 200, body: { resourceType: 'Bundle', type: 'transaction-response', entry } };
    }

    const results = await this.exclusive(async () => {
      const out: EntryResult[] = [];
      for (let i = 0; i < inputs.length; i++) {
        try {
          const [res] = await this.processEntries([inputs[i]], r.base, i, { atomic: true });
          out.push(res);
        } catch (err) {
          out.push(toStatusAndOutcome(err));
        }
      }
      return out;
    });
    if (emptyAnswer) {
      return { status: 200 };
    }
    const entries: BundleEntry[] = [];
    for (const res of results) {
      entries.push(toResponseEntry({ ...res, resource: res.resource && (await this.present(res.resource, r.base, false)) }, r.base, prefer));
    }
    return { status: 200, body: { resourceType: 'Bundle', type: 'batch-response', entry: entries } };
  }

  /**
   * Processes entries: resolve identities and conditional criteria, rewrite placeholders and validate
   * everything, then write in FHIR order (DELETE, POST, PUT/PATCH, GET).
   * Atomic (all or nothing): the first failure rolls back every write and is thrown as an EntryFailure.
   * Non-atomic (nonAtomic trait): a failing entry gets its own error result, nothing is rolled back, and
   * the identities it was given are still used by the other entries.
   * `contended`/`faults` (transactions only): fail one new-create entry with 409 / an injected status.
   * Must run inside exclusive().
   */
  private async processEntries(
    inputs: EntryInput[],
    base: string,
    indexOffset: number,
    mode: { atomic: boolean; contended?: boolean; faults?: boolean }
  ): Promise<EntryResult[]> {
    const identities = new Map<string, string>();
    const pendingCreates = new Map<string, number>();
    const targets = new Set<string>();
    const plans: (Plan | undefined)[] = [];
    const failed = new Map<number, EntryResult>();
    const failEntry = (i: number, err: unknown): void => {
      if (mode.atomic) {
        throw asEntryFailure(err, i + indexOffset);
      }
      const { status, outcome: failure } = err instanceof EntryFailure ? err : toStatusAndOutcome(err);
      failed.set(i, { status, outcome: failure });
    };

    // Phase 1: identities
    for (let i = 0; i < inputs.length; i++) {
      try {
        plans.push(await this.planEntry(inputs[i], base, plans, identities, pendingCreates, targets));
      } catch (err) {
        plans.push(undefined);
        failEntry(i, err);
      }
    }

    // Phase 2: placeholders -> Type/id, then validation (nothing has been written yet)
    plans.forEach((plan, i) => {
      if (!plan) {
        return;
      }
      try {
        if ((plan.kind === 'create' && !plan.existing && plan.dedupeOf === undefined) || plan.kind === 'update') {
          plan.resource = this.unpresign(rewriteDeep(plan.resource, identities));
          const unresolved = findUnresolvedReferences(plan.resource, plan.type);
          if (unresolved.length > 0) {
            throw fail(400, `Unresolved bundle-local reference(s): ${unresolved.join('; ')}`, 'not-found');
          }
          if (this.validate) {
            validateStored(plan.resource);
          }
        } else if (plan.kind === 'patch') {
          plan.body = rewriteDeep(plan.body, identities);
        }
      } catch (err) {
        failEntry(i, err);
      }
    });

    // Injected failures: a serialization conflict under concurrency, or a fault set up by a test
    if (mode.contended || mode.faults) {
      const createTypes = plans.map((plan, i) => (plan && !failed.has(i) && createsNew(plan) ? plan.type : undefined));
      const injected: { index: number; status: number; outcome: OperationOutcome }[] = [];
      const fault = mode.faults ? this.faults.take(createTypes) : undefined;
      if (fault) {
        injected.push({
          index: fault.index,
          status: fault.status,
          outcome: outcome(fault.status, `Injected failure (sandbox fault): this ${createTypes[fault.index]} entry failed with HTTP ${fault.status}`),
        });
      }
      if (mode.contended) {
        const sr = createTypes.indexOf('ServiceRequest');
        const index = sr >= 0 ? sr : createTypes.findIndex((type) => type !== undefined);
        if (index >= 0 && index !== fault?.index) {
          injected.push({
            index,
            status: 409,
            outcome: outcome(
              409,
              'could not serialize access due to concurrent update (another transaction was in progress); retry the transaction',
              'conflict'
            ),
          });
        }
      }
      for (const failure of injected) {
        failEntry(failure.index, new EntryFailure(failure.index + indexOffset, failure.status, failure.outcome));
      }
    }

    // Phase 3: writes
    const order = plans
      .map((_, i) => i)
      .filter((i) => plans[i] && !failed.has(i))
      .sort((a, b) => PHASE_ORDER[(plans[a] as Plan).kind] - PHASE_ORDER[(plans[b] as Plan).kind] || a - b);
    const results: EntryResult[] = new Array(plans.length);
    const journal = new Journal(this.repo, this.tombstones);
    let current = 0;
    try {
      for (const i of order) {
        current = i;
        try {
          results[i] = await this.execute(plans[i] as Plan, journal, results, base);
        } catch (err) {
          if (mode.atomic) {
            throw err;
          }
          failEntry(i, err);
        }
      }
    } catch (err) {
      await journal.rollback();
      throw asEntryFailure(err, current + indexOffset);
    }
    for (const [i, result] of failed) {
      results[i] = result;
    }
    return results;
  }

  private async planEntry(
    input: EntryInput,
    base: string,
    plans: (Plan | undefined)[],
    identities: Map<string, string>,
    pendingCreates: Map<string, number>,
    targets: Set<string>
  ): Promise<Plan> {
    const method = input.method.toUpperCase();
    if (!method || !input.url) {
      throw fail(400, 'Bundle entry needs request.method and request.url', 'required');
    }
    const { segments, search } = parseEntryUrl(input.url, base);
    const placeholder = input.fullUrl ? normalizePlaceholder(input.fullUrl) : undefined;
    const claim = (type: string, id: string): void => {
      const key = `${type}/${id}`;
      if (targets.has(key)) {
        throw fail(400, `Duplicate resource identity ${key} in one transaction`, 'duplicate');
      }
      targets.add(key);
      if (placeholder) {
        identities.set(placeholder, key);
      }
    };

    if (method === 'GET' || method === 'HEAD' || (method === 'POST' && segments.length === 2 && segments[1] === '_search')) {
      return { kind: 'read', method, segments, params: new URLSearchParams(search), body: input.body };
    }
    const type = segments[0];
    if (!type) {
      throw fail(400, `request.url "${input.url}" does not name a resource type`);
    }
    this.assertResourceType(type, 400);

    switch (method) {
      case 'POST': {
        if (segments.length !== 1 || search) {
          throw fail(400, `Unsupported POST url "${input.url}" (expected a resource type)`);
        }
        const resource = asResource(input.body, type);
        let existing: WithId<Resource> | undefined;
        let dedupeOf: number | undefined;
        if (input.ifNoneExist !== undefined) {
          const criteria = rewriteString(input.ifNoneExist, identities);
          const matches = await this.findMatches(type, criteria);
          if (matches.length > 1) {
            throw fail(412, `ifNoneExist "${criteria}" matched more than one ${type}`, 'multiple-matches');
          }
          existing = matches[0];
          if (!existing) {
            const key = `${type}?${canonicalQuery(criteria)}`;
            dedupeOf = pendingCreates.get(key);
            if (dedupeOf === undefined) {
              pendingCreates.set(key, plans.length);
            }
          }
        }
        const { id: _ignored, ...withoutId } = resource;
        if (existing || dedupeOf !== undefined) {
          const first = dedupeOf === undefined ? undefined : plans[dedupeOf];
          if (!existing && first?.kind !== 'create') {
            throw fail(400, `ifNoneExist "${input.ifNoneExist}" repeats an earlier entry of this bundle that failed`);
          }
          const id = existing ? existing.id : (first as CreatePlan).id;
          if (placeholder) {
            identities.set(placeholder, `${type}/${id}`);
          }
          return { kind: 'create', type, id, resource: withoutId as Resource, existing, dedupeOf };
        }
        const id = this.repo.generateId();
        claim(type, id);
        return { kind: 'create', type, id, resource: withoutId as Resource, raw: input.raw };
      }
      case 'PUT': {
        const resource = asResource(input.body, type);
        let id: string;
        let creates: boolean;
        if (segments.length === 2 && !search) {
          id = segments[1];
          this.checkClientId(type, id);
          creates = !(await this.isStored(type, id));
          if (creates) {
            this.assertMayCreateWithId(type, id);
          }
        } else if (segments.length === 1 && search) {
          const matches = await this.findMatches(type, search);
          if (matches.length > 1) {
            throw fail(412, `Conditional update "${input.url}" matched more than one ${type}`, 'multiple-matches');
          }
          creates = !matches[0];
          if (matches[0]) {
            id = matches[0].id;
          } else if (resource.id !== undefined) {
            if (this.traits.uuidIdsOnly || this.traits.noUpdateAsCreate) {
              throw fail(400, 'Cannot provide ID for create by update', 'invalid', `${type}.id`);
            }
            id = resource.id;
            this.checkClientId(type, id);
            this.assertMayCreateWithId(type, id);
          } else {
            id = this.repo.generateId();
          }
        } else {
          throw fail(400, `Unsupported PUT url "${input.url}"`);
        }
        if (!FHIR_ID.test(id)) {
          throw fail(400, `Invalid resource id "${id}"`);
        }
        if (resource.id !== undefined && resource.id !== id) {
          throw fail(400, `Resource id "${resource.id}" does not match the id "${id}" of the request`, 'invalid', `${type}.id`);
        }
        claim(type, id);
        return { kind: 'update', type, id, resource: { ...resource, id }, ifMatch: input.ifMatch, creates, raw: input.raw };
      }
      case 'DELETE':
      case 'PATCH': {
        let id: string | undefined;
        if (segments.length === 2 && !search) {
          id = segments[1];
        } else if (segments.length === 1 && search) {
          const matches = await this.findMatches(type, search);
          if (matches.length > 1) {
            throw fail(412, `Conditional ${method} "${input.url}" matched more than one ${type}`, 'multiple-matches');
          }
          id = matches[0]?.id;
        } else {
          throw fail(400, `Unsupported ${method} url "${input.url}"`);
        }
        if (method === 'DELETE') {
          if (id) {
            claim(type, id);
          }
          return { kind: 'delete', type, id, ifMatch: input.ifMatch };
        }
        if (!id) {
          throw fail(404, `Conditional PATCH "${input.url}" matched no ${type}`, 'not-found');
        }
        if (input.body === undefined) {
          throw fail(400, 'PATCH needs a body', 'required');
        }
        claim(type, id);
        return { kind: 'patch', type, id, body: input.body, ifMatch: input.ifMatch };
      }
      default:
        throw fail(400, `Unsupported request.method "${input.method}"`, 'not-supported');
    }
  }

  /** A client-assigned id the profile refuses whatever the resource (uuidIdsOnly). */
  private checkClientId(_type: string, id: string): void {
    if (this.traits.uuidIdsOnly && FHIR_ID.test(id) && !isUUID(id)) {
      throw fail(400, 'Invalid id');
    }
  }

  /** Creating a resource with a client-assigned id (update as create), as the profile allows it. */
  private assertMayCreateWithId(type: string, id: string): void {
    if (this.traits.uuidIdsOnly || this.traits.noUpdateAsCreate) {
      throw this.tombstones.has(`${type}/${id}`)
        ? fail(410, `${type}/${id} has been deleted`, 'deleted')
        : fail(404, `${type}/${id} not found (this server does not create resources by update)`, 'not-found');
    }
    if (this.traits.refuseNumericClientIds && /^\d+$/.test(id)) {
      throw fail(
        400,
        `HAPI-0960: Can not create resource with ID[${id}], no resource with this ID exists and clients may only assign IDs which contain at least one non-numeric character`,
        'processing'
      );
    }
  }

  /** Stored and not deleted, without reading (and cloning) the resource when the repository allows. */
  private async isStored(type: string, id: string): Promise<boolean> {
    if (this.tombstones.has(`${type}/${id}`)) {
      return false;
    }
    const resources = (this.repo as unknown as { resources?: unknown }).resources;
    if (resources instanceof Map) {
      const byId: unknown = resources.get(type);
      return byId instanceof Map ? byId.has(id) : false;
    }
    return this.exists(type, id);
  }

  /** versionConflictAs409: a stale If-Match is a 409 (HAPI's ResourceVersionConflictException), not a 412. */
  private versionConflict(err: unknown, plan: { type: string; id?: string; ifMatch?: string }, verb: string): unknown {
    if (this.traits.versionConflictAs409 && plan.ifMatch !== undefined && toStatusAndOutcome(err).status === 412) {
      return fail(409, `HAPI-0989: Trying to ${verb} ${plan.type}/${plan.id ?? ''}/_history/${plan.ifMatch} but this is not the current version`, 'conflict');
    }
    return err;
  }

  private async execute(plan: Plan, journal: Journal, results: EntryResult[], base: string): Promise<EntryResult> {
    switch (plan.kind) {
      case 'create': {
        if (plan.existing) {
          return resultFor(200, await this.repo.readResource(plan.type, plan.existing.id));
        }
        if (plan.dedupeOf !== undefined) {
          const first = results[plan.dedupeOf]?.resource ?? (await this.repo.readResource(plan.type, plan.id));
          return resultFor(200, first);
        }
        await journal.before(plan.type, plan.id);
        const created = await this.repo.createResource({ ...plan.resource, id: plan.id }, { assignedId: true });
        this.tombstones.delete(`${plan.type}/${plan.id}`);
        this.keepRaw(created, plan.raw);
        return resultFor(201, created);
      }
      case 'update': {
        const key = `${plan.type}/${plan.id}`;
        const existed = !this.tombstones.has(key) && (await this.exists(plan.type, plan.id));
        if (plan.ifMatch !== undefined && !existed) {
          throw this.tombstones.has(key) ? fail(410, `${key} has been deleted`, 'deleted') : fail(404, `${key} not found (If-Match given)`, 'not-found');
        }
        await journal.before(plan.type, plan.id);
        let updated: Resource;
        try {
          updated = await this.repo.updateResource(plan.resource, { ifMatch: plan.ifMatch });
        } catch (err) {
          throw this.versionConflict(err, plan, 'update');
        }
        this.tombstones.delete(key);
        this.keepRaw(updated, plan.raw);
        return resultFor(existed ? 200 : 201, updated);
      }
      case 'delete': {
        if (!plan.id || !(await this.exists(plan.type, plan.id))) {
          return { status: 200, outcome: outcome(200, 'Nothing to delete', 'informational') };
        }
        await journal.before(plan.type, plan.id);
        try {
          await this.repo.deleteResource(plan.type, plan.id, { ifMatch: plan.ifMatch });
        } catch (err) {
          throw this.versionConflict(err, plan, 'delete');
        }
        this.tombstones.add(`${plan.type}/${plan.id}`);
        return { status: 200, outcome: outcome(200, `Deleted ${plan.type}/${plan.id}`, 'informational') };
      }
      case 'patch': {
        this.assertNotDeleted(plan.type, plan.id);
        await journal.before(plan.type, plan.id);
        const [result, resource] = await this.router.handleRequest(
          {
            method: 'PATCH',
            url: `/${plan.type}/${encodeURIComponent(plan.id)}`,
            pathname: '',
            body: plan.body,
            params: {},
            query: {},
            headers: plan.ifMatch ? { 'if-match': `W/"${plan.ifMatch}"` } : {},
            config: {},
          },
          this.repo
        );
        if (!isOk(result) || !resource) {
          throw this.versionConflict(new SandboxError(getStatus(result), result), plan, 'update');
        }
        return resultFor(200, resource);
      }
      case 'read': {
        const response = await this.dispatch({
          method: plan.method,
          segments: plan.segments,
          params: plan.params,
          headers: {},
          body: plan.body,
          base,
          inBundle: true,
        });
        return { ...response, resource: response.body };
      }
    }
  }

  /** Raw Binary content goes with the version just written. */
  private keepRaw(written: Resource, raw: BinaryContent | undefined): void {
    if (raw && written.id && written.meta?.versionId) {
      this.blobs.put(written.id, written.meta.versionId, raw);
    }
  }

  private async exists(type: string, id: string): Promise<boolean> {
    try {
      await this.repo.readResource(type, id);
      return true;
    } catch {
      return false;
    }
  }

  // -------------------------------------------------------------------------------------------
  // CapabilityStatement
  // -------------------------------------------------------------------------------------------

  private capabilityStatement(base: string): CapabilityStatement {
    this.capabilityCache ??= buildCapabilityStatement(this.traits);
    const profile = this.traits.profile;
    const description = profile === 'default' ? 'referral-gateway FHIR R4 sandbox' : `referral-gateway FHIR R4 sandbox (profile ${profile})`;
    return { ...this.capabilityCache, implementation: { description, url: base } };
  }
}

const SOFTWARE_NAMES: Record<SandboxProfileName, string> = {
  default: 'referral-gateway FHIR sandbox (@medplum/fhir-router MemoryRepository)',
  medplum: 'Medplum-like referral-gateway FHIR sandbox (profile medplum)',
  hapi: 'HAPI FHIR-like referral-gateway FHIR sandbox (profile hapi)',
  strict: 'referral-gateway FHIR sandbox (profile strict: Medplum and HAPI traits)',
};

function buildCapabilityStatement(traits: SandboxTraits & { profile: SandboxProfileName }): CapabilityStatement {
  const updateCreate = !(traits.uuidIdsOnly || traits.noUpdateAsCreate);
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'] as const;
  const resource: CapabilityStatementRestResource[] = getResourceTypes()
    .filter((type) => !ABSTRACT_TYPES.has(type))
    .sort()
    .map((type) => ({
      type,
      profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
      interaction: interactions.map((code) => ({ code })),
      versioning: 'versioned',
      readHistory: true,
      updateCreate,
      conditionalCreate: true,
      conditionalUpdate: true,
      conditionalDelete: 'single',
      searchParam: Object.values(getSearchParameters(type) ?? {}).map((sp) => ({
        name: sp.code ?? sp.name,
        definition: sp.url,
        type: sp.type,
      })),
    }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    publisher: 'referral-gateway',
    kind: 'instance',
    software: { name: SOFTWARE_NAMES[traits.profile], ...(traits.profile === 'medplum' ? { version: '4.5.2' } : {}) },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        resource,
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
        searchParam: [
          { name: '_count', type: 'number' },
          { name: '_offset', type: 'number' },
          { name: '_sort', type: 'string' },
        ],
      },
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/** The entry creates a resource that does not exist yet (a create not matched by ifNoneExist, or an update as create). */
function createsNew(plan: Plan): plan is CreatePlan | UpdatePlan {
  return (plan.kind === 'create' && !plan.existing && plan.dedupeOf === undefined) || (plan.kind === 'update' && plan.creates);
}

/** A conditional create, update or delete (what makes Medplum ask for a serializable transaction). */
function isConditionalEntry(input: EntryInput): boolean {
  return (input.method === 'POST' && input.ifNoneExist !== undefined) || ((input.method === 'PUT' || input.method === 'DELETE') && input.url.includes('?'));
}

const FHIR_JSON_MEDIA = new Set(['application/fhir+json', 'application/json', 'application/json+fhir', 'json']);

/**
 * GET Binary/<id>: answer the raw content rather than the Binary resource? Yes when an Accept is given
 * and its most preferred media range is not a FHIR JSON type (e.g. `*\/*` (any type), `application/pdf`, or
 * `application/pdf, application/fhir+json;q=0.1`). No Accept: FHIR JSON.
 */
export function prefersRaw(accept: string | undefined): boolean {
  if (accept === undefined || accept.trim() === '') {
    return false;
  }
  let best: { q: number; fhir: boolean } | undefined;
  for (const part of accept.split(',')) {
    const [rawType, ...paramParts] = part.split(';');
    const type = rawType.trim().toLowerCase();
    if (!type) {
      continue;
    }
    let q = 1;
    for (const param of paramParts) {
      const [key, value] = param.split('=').map((x) => x.trim());
      if (key?.toLowerCase() === 'q') {
        q = Number(value);
      }
    }
    if (!Number.isFinite(q) || q <= 0) {
      continue;
    }
    if (!best || q > best.q) {
      best = { q, fhir: FHIR_JSON_MEDIA.has(type) };
    }
  }
  return best !== undefined && !best.fhir;
}

const BINARY_URL = /^Binary\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/([A-Za-z0-9\-.]{1,64}))?$/;

/** `Binary/<id>[/_history/<vid>]`, relative or absolute under `base`. */
function binaryRef(url: string, base: string): { id: string; versionId?: string } | undefined {
  const relative = url.startsWith(base + '/') ? url.slice(base.length + 1) : url;
  const match = BINARY_URL.exec(relative);
  return match ? { id: match[1], versionId: match[2] } : undefined;
}

function methodNotAllowed(method: string, path: string): SandboxError {
  return fail(405, `${method} is not supported on ${path}`, 'not-supported');
}

function preferReturn(prefer: string | undefined): 'minimal' | 'representation' | 'OperationOutcome' | undefined {
  const match = /return=(minimal|representation|OperationOutcome)/i.exec(prefer ?? '');
  if (!match) {
    return undefined;
  }
  switch (match[1].toLowerCase()) {
    case 'minimal':
      return 'minimal';
    case 'operationoutcome':
      return 'OperationOutcome';
    default:
      return 'representation';
  }
}

function parseEntryUrl(url: string, base: string): { segments: string[]; search: string } {
  let relative = url.trim();
  if (relative.startsWith(base + '/')) {
    relative = relative.slice(base.length + 1);
  } else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(relative)) {
    throw fail(400, `Absolute request.url "${url}" does not belong to this server (${base})`);
  }
  const q = relative.indexOf('?');
  const path = q < 0 ? relative : relative.slice(0, q);
  const search = q < 0 ? '' : relative.slice(q + 1);
  try {
    return { segments: path.split('/').filter(Boolean).map(decodeURIComponent), search };
  } catch {
    throw fail(400, `Malformed request.url "${url}"`);
  }
}

function canonicalQuery(query: string): string {
  const params = new URLSearchParams(query.startsWith('?') ? query.slice(1) : query);
  params.sort();
  return params.toString();
}

function asResource(body: unknown, type: string): Resource {
  if (!isPlainObject(body)) {
    throw fail(400, `Expected a ${type} resource`, 'required');
  }
  if (body.resourceType !== type) {
    throw fail(400, `Resource type ${String(body.resourceType)} does not match the request (${type})`, 'invalid', 'resourceType');
  }
  return body as unknown as Resource;
}

function decodePatchBody(resource: Resource | undefined): unknown {
  if (resource?.resourceType === 'Binary' && resource.data) {
    try {
      return JSON.parse(Buffer.from(resource.data, 'base64').toString('utf8'));
    } catch {
      throw fail(400, 'PATCH Binary.data is not base64-encoded JSON Patch');
    }
  }
  return resource;
}

function toEntryInput(entry: BundleEntry | undefined): EntryInput {
  const request = entry?.request;
  const method = typeof request?.method === 'string' ? request.method.toUpperCase() : '';
  return {
    method,
    url: typeof request?.url === 'string' ? request.url : '',
    fullUrl: typeof entry?.fullUrl === 'string' ? entry.fullUrl : undefined,
    ifNoneExist: request?.ifNoneExist,
    ifMatch: parseETag(request?.ifMatch),
    body: method === 'PATCH' ? decodePatchBody(entry?.resource) : entry?.resource,
  };
}

/** Stands in for Binary.data during validation: the smallest valid base64Binary. */
const BINARY_DATA_STUB = 'AAAA';

/**
 * validateResource() of @medplum/core, except that Binary.data may be larger than its 1 MB limit for
 * base64Binary (the limit of Medplum's server; HAPI and most servers take far larger Binaries, and the
 * gateway sends documents over its inline limit as Binary resources). When Binary.data is well-formed
 * base64 (the check the validator itself makes: canonical alphabet, padding, length a multiple of 4), the
 * Binary is validated with a stub in its place, so every other rule still applies; anything else goes
 * to the validator as it is and is refused with its usual issue.
 */
function validateStored(resource: Resource): void {
  if (resource.resourceType === 'Binary' && typeof resource.data === 'string' && isBase64Binary(resource.data)) {
    validateResource({ ...resource, data: BINARY_DATA_STUB });
    return;
  }
  validateResource(resource);
}

/**
 * The validator's base64Binary format check (@medplum/core 5.2.13), without its size limit. Not a regular expression:
 * once V8 compiles one to native code (after many uses in a long-lived process), a `[...]+` loop over a string of
 * megabytes overflows the stack (RangeError), and the transaction would fail with a 500.
 */
function isBase64Binary(value: string): boolean {
  return value.length > 0 && isBase64(value);
}

function resultFor(status: number, resource: Resource): EntryResult {
  const vid = resource.meta?.versionId;
  return {
    status,
    resource,
    location: vid ? `${resource.resourceType}/${resource.id}/_history/${vid}` : `${resource.resourceType}/${resource.id}`,
    etag: vid ? `W/"${vid}"` : undefined,
    lastModified: resource.meta?.lastUpdated,
  };
}

function toResponseEntry(result: EntryResult, base: string, prefer: ReturnType<typeof preferReturn>): BundleEntry {
  const resource = result.resource;
  const isStored = resource && resource.resourceType !== 'Bundle' && resource.id && result.location;
  return {
    fullUrl: isStored ? `${base}/${resource.resourceType}/${resource.id}` : undefined,
    resource: prefer === 'minimal' || prefer === 'OperationOutcome' ? undefined : resource,
    response: {
      status: statusLine(result.status),
      location: result.location,
      etag: result.etag,
      lastModified: result.lastModified,
      outcome: prefer === 'OperationOutcome' || !resource ? result.outcome : undefined,
    },
  };
}

function asEntryFailure(err: unknown, index: number): EntryFailure {
  if (err instanceof EntryFailure) {
    return err;
  }
  const { status, outcome: failure } = toStatusAndOutcome(err);
  return new EntryFailure(index, status, failure);
}

function prefixOutcome(failure: OperationOutcome, index: number): OperationOutcome {
  return {
    ...failure,
    issue: (failure.issue ?? []).map((issue) => ({
      ...issue,
      details: { ...issue.details, text: `Bundle.entry[${index}]: ${issue.details?.text ?? issue.diagnostics ?? ''}` },
      expression: issue.expression?.length ? issue.expression : [`Bundle.entry[${index}]`],
    })),
  };
}
