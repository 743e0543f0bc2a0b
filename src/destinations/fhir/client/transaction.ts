import type { Bundle, BundleEntry, OperationOutcome } from '@medplum/fhirtypes';
import { FhirRequestError } from './errors';
import type { FhirClient, TransactionOptions } from './client';

export interface TransactionLocation {
  resourceType: string;
  id: string;
  versionId?: string;
}

export type TransactionResult =
  /** Every request entry succeeded; `locations[i]` is the server id of request entry `i`. */
  | { kind: 'ok'; locations: TransactionLocation[] }
  /** Worth sending again later (after `retryAfterMs` if the server said so); `outcome` if the server sent one. */
  | { kind: 'retry'; reason: string; retryAfterMs?: number; status?: number; outcome?: OperationOutcome }
  /** Sending the same bundle again will not help. `status` is the HTTP status, or the failing entry's status. */
  | { kind: 'fail'; reason: string; outcome?: OperationOutcome; status: number }
  /**
   * The server answered 2xx with an empty body (Medplum's answer to `Prefer: return=minimal`): it accepted the
   * transaction, but what it wrote must be confirmed by reading it back.
   */
  | { kind: 'unconfirmed'; reason: string; status: number };

/**
 * Sends one transaction Bundle and classifies the answer for the delivery policy.
 *
 * - network error, timeout, 408, 409, 429, 5xx: retry (Retry-After on 429/503 is passed on as `retryAfterMs`);
 * - any other 3xx/4xx: fail, keeping the server's OperationOutcome;
 * - a 2xx is only `ok` when it is a `transaction-response` Bundle with one entry per request entry, every
 *   entry has a 2xx status, and every entry names its resource (`response.location`, or `resource` id);
 *   anything less (HTML, truncated JSON, missing entries or ids) is a retry, never an `ok` without ids;
 * - an entry with a non-2xx status inside a 2xx answer (Medplum answers 200 even when an entry failed)
 *   follows the same rule as a top-level status: 408/429/5xx retry, other 4xx fail with that entry's
 *   status and outcome. Such a server may have kept the other entries (no rollback); the bundle is built
 *   from conditional creates, so a later resend after a fix matches what is already there.
 *
 * Reasons name entry positions, resource types, statuses and OperationOutcome issue codes only; never
 * resource content. Programming and configuration errors (non-transaction bundle, missing secret) are thrown.
 */
export async function sendTransaction(client: Pick<FhirClient, 'transaction'>, bundle: Bundle, opts?: TransactionOptions): Promise<TransactionResult> {
  if (bundle?.resourceType !== 'Bundle' || bundle.type !== 'transaction') {
    throw new Error('sendTransaction(): expected a Bundle of type "transaction"');
  }
  const sent = bundle.entry ?? [];
  let response: Bundle | null;
  try {
    response = opts === undefined ? await client.transaction(bundle) : await client.transaction(bundle, opts);
  } catch (err) {
    if (err instanceof FhirRequestError) {
      return classifyError(err);
    }
    throw err;
  }
  if (response === null) {
    return { kind: 'unconfirmed', reason: 'the server answered the transaction with an empty body', status: 200 };
  }
  opts?.onEntryStatuses?.((response.entry ?? []).map((e) => parseStatus(e.response?.status) ?? 0));
  return classifyResponse(sent, response);
}

/**
 * The delivery decision for a failed request (any interaction, not only a transaction): network errors,
 * timeouts, garbage answers, 408, 409, 429 and 5xx are retries; other HTTP errors are failures.
 */
export function classifyError(err: FhirRequestError): Exclude<TransactionResult, { kind: 'ok' } | { kind: 'unconfirmed' }> {
  switch (err.kind) {
    case 'network':
    case 'timeout':
      return { kind: 'retry', reason: err.message };
    case 'invalid-response':
      return { kind: 'retry', reason: err.message, status: err.status };
    case 'http': {
      const status = err.status ?? 0;
      if (isTransientStatus(status)) {
        return err.outcome
          ? { kind: 'retry', reason: err.message, status, retryAfterMs: err.retryAfterMs, outcome: err.outcome }
          : { kind: 'retry', reason: err.message, status, retryAfterMs: err.retryAfterMs };
      }
      return { kind: 'fail', reason: err.message, status, outcome: err.outcome };
    }
  }
}

/**
 * Statuses worth another attempt: timeouts, throttling, server errors, and 409 Conflict, which FHIR servers
 * answer when a concurrent write won a race (two conditional creates of one identifier, an optimistic-lock
 * failure on HAPI): the resend's conditional creates then match what the winner wrote.
 */
export function isTransientStatus(status: number): boolean {
  return status === 408 || status === 409 || status === 429 || status >= 500;
}

function classifyResponse(sent: BundleEntry[], response: Bundle): TransactionResult {
  if (response.type !== 'transaction-response') {
    const type = safeToken(response.type);
    return { kind: 'retry', reason: `answer is a Bundle of type ${type}, not transaction-response` };
  }
  const entries = response.entry ?? [];
  if (entries.length !== sent.length) {
    return {
      kind: 'retry',
      reason: `answer has ${entries.length} entries for ${sent.length} requests; the transaction outcome is unknown`,
    };
  }

  let retry: TransactionResult | undefined;
  const locations: TransactionLocation[] = [];
  for (let i = 0; i < entries.length; i++) {
    const request = sent[i];
    const entry = entries[i];
    const expectedType = expectedTypeOf(request);
    const label = `entry ${i} (${expectedType ?? 'unknown type'})`;
    const status = parseStatus(entry.response?.status);
    if (status === undefined) {
      retry ??= { kind: 'retry', reason: `${label} has no valid response status` };
      continue;
    }
    if (status < 200 || status >= 300) {
      const codes = issueCodes(entry.response?.outcome);
      const reason = `${label} answered ${status}${codes}`;
      if (status >= 400 && !isTransientStatus(status)) {
        return {
          kind: 'fail',
          reason: `${reason}; other entries may have been applied by the server`,
          status,
          outcome: entry.response?.outcome,
        };
      }
      const entryOutcome = entry.response?.outcome;
      retry ??= entryOutcome ? { kind: 'retry', reason, status, outcome: entryOutcome } : { kind: 'retry', reason, status };
      continue;
    }
    const loc = locationOf(request, entry);
    if (!loc) {
      retry ??= { kind: 'retry', reason: `${label} answered ${status} but names no resource id` };
      continue;
    }
    if (expectedType && loc.resourceType !== expectedType) {
      retry ??= { kind: 'retry', reason: `${label} answered with a ${loc.resourceType} location` };
      continue;
    }
    locations.push(loc);
  }
  return retry ?? { kind: 'ok', locations };
}

/** "201 Created", "201" -> 201. */
function parseStatus(value: string | undefined): number | undefined {
  const m = typeof value === 'string' ? /^\s*([1-5]\d\d)(?:\s|$)/.exec(value) : null;
  return m ? Number(m[1]) : undefined;
}

function expectedTypeOf(request: BundleEntry): string | undefined {
  if (request.resource?.resourceType) {
    return request.resource.resourceType;
  }
  const url = request.request?.url;
  if (!url) {
    return undefined;
  }
  const first = stripQuery(url)
    .split('/')
    .find((s) => s !== '');
  return first && isResourceType(first) ? first : undefined;
}

function locationOf(request: BundleEntry, entry: BundleEntry): TransactionLocation | undefined {
  const etagVersion = parseEtag(entry.response?.etag);
  const fromLocation = entry.response?.location ? parseLocation(entry.response.location) : undefined;
  if (fromLocation) {
    return { ...fromLocation, versionId: fromLocation.versionId ?? etagVersion ?? entry.resource?.meta?.versionId };
  }
  const r = entry.resource;
  if (r?.resourceType && typeof r.id === 'string' && isId(r.id)) {
    return { resourceType: r.resourceType, id: r.id, versionId: etagVersion ?? r.meta?.versionId };
  }
  // A DELETE answers without a location; the id is the one we asked to delete.
  if (request.request?.method === 'DELETE' && request.request.url) {
    return parseLocation(request.request.url);
  }
  return undefined;
}

/**
 * Parses `Patient/123`, `Patient/123/_history/1`, or the same as an absolute URL (any base), into its parts.
 */
export function parseLocation(location: string): TransactionLocation | undefined {
  let path: string;
  if (/^[a-z][a-z0-9+.-]*:/i.test(location)) {
    try {
      path = new URL(location).pathname;
    } catch {
      return undefined;
    }
  } else {
    path = stripQuery(location);
  }
  const segs = path.split('/').filter((s) => s !== '');
  let versionId: string | undefined;
  if (segs.length >= 4 && segs[segs.length - 2] === '_history') {
    versionId = segs.pop();
    segs.pop();
    if (!versionId || !isId(versionId)) {
      return undefined;
    }
  }
  const id = segs.pop();
  const resourceType = segs.pop();
  if (!id || !resourceType || !isId(id) || !isResourceType(resourceType)) {
    return undefined;
  }
  return versionId ? { resourceType, id, versionId } : { resourceType, id };
}

function stripQuery(url: string): string {
  return url.split(/[?#]/)[0];
}

function isId(s: string): boolean {
  return /^[A-Za-z0-9\-.]{1,64}$/.test(s);
}

function isResourceType(s: string): boolean {
  return /^[A-Z][A-Za-z]{1,63}$/.test(s);
}

function parseEtag(etag: string | undefined): string | undefined {
  const m = etag ? /^(?:W\/)?"([^"]+)"$/.exec(etag.trim()) : null;
  return m && isId(m[1]) ? m[1] : undefined;
}

function issueCodes(outcome: OperationOutcome | undefined): string {
  const codes = (outcome?.issue ?? []).map((i) => i.code).filter((c) => typeof c === 'string' && /^[a-z-]{1,40}$/.test(c));
  return codes.length > 0 ? ` (OperationOutcome: ${[...new Set(codes)].join(', ')})` : '';
}

function safeToken(value: unknown): string {
  return typeof value === 'string' && /^[a-z-]{1,40}$/.test(value) ? value : '(none)';
}
