// The FHIR R4 sandbox engine: REST interactions and batch/transaction processing on top of
// @medplum/fhir-router's MemoryRepository. HTTP-framework agnostic (see sandbox.ts for express).
//
// Why transactions are processed here rather than by FhirRouter's BatchProcessor (5.2.13):
//  - with config.transactions it refuses "strict isolation" bundles (any ifNoneExist) with > 8
//    entries; without it, a 'transaction' is processed as a batch (partial writes on failure);
//  - MemoryRepository.withTransaction() never rolls back;
//  - it only rewrites lower-case urn:uuid references;
//  - response.status is '201' (not '201 Created') and response.location lacks _history/vid.
import type { WithId } from '@medplum/core';
import {
  getResourceTypes,
  getSearchParameter,
  getSearchParameters,
  getStatus,
  isOk,
  isResourceType,
  parseSearchRequest,
  validateResource,
} from '@medplum/core';
import type { SearchRequest } from '@medplum/core';
import type { FhirRouter, HttpMethod, MemoryRepository } from '@medplum/fhir-router';
import type {
  Bundle,
  BundleEntry,
  BundleLink,
  CapabilityStatement,
  CapabilityStatementRestResource,
  OperationOutcome,
  Resource,
} from '@medplum/fhirtypes';
import { IndexedMemoryRepository } from './sandbox-repo';
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
} from './sandbox-support';

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

/** A framework-neutral request. `segments` are decoded path segments relative to the FHIR base. */
export interface RestRequest {
  method: string;
  segments: string[];
  params: URLSearchParams;
  headers: { ifMatch?: string; ifNoneExist?: string; prefer?: string };
  body: unknown;
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
}

interface EntryInput {
  method: string;
  url: string;
  fullUrl?: string;
  ifNoneExist?: string;
  ifMatch?: string;
  body?: unknown;
}

interface CreatePlan {
  kind: 'create';
  type: string;
  id: string;
  resource: Resource;
  existing?: WithId<Resource>;
  dedupeOf?: number;
}
interface UpdatePlan {
  kind: 'update';
  type: string;
  id: string;
  resource: Resource;
  ifMatch?: string;
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

export class SandboxEngine {
  private readonly tombstones = new Set<string>();
  private queue: Promise<unknown> = Promise.resolve();
  private capabilityCache: CapabilityStatement | undefined;
  private readonly validate: boolean;
  private readonly defaultCount: number;
  private readonly maxCount: number;

  constructor(
    readonly repo: MemoryRepository,
    readonly router: FhirRouter,
    readonly stats: SandboxStats,
    options: SandboxEngineOptions = {}
  ) {
    this.validate = options.validate ?? true;
    this.defaultCount = options.defaultCount ?? 20;
    this.maxCount = options.maxCount ?? 1000;
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
          this.requireBody(r);
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
        case 'GET':
          this.interaction(r, 'read');
          return this.resourceResponse(200, await this.read(type, id));
        case 'PUT':
        case 'PATCH':
          this.interaction(r, method === 'PUT' ? 'update' : 'patch');
          this.requireBody(r);
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
        const entry = (history.entry ?? []).map((e) => ({
          fullUrl: `${r.base}/${type}/${id}`,
          resource: e.resource,
          request: { method: 'PUT' as const, url: `${type}/${id}` },
          response: { status: '200 OK', lastModified: e.resource?.meta?.lastUpdated },
        }));
        return { status: 200, body: { resourceType: 'Bundle', type: 'history', total: entry.length, entry } };
      }
      this.interaction(r, 'vread');
      return this.resourceResponse(200, await this.repo.readVersion(type, id, segs[3]));
    }
    throw fail(404, `Unknown path: ${segs.join('/')}`, 'not-found');
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

  async search(type: string, params: URLSearchParams, base: string): Promise<Bundle> {
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
    const link: BundleLink[] = [{ relation: 'self', url: pageUrl(offset) }];
    if (count > 0) {
      link.push({ relation: 'first', url: pageUrl(0) });
      if (offset + count < total) {
        link.push({ relation: 'next', url: pageUrl(offset + count) });
      }
      if (offset > 0) {
        link.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
      }
    }
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      total,
      link,
      entry: (result.entry ?? []).map((e) => ({
        fullUrl: e.resource ? `${base}/${e.resource.resourceType}/${e.resource.id}` : undefined,
        resource: e.resource,
        search: e.search,
      })),
    };
  }

  /** Matches for conditional interactions (ifNoneExist, conditional update/delete/patch). */
  private async findMatches(type: string, criteria: string): Promise<WithId<Resource>[]> {
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
    const input: EntryInput = {
      method,
      url: r.segments.map(encodeURIComponent).join('/') + query,
      ifNoneExist: method === 'POST' ? r.headers.ifNoneExist : undefined,
      ifMatch: r.headers.ifMatch,
      body: r.body,
    };
    const [result] = await this.exclusive(() => this.processEntries([input], r.base, 0));
    const prefer = preferReturn(r.headers.prefer);
    let body: Resource | undefined = result.resource ?? result.outcome;
    if (prefer === 'minimal') {
      body = undefined;
    } else if (prefer === 'OperationOutcome') {
      body = result.outcome ?? outcome(result.status, statusLine(result.status), 'informational');
    }
    return {
      status: result.status,
      body,
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

    if (bundle.type === 'transaction') {
      let results: EntryResult[];
      try {
        results = await this.exclusive(() => this.processEntries(inputs, r.base, 0));
      } catch (err) {
        if (err instanceof EntryFailure) {
          throw new SandboxError(err.status, prefixOutcome(err.outcome, err.index));
        }
        throw err;
      }
      return {
        status: 200,
        body: {
          resourceType: 'Bundle',
          type: 'transaction-response',
          entry: results.map((res) => toResponseEntry(res, r.base, prefer)),
        },
      };
    }

    const entries = await this.exclusive(async () => {
      const out: BundleEntry[] = [];
      for (let i = 0; i < inputs.length; i++) {
        try {
          const [res] = await this.processEntries([inputs[i]], r.base, i);
          out.push(toResponseEntry(res, r.base, prefer));
        } catch (err) {
          const { status, outcome: failure } = toStatusAndOutcome(err);
          out.push({ response: { status: statusLine(status), outcome: failure } });
        }
      }
      return out;
    });
    return { status: 200, body: { resourceType: 'Bundle', type: 'batch-response', entry: entries } };
  }

  /**
   * Processes entries atomically (all or nothing): resolve identities and conditional criteria,
   * rewrite placeholders and validate everything, then write in FHIR order
   * (DELETE, POST, PUT/PATCH, GET), rolling back on any failure.
   * Must run inside exclusive().
   */
  private async processEntries(inputs: EntryInput[], base: string, indexOffset: number): Promise<EntryResult[]> {
    const identities = new Map<string, string>();
    const pendingCreates = new Map<string, number>();
    const targets = new Set<string>();
    const plans: Plan[] = [];

    // Phase 1: identities
    for (let i = 0; i < inputs.length; i++) {
      try {
        plans.push(await this.planEntry(inputs[i], base, plans, identities, pendingCreates, targets));
      } catch (err) {
        throw asEntryFailure(err, i + indexOffset);
      }
    }

    // Phase 2: placeholders -> Type/id, then validation (nothing has been written yet)
    plans.forEach((plan, i) => {
      try {
        if ((plan.kind === 'create' && !plan.existing && plan.dedupeOf === undefined) || plan.kind === 'update') {
          plan.resource = rewriteDeep(plan.resource, identities);
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
        throw asEntryFailure(err, i + indexOffset);
      }
    });

    // Phase 3: writes
    const order = plans.map((_, i) => i).sort((a, b) => PHASE_ORDER[plans[a].kind] - PHASE_ORDER[plans[b].kind] || a - b);
    const results: EntryResult[] = new Array(plans.length);
    const journal = new Journal(this.repo, this.tombstones);
    let current = 0;
    try {
      for (const i of order) {
        current = i;
        results[i] = await this.execute(plans[i], journal, results, base);
      }
    } catch (err) {
      await journal.rollback();
      throw asEntryFailure(err, current + indexOffset);
    }
    return results;
  }

  private async planEntry(
    input: EntryInput,
    base: string,
    plans: Plan[],
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
          const id = existing ? existing.id : (plans[dedupeOf as number] as CreatePlan).id;
          if (placeholder) {
            identities.set(placeholder, `${type}/${id}`);
          }
          return { kind: 'create', type, id, resource: withoutId as Resource, existing, dedupeOf };
        }
        const id = this.repo.generateId();
        claim(type, id);
        return { kind: 'create', type, id, resource: withoutId as Resource };
      }
      case 'PUT': {
        const resource = asResource(input.body, type);
        let id: string;
        if (segments.length === 2 && !search) {
          id = segments[1];
        } else if (segments.length === 1 && search) {
          const matches = await this.findMatches(type, search);
          if (matches.length > 1) {
            throw fail(412, `Conditional update "${input.url}" matched more than one ${type}`, 'multiple-matches');
          }
          id = matches[0]?.id ?? resource.id ?? this.repo.generateId();
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
        return { kind: 'update', type, id, resource: { ...resource, id }, ifMatch: input.ifMatch };
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
        return resultFor(201, created);
      }
      case 'update': {
        const key = `${plan.type}/${plan.id}`;
        const existed = !this.tombstones.has(key) && (await this.exists(plan.type, plan.id));
        if (plan.ifMatch !== undefined && !existed) {
          throw this.tombstones.has(key)
            ? fail(410, `${key} has been deleted`, 'deleted')
            : fail(404, `${key} not found (If-Match given)`, 'not-found');
        }
        await journal.before(plan.type, plan.id);
        const updated = await this.repo.updateResource(plan.resource, { ifMatch: plan.ifMatch });
        this.tombstones.delete(key);
        return resultFor(existed ? 200 : 201, updated);
      }
      case 'delete': {
        if (!plan.id || !(await this.exists(plan.type, plan.id))) {
          return { status: 200, outcome: outcome(200, 'Nothing to delete', 'informational') };
        }
        await journal.before(plan.type, plan.id);
        await this.repo.deleteResource(plan.type, plan.id, { ifMatch: plan.ifMatch });
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
          throw new SandboxError(getStatus(result), result);
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
    this.capabilityCache ??= buildCapabilityStatement();
    return { ...this.capabilityCache, implementation: { description: 'referral-gateway FHIR R4 sandbox', url: base } };
  }
}

function buildCapabilityStatement(): CapabilityStatement {
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
      updateCreate: true,
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
    software: { name: 'referral-gateway FHIR sandbox (@medplum/fhir-router MemoryRepository)' },
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

function methodNotAllowed(method: string, path: string): SandboxError {
  return fail(405, `${method} is not supported on ${path}`, 'not-supported');
}

function preferReturn(prefer: string | undefined): 'minimal' | 'representation' | 'OperationOutcome' | undefined {
  const match = /return=(minimal|representation|OperationOutcome)/i.exec(prefer ?? '');
  if (!match) {
    return undefined;
  }
  const value = match[1].toLowerCase();
  return value === 'minimal' ? 'minimal' : value === 'operationoutcome' ? 'OperationOutcome' : 'representation';
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

/** The validator's base64Binary format check (@medplum/core 5.2.13), without its size limit. */
function isBase64Binary(value: string): boolean {
  if (value.length === 0 || value.length % 4 !== 0) {
    return false;
  }
  const padding = value.endsWith('==') ? 2 : value.endsWith('=') ? 1 : 0;
  return /^[A-Za-z\d+/]+$/.test(padding > 0 ? value.slice(0, -padding) : value);
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

