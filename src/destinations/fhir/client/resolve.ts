// Conditional entries of a transaction resolved by searching first (transactionMode resolve-first), and the
// same searches used to confirm what a server wrote when it answered a transaction with an empty body.
import type { Bundle, BundleEntry, Resource } from '@medplum/fhirtypes';
import { FhirRequestError } from './errors';
import type { FhirClient } from './client';
import type { TransactionLocation } from './transaction';

/** What searching a bundle's conditional criteria found, by the index of the entry in the bundle. */
export type Matches = Map<number, TransactionLocation>;

export type SearchOutcome =
  | {
      kind: 'ok';
      matches: Matches;
      duplicates: Array<{ index: number; type: string; count: number }>;
      /**
       * Everything each criterion found, by entry index, oldest first (`matches` holds the first): the caller
       * can look at what it is about to reference (the Patient's demographics) without another request.
       */
      found: Map<number, Resource[]>;
    }
  /** A criterion matched more than one resource: the centre holds duplicates (a conditional create would answer 412). */
  | { kind: 'multiple'; index: number; type: string; count: number };

/**
 * Searches the `ifNoneExist` criteria of `entries` (the ones in `indexes`) in one `batch` request of GETs;
 * a server that refuses the batch (4xx) is asked one search at a time. Network errors, timeouts and 5xx are
 * thrown (FhirRequestError) for the caller's retry policy.
 */
export async function searchCriteria(
  client: FhirClient,
  entries: ReadonlyArray<BundleEntry>,
  indexes: number[],
  signal?: AbortSignal,
  /** Types whose duplicates are tolerated: the oldest id is used (shared resources another writer may have raced). */
  tolerate: ReadonlySet<string> = new Set()
): Promise<SearchOutcome> {
  const matches: Matches = new Map();
  const duplicates: Array<{ index: number; type: string; count: number }> = [];
  const foundByIndex = new Map<number, Resource[]>();
  if (indexes.length === 0) return { kind: 'ok', matches, duplicates, found: foundByIndex };
  const urls = indexes.map((i) => criteriaUrl(entries[i]));
  let pages: Array<Bundle | undefined>;
  try {
    const answer = await client.batch({ resourceType: 'Bundle', type: 'batch', entry: urls.map((url) => ({ request: { method: 'GET', url } })) }, { signal });
    pages = (answer.entry ?? []).map((e) => (e.resource?.resourceType === 'Bundle' && okStatus(e.response?.status) ? (e.resource as Bundle) : undefined));
    if (pages.length !== urls.length || pages.some((p) => p === undefined)) {
      pages = await oneByOne(client, entries, indexes, signal);
    }
  } catch (err) {
    if (!(err instanceof FhirRequestError) || err.kind !== 'http' || (err.status ?? 500) >= 500 || err.status === 429) throw err;
    pages = await oneByOne(client, entries, indexes, signal);
  }
  for (let k = 0; k < indexes.length; k++) {
    const i = indexes[k];
    const type = typeOf(entries[i]);
    const found = (pages[k]?.entry ?? []).flatMap((e) =>
      e.resource?.resourceType === type && e.search?.mode !== 'include' && e.resource.id ? [e.resource] : []
    );
    if (found.length > 1 && !tolerate.has(type)) return { kind: 'multiple', index: i, type, count: found.length };
    if (found.length > 1) {
      duplicates.push({ index: i, type, count: found.length });
      oldestFirst(found);
    }
    if (found.length >= 1) {
      matches.set(i, locationOf(found[0]));
      foundByIndex.set(i, found);
    }
  }
  return { kind: 'ok', matches, duplicates, found: foundByIndex };
}

/** Sorts resources oldest first (meta.lastUpdated, then id): the one to reference among duplicates. */
export function oldestFirst<T extends Resource>(resources: T[]): T[] {
  return resources.sort(
    (a, b) => String(a.meta?.lastUpdated ?? '').localeCompare(String(b.meta?.lastUpdated ?? '')) || String(a.id).localeCompare(String(b.id))
  );
}

async function oneByOne(client: FhirClient, entries: ReadonlyArray<BundleEntry>, indexes: number[], signal?: AbortSignal): Promise<Bundle[]> {
  const out: Bundle[] = [];
  for (const i of indexes) {
    const params = Object.fromEntries(groupParams(new URLSearchParams(entries[i].request?.ifNoneExist ?? '')));
    out.push(await client.search(typeOf(entries[i]) as Resource['resourceType'], { ...params, _count: '2' }, { signal }));
  }
  return out;
}

function groupParams(q: URLSearchParams): Array<[string, string | string[]]> {
  const map = new Map<string, string[]>();
  for (const [k, v] of q) map.set(k, [...(map.get(k) ?? []), v]);
  return [...map.entries()].map(([k, v]) => [k, v.length === 1 ? v[0] : v]);
}

/** `Type?<criteria>&_count=2` for one conditional entry. */
function criteriaUrl(entry: BundleEntry): string {
  const criteria = (entry.request?.ifNoneExist ?? '').replace(/^\?/, '');
  return `${typeOf(entry)}?${criteria}${criteria ? '&' : ''}_count=2`;
}

function typeOf(entry: BundleEntry): string {
  return entry.resource?.resourceType ?? (entry.request?.url ?? '').split(/[/?]/)[0];
}

function okStatus(status: string | undefined): boolean {
  return typeof status === 'string' && /^\s*2\d\d/.test(status);
}

/** `Type/id` (and version) of a resource a search found, as a transaction answer would give it. */
export function locationOf(r: Resource): TransactionLocation {
  return r.meta?.versionId
    ? { resourceType: r.resourceType, id: r.id as string, versionId: r.meta.versionId }
    : { resourceType: r.resourceType, id: r.id as string };
}

/** Indexes of the entries that are conditional creates. */
export function conditionalIndexes(entries: ReadonlyArray<BundleEntry>): number[] {
  return entries.flatMap((e, i) => (e.request?.method === 'POST' && e.request.ifNoneExist ? [i] : []));
}

export interface ResolvedBundle {
  /** The transaction to send: the entries that matched nothing, as plain creates, with references to matched entries rewritten. */
  bundle: Bundle;
  /** `sent[k]` is the index in the original bundle of entry k of `bundle`. */
  sent: number[];
  /** Entries that already exist at the centre, by original index. */
  matches: Matches;
}

/**
 * Turns a bundle of conditional creates into one without conditional entries: what `matches` found is left
 * out and referenced as `Type/id`; the rest are created with plain POSTs. A transaction without conditional
 * entries is not "strictly isolated" on Medplum, so its entry count is not limited, and a resend after a
 * partial write creates only what is missing.
 */
export function withoutConditionalEntries(bundle: Bundle, matches: Matches): ResolvedBundle {
  const entries = bundle.entry ?? [];
  const identities = new Map<string, string>();
  entries.forEach((e, i) => {
    const m = matches.get(i);
    if (m && e.fullUrl) identities.set(e.fullUrl, `${m.resourceType}/${m.id}`);
  });
  const sent: number[] = [];
  const kept: BundleEntry[] = [];
  entries.forEach((e, i) => {
    if (matches.has(i)) return;
    sent.push(i);
    const request = e.request ? { ...e.request } : undefined;
    if (request) delete request.ifNoneExist;
    kept.push({ ...e, resource: e.resource ? rewriteReferences(e.resource, identities) : undefined, request });
  });
  return { bundle: { ...bundle, entry: kept }, sent, matches };
}

/** A copy of `value` whose strings equal to a placeholder in `identities` are replaced by its `Type/id`. */
export function rewriteReferences<T>(value: T, identities: ReadonlyMap<string, string>, depth = 0): T {
  if (identities.size === 0) return value;
  if (typeof value === 'string') return (identities.get(value) ?? value) as T;
  if (depth > 64 || value === null || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((v: unknown) => rewriteReferences(v, identities, depth + 1)) as T;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    // Base64 document data is never a placeholder: keep the very string (no copy).
    out[k] = k === 'data' ? v : rewriteReferences(v, identities, depth + 1);
  }
  return out as T;
}

/**
 * Mutual exclusion by key within this process: `run(keys, fn)` waits until no other run holds any of `keys`.
 * Resolve-first deliveries take the criteria of their shared entries (Patient, Practitioner, Organization...)
 * so that two referrals from one hospital do not both find "no Practitioner" and both create one.
 */
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();

  async run<T>(keys: ReadonlyArray<string>, fn: () => Promise<T>): Promise<T> {
    const sorted = [...new Set(keys)].sort();
    const releases: Array<() => void> = [];
    for (const key of sorted) {
      const previous = this.tails.get(key) ?? Promise.resolve();
      let release!: () => void;
      const mine = new Promise<void>((r) => (release = r));
      const tail = previous.then(() => mine);
      this.tails.set(key, tail);
      releases.push(() => {
        release();
        if (this.tails.get(key) === tail) this.tails.delete(key);
      });
      await previous;
    }
    try {
      return await fn();
    } finally {
      for (const r of releases.reverse()) r();
    }
  }
}
