// The doctor's HTTP layer: every probe request goes through ProbeHttp, which counts requests against a
// budget, parses JSON answers, and keeps the list of probe resources to delete afterwards.
import type { FhirClient } from '../destinations';
import { FhirRequestError } from '../destinations';

export class BudgetExceeded extends Error {
  constructor() {
    super('request budget reached');
    this.name = 'BudgetExceeded';
  }
}

export interface HttpAnswer {
  status: number;
  headers: Headers;
  body: Buffer;
  durationMs: number;
  /** The body parsed, when it is a JSON object. */
  json?: Record<string, unknown>;
}

export interface SendOptions {
  headers?: Record<string, string>;
  body?: string | Uint8Array;
  /** false: no Authorization header (e.g. metadata before auth is known to work). */
  auth?: boolean;
}

export interface ResourceRef {
  type: string;
  id: string;
}

export const FHIR_JSON = 'application/fhir+json';

/** Requests to one destination, counted; FhirRequestError (network, timeout, token) propagates. */
export class ProbeHttp {
  requests = 0;
  /** Probe resources known to exist at the server, in creation order. */
  readonly created: ResourceRef[] = [];
  /** Writes that may have created something whose id is unknown (e.g. "Binary (POST answered without a Location)"). */
  readonly untracked: string[] = [];
  /** A request other than GET was sent (something may have been written). */
  wrote = false;

  constructor(
    readonly client: FhirClient,
    private readonly maxRequests: number
  ) {}

  get baseUrl(): string {
    return this.client.baseUrl;
  }

  async send(method: string, url: string, opts: SendOptions = {}): Promise<HttpAnswer> {
    if (this.requests >= this.maxRequests) {
      throw new BudgetExceeded();
    }
    this.requests++;
    if (method.toUpperCase() !== 'GET') this.wrote = true;
    const res = await this.client.raw(method, url, { headers: opts.headers, body: opts.body, auth: opts.auth });
    return { ...res, json: parseJsonObject(res.body, res.headers) };
  }

  /** A FHIR JSON request (body serialized here). */
  sendJson(method: string, url: string, body: unknown, headers: Record<string, string> = {}): Promise<HttpAnswer> {
    return this.send(method, url, {
      headers: { 'Content-Type': FHIR_JSON, Accept: FHIR_JSON, ...headers },
      body: typeof body === 'string' ? body : JSON.stringify(body),
    });
  }

  get(url: string, accept = FHIR_JSON): Promise<HttpAnswer> {
    return this.send('GET', url, { headers: { Accept: accept } });
  }

  track(ref: ResourceRef | undefined): void {
    if (ref && !this.created.some((c) => c.type === ref.type && c.id === ref.id)) {
      this.created.push(ref);
    }
  }

  forget(ref: ResourceRef): void {
    const i = this.created.findIndex((c) => c.type === ref.type && c.id === ref.id);
    if (i >= 0) this.created.splice(i, 1);
  }
}

export function parseJsonObject(body: Buffer, headers?: Headers): Record<string, unknown> | undefined {
  if (body.length === 0) return undefined;
  const ct = headers?.get('content-type') ?? '';
  if (ct && !/json/i.test(ct)) return undefined;
  try {
    const v: unknown = JSON.parse(body.toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

const REF = /(?:^|\/)([A-Z][A-Za-z]{1,63})\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/([A-Za-z0-9\-.]{1,64}))?\/?(?:[?#].*)?$/;

/** `Patient/1/_history/2` (relative or absolute) → type, id and version. */
export function parseLocation(location: string | null | undefined): (ResourceRef & { versionId?: string }) | undefined {
  if (!location) return undefined;
  const m = REF.exec(location.trim());
  if (!m) return undefined;
  return m[3] ? { type: m[1], id: m[2], versionId: m[3] } : { type: m[1], id: m[2] };
}

/** The id of a write answer: Location header, else the returned resource. */
export function writtenRef(res: HttpAnswer, type: string): ResourceRef | undefined {
  const loc = parseLocation(res.headers.get('location') ?? res.headers.get('content-location'));
  if (loc && loc.type === type) return { type, id: loc.id };
  const body = res.json;
  if (body && body.resourceType === type && typeof body.id === 'string') return { type, id: body.id };
  return undefined;
}

export interface EntryResult {
  status: number;
  ref?: ResourceRef & { versionId?: string };
  etag?: string;
}

/** The entries of a transaction-/batch-response Bundle: their statuses and locations. */
export function bundleEntries(json: Record<string, unknown> | undefined): EntryResult[] | undefined {
  if (!json || json.resourceType !== 'Bundle' || !Array.isArray(json.entry)) return undefined;
  return (json.entry as Array<Record<string, unknown>>).map((e) => {
    const response = (e?.response ?? {}) as { status?: unknown; location?: unknown; etag?: unknown };
    const status = Number.parseInt(String(response.status ?? ''), 10);
    const resource = e?.resource as { resourceType?: unknown; id?: unknown } | undefined;
    let ref = typeof response.location === 'string' ? parseLocation(response.location) : undefined;
    if (!ref && resource && typeof resource.resourceType === 'string' && typeof resource.id === 'string') {
      ref = { type: resource.resourceType, id: resource.id };
    }
    return { status: Number.isFinite(status) ? status : 0, ref, etag: typeof response.etag === 'string' ? response.etag : undefined };
  });
}

export function is2xx(status: number): boolean {
  return status >= 200 && status < 300;
}

/** `HTTP 400 (OperationOutcome: invalid)`: status and issue codes only, never diagnostics text. */
export function describeAnswer(res: HttpAnswer): string {
  const codes = outcomeCodes(res.json);
  return `HTTP ${res.status}${codes.length > 0 ? ` ${codes.join(', ')}` : ''}`;
}

export function outcomeCodes(json: Record<string, unknown> | undefined): string[] {
  if (!json || json.resourceType !== 'OperationOutcome' || !Array.isArray(json.issue)) return [];
  const codes = (json.issue as Array<{ code?: unknown }>).map((i) => i?.code).filter((c): c is string => typeof c === 'string' && /^[a-z-]{1,40}$/.test(c));
  return [...new Set(codes)];
}

/** A probe failure as one line without bodies: FhirRequestError messages name method, target and status only. */
export function describeError(err: unknown): string {
  if (err instanceof FhirRequestError) return err.message;
  if (err instanceof BudgetExceeded) return err.message;
  return (err as Error)?.message?.split('\n')[0]?.slice(0, 200) ?? String(err);
}

/** The weak ETag version, `W/"3"` → `3`. */
export function etagVersion(etag: string | null | undefined): string | undefined {
  const m = etag ? /^(?:W\/)?"([^"]+)"$/.exec(etag.trim()) : null;
  return m ? m[1] : undefined;
}

export function formatBytes(n: number): string {
  if (n >= 1024 * 1024 && n % (1024 * 1024) === 0) return `${n / (1024 * 1024)} MiB`;
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(2)} MiB`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024} KiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} bytes`;
}
