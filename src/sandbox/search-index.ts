// Search index for the sandbox's MemoryRepository.
//
// MemoryRepository.search scans every stored resource of the type, evaluates each filter with
// FHIRPath (core's matchesSearchRequest), deep-clones every match and only then sorts and pages:
// a poll page `Task?_tag=..&_lastUpdated=gt..&_sort=_lastUpdated` over 10,000 Tasks took ~80 ms.
// This index answers the same searches from per-type structures kept in step with the store:
//   - entries in store order (the order MemoryRepository returns unsorted results in),
//   - an array ordered by (meta.lastUpdated, store order) for `_lastUpdated` ranges and `_sort`,
//   - lower-cased Identifier.value / Identifier.type.text -> ids (for `identifier=` and ifNoneExist),
//   - lower-cased id -> ids (`_id=a,b,c`; token matching is case-insensitive).
// Candidates come from the narrowest of these; every filter is then evaluated on each candidate,
// `_lastUpdated`, `_tag`, `_security`, `_id` and `identifier` directly on the resource (ports of
// core's date/token matching, src/search/match.ts and ir.ts in @medplum/core 5.2.13), any other
// parameter with core's matchesSearchRequest, exactly as the scan does. Only the returned page is
// cloned. Results, order (ties keep store order, like the scan's stable sort), totals and paging
// are those of MemoryRepository.search; test/integration/sandbox-search.test.ts checks it.
// The scan sorts by JSON.stringify([lastUpdated]).localeCompare(): for instants in the canonical
// form MemoryRepository writes (YYYY-MM-DDThh:mm:ss.sssZ) that is plain string order, which the
// index uses. Searches the index does not model (chained or _has filters, _include/_revinclude,
// sorting by anything but _lastUpdated, _lastUpdated filters or sort while some stored
// meta.lastUpdated is not canonical, e.g. seeded) return undefined and the caller scans.
//
// Keeping in step: the index replaces MemoryRepository's internal `resources` map (fhir-router
// 5.2.13: Map<type, Map<id, Resource>>, the same internals the transaction Journal uses) with a map
// whose per-type maps report every set/delete/clear. Every write path (create, update, patch,
// conditional create, delete, expunge, clear, Journal rollback) goes through those maps, so
// nothing can bypass the index. If the internals change shape, attach() declines and every search
// is a scan.
import { deepClone, getElementDefinition, getSearchParameter, matchesSearchRequest, Operator, splitSearchOnComma, toPeriod } from '@medplum/core';
import type { Filter, SearchRequest, WithId } from '@medplum/core';
import type { Bundle, BundleEntry, Period, Resource, SearchParameter } from '@medplum/fhirtypes';

interface Entry {
  readonly id: string;
  /** Position in store order: assigned when the id enters the type's map, kept across updates. */
  readonly seq: number;
  resource: Resource;
  /** meta.lastUpdated when it is a canonical instant (toPeriod(x) is [x, x]); undefined otherwise. */
  lastUpdated: string | undefined;
  /** Identifier keys this entry is filed under (to unfile it on update/delete). */
  keys: string[];
}

const CANONICAL_INSTANT = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

/**
 * meta.lastUpdated if it is an instant whose search period is exactly itself and whose string
 * order is its time order; MemoryRepository always writes such values (`new Date().toISOString()`).
 */
function canonicalInstant(value: unknown): string | undefined {
  if (typeof value !== 'string' || !CANONICAL_INSTANT.test(value)) {
    return undefined;
  }
  try {
    const period = toPeriod(value);
    return period?.start === value && period.end === value ? value : undefined;
  } catch {
    return undefined;
  }
}

function compareEntries(a: Entry, b: Entry): number {
  const ka = a.lastUpdated ?? '';
  const kb = b.lastUpdated ?? '';
  if (ka < kb) return -1;
  if (ka > kb) return 1;
  return a.seq - b.seq;
}

/** Top-level Identifier elements filed in the key index (`DocumentReference?identifier=` also reads masterIdentifier). */
const INDEXED_IDENTIFIER_ELEMENTS = ['identifier', 'masterIdentifier'] as const;

/** The Identifiers in `elements` of a resource (each element 0..1 or 0..*). */
function identifierList(resource: Resource, elements: readonly string[] = INDEXED_IDENTIFIER_ELEMENTS): unknown[] {
  const out: unknown[] = [];
  for (const element of elements) {
    const value = (resource as unknown as Record<string, unknown>)[element];
    if (Array.isArray(value)) {
      out.push(...(value as unknown[]));
    } else if (value !== undefined && value !== null) {
      out.push(value);
    }
  }
  return out;
}

/** Index of one resource type. */
class TypeIndex {
  readonly entries = new Map<string, Entry>();
  /** Ordered by (lastUpdated, seq); entries without a canonical lastUpdated sort first. */
  readonly sorted: Entry[] = [];
  /** Entries whose meta.lastUpdated is missing or not canonical. */
  odd = 0;
  private nextSeq = 0;
  private readonly byKey = new Map<string, Set<string>>();
  /** Ids that are not all lower-case, by their lower-case form. */
  private readonly mixedCaseIds = new Map<string, Set<string>>();

  put(id: string, resource: Resource): void {
    const lastUpdated = canonicalInstant(resource.meta?.lastUpdated);
    let entry = this.entries.get(id);
    if (entry) {
      this.unsort(entry);
      this.unfile(entry);
      if (entry.lastUpdated === undefined) {
        this.odd--;
      }
      entry.resource = resource;
      entry.lastUpdated = lastUpdated;
    } else {
      entry = { id, seq: this.nextSeq++, resource, lastUpdated, keys: [] };
      this.entries.set(id, entry);
      const lower = id.toLowerCase();
      if (lower !== id) {
        addTo(this.mixedCaseIds, lower, id);
      }
    }
    if (lastUpdated === undefined) {
      this.odd++;
    }
    this.insertSorted(entry);
    this.file(entry);
  }

  remove(id: string): void {
    const entry = this.entries.get(id);
    if (!entry) {
      return;
    }
    this.unsort(entry);
    this.unfile(entry);
    if (entry.lastUpdated === undefined) {
      this.odd--;
    }
    this.entries.delete(id);
    const lower = id.toLowerCase();
    if (lower !== id) {
      removeFrom(this.mixedCaseIds, lower, id);
    }
  }

  /** Entries whose id equals `lowerId` case-insensitively. */
  byId(lowerId: string): Entry[] {
    const out: Entry[] = [];
    const exact = this.entries.get(lowerId);
    if (exact) {
      out.push(exact);
    }
    for (const id of this.mixedCaseIds.get(lowerId) ?? []) {
      const entry = this.entries.get(id);
      if (entry) {
        out.push(entry);
      }
    }
    return out;
  }

  /** Entries with an Identifier.value or Identifier.type.text equal to `lowerKey` case-insensitively. */
  byIdentifier(lowerKey: string): Entry[] {
    const out: Entry[] = [];
    for (const id of this.byKey.get(lowerKey) ?? []) {
      const entry = this.entries.get(id);
      if (entry) {
        out.push(entry);
      }
    }
    return out;
  }

  /** First index in `sorted` whose lastUpdated is >= key (strict: > key). Only meaningful when odd === 0. */
  bound(key: string, strict: boolean): number {
    let lo = 0;
    let hi = this.sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const k = this.sorted[mid].lastUpdated ?? '';
      if (k < key || (strict && k === key)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  private insertSorted(entry: Entry): void {
    const sorted = this.sorted;
    // Writes nearly always carry the newest timestamp: append.
    if (sorted.length === 0 || compareEntries(sorted[sorted.length - 1], entry) < 0) {
      sorted.push(entry);
      return;
    }
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (compareEntries(sorted[mid], entry) < 0) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    sorted.splice(lo, 0, entry);
  }

  private unsort(entry: Entry): void {
    const sorted = this.sorted;
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (compareEntries(sorted[mid], entry) < 0) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    if (sorted[lo] === entry) {
      sorted.splice(lo, 1);
      return;
    }
    const at = sorted.indexOf(entry); // unreachable unless the order was corrupted; stay correct anyway
    if (at >= 0) {
      sorted.splice(at, 1);
    }
  }

  private file(entry: Entry): void {
    const keys = new Set<string>();
    for (const identifier of identifierList(entry.resource)) {
      if (identifier === null || typeof identifier !== 'object') {
        continue;
      }
      const { value, type } = identifier as { value?: unknown; type?: { text?: unknown } };
      if (typeof value === 'string' && value !== '') {
        keys.add(value.toLowerCase());
      }
      if (typeof type?.text === 'string' && type.text !== '') {
        keys.add(type.text.toLowerCase());
      }
    }
    entry.keys = [...keys];
    for (const key of entry.keys) {
      addTo(this.byKey, key, entry.id);
    }
  }

  private unfile(entry: Entry): void {
    for (const key of entry.keys) {
      removeFrom(this.byKey, key, entry.id);
    }
    entry.keys = [];
  }
}

function addTo(map: Map<string, Set<string>>, key: string, id: string): void {
  let ids = map.get(key);
  if (!ids) {
    ids = new Set();
    map.set(key, ids);
  }
  ids.add(id);
}

function removeFrom(map: Map<string, Set<string>>, key: string, id: string): void {
  const ids = map.get(key);
  if (ids?.delete(id) && ids.size === 0) {
    map.delete(key);
  }
}

// ---------------------------------------------------------------------------------------------
// Observed store maps
// ---------------------------------------------------------------------------------------------

/** A type's id -> resource map that reports every change to its TypeIndex. */
class ObservedResources extends Map<string, Resource> {
  declare index: TypeIndex;

  override set(id: string, resource: Resource): this {
    super.set(id, resource);
    this.index.put(id, resource);
    return this;
  }

  override delete(id: string): boolean {
    const had = super.delete(id);
    if (had) {
      this.index.remove(id);
    }
    return had;
  }

  override clear(): void {
    super.clear();
    this.index = new TypeIndex();
  }
}

/** The repository's type -> map map; per-type maps put into it become ObservedResources. */
class ObservedTypes extends Map<string, Map<string, Resource>> {
  override set(type: string, byId: Map<string, Resource>): this {
    return super.set(type, observe(byId));
  }
}

/**
 * Makes `byId` an ObservedResources in place (MemoryRepository keeps writing to the very map it
 * put into the store) and indexes what it already holds.
 */
function observe(byId: Map<string, Resource>): ObservedResources {
  if (byId instanceof ObservedResources) {
    return byId;
  }
  const observed = Object.setPrototypeOf(byId, ObservedResources.prototype) as ObservedResources;
  observed.index = new TypeIndex();
  for (const [id, resource] of observed) {
    observed.index.put(id, resource);
  }
  return observed;
}

// ---------------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------------

type Evaluate = (entry: Entry) => boolean;

interface CompiledFilter {
  evaluate: Evaluate;
  /** Cheap evaluators run before FHIRPath ones. */
  cheap: boolean;
  /** Every match is among these (undefined: this filter cannot narrow by key). */
  candidates?: (index: TypeIndex) => Entry[];
  /** Every match has lastUpdated in this range of index.sorted (half-open, store must be canonical). */
  range?: { lower?: { key: string; strict: boolean }; upper?: { key: string; strict: boolean } };
  /** The filter reads meta.lastUpdated (requires a canonical store). */
  usesLastUpdated: boolean;
}

function isExpression(type: string, param: SearchParameter, path: string): boolean {
  return param.expression === `${type}.${path}` || param.expression === `Resource.${path}` || param.expression === `DomainResource.${path}`;
}

/** The same parameter MemoryRepository would evaluate: the type's own (narrowed) definition. */
function paramOf(type: string, code: string): SearchParameter | undefined {
  return getSearchParameter(type, code);
}

function isLastUpdatedParam(type: string, code: string): boolean {
  const param = paramOf(type, code);
  return param?.type === 'date' && isExpression(type, param, 'meta.lastUpdated');
}

/** Called with each search token (system, value) of a resource; true stops the walk. */
type TokenVisitor = (system: string | undefined, value: string | undefined) => boolean;

function asList(value: unknown): unknown[] {
  if (Array.isArray(value)) return value;
  return value === undefined || value === null ? [] : [value];
}

function str(value: unknown): string | undefined {
  return value === undefined || value === null ? undefined : String(value);
}

/** core ir.ts buildSimpleToken: a token exists when it has a system or a value. */
function visitToken(visit: TokenVisitor, system: unknown, value: unknown): boolean {
  const s = typeof system === 'string' ? system : undefined;
  const v = str(value);
  return s || v ? visit(s, v) : false;
}

/** core ir.ts buildCodingToken (no text-search system): display, then system|code. */
function visitCodings(codings: unknown, visit: TokenVisitor): boolean {
  for (const coding of asList(codings)) {
    if (coding && typeof coding === 'object') {
      const c = coding as { system?: unknown; code?: unknown; display?: unknown };
      if ((c.display && visitToken(visit, undefined, c.display)) || visitToken(visit, c.system, c.code)) {
        return true;
      }
    }
  }
  return false;
}

/** core ir.ts buildIdentifierToken (no text-search system): type.text, then system|value. */
function visitIdentifiers(resource: Resource, elements: readonly string[], visit: TokenVisitor): boolean {
  for (const identifier of identifierList(resource, elements)) {
    if (identifier && typeof identifier === 'object') {
      const i = identifier as { system?: unknown; value?: unknown; type?: { text?: unknown } };
      if ((i.type?.text && visitToken(visit, undefined, i.type.text)) || visitToken(visit, i.system, i.value)) {
        return true;
      }
    }
  }
  return false;
}

/** `actual` equals `lower` case-insensitively (`raw` is `lower` before lower-casing: a cheap exact hit). */
function sameIgnoringCase(actual: string | undefined, raw: string, lower: string): boolean {
  return actual !== undefined && (actual === raw || actual.toLowerCase() === lower);
}

/** core match.ts matchesTokenValue, compiled for one filter value. */
function tokenValueMatcher(filterValue: string): TokenVisitor {
  if (filterValue.includes('|')) {
    const [rawSystem, rawValue] = filterValue.split('|');
    const system = rawSystem.toLowerCase();
    const value = rawValue.toLowerCase();
    if (!system && !value) {
      return () => false;
    }
    if (!system) {
      return (s, v) => !s && sameIgnoringCase(v, rawValue, value);
    }
    return (s, v) => sameIgnoringCase(s, rawSystem, system) && (!value || sameIgnoringCase(v, rawValue, value));
  }
  const lower = filterValue.toLowerCase();
  return (_s, v) => sameIgnoringCase(v, filterValue, lower);
}

/** core match.ts matchesTokenFilter: any token matching any value (negated for :not / ne). */
function tokenMatcher(filterValues: string[]): TokenVisitor {
  const matchers = filterValues.map(tokenValueMatcher);
  return matchers.length === 1 ? matchers[0] : (s, v) => matchers.some((m) => m(s, v));
}

/**
 * The lower-cased values a token filter value can only match through (`code`, `|code`,
 * `system|code`); undefined when it can match without one (`system|`).
 */
function tokenKeys(filterValues: string[], withSystem: boolean): string[] | undefined {
  const keys: string[] = [];
  for (const filterValue of filterValues) {
    if (filterValue.includes('|')) {
      const [system, value] = filterValue.split('|').map((s) => s.toLowerCase());
      if (!system && !value) {
        continue; // matches nothing
      }
      if (system && !withSystem) {
        continue; // resource ids have no system: `system|x` matches nothing
      }
      if (!value) {
        return undefined;
      }
      keys.push(value);
    } else if (filterValue === '') {
      return undefined; // matches an empty value, which is never filed
    } else {
      keys.push(filterValue.toLowerCase());
    }
  }
  return keys;
}

/** core match.ts matchesDateValue. */
function matchesDateValue(resourceValue: Period, operator: Operator, filterPeriod: Period | undefined): boolean {
  if (!filterPeriod) {
    return false;
  }
  const resourceStart = resourceValue.start ?? '0000';
  const resourceEnd = resourceValue.end ?? '9999';
  const filterStart = filterPeriod.start as string;
  const filterEnd = filterPeriod.end as string;
  switch (operator) {
    case Operator.APPROXIMATELY:
    case Operator.EQUALS:
    case Operator.NOT_EQUALS:
      return resourceStart < filterEnd && resourceEnd > filterStart;
    case Operator.LESS_THAN:
      return resourceStart < filterStart;
    case Operator.GREATER_THAN:
      return resourceEnd > filterEnd;
    case Operator.LESS_THAN_OR_EQUALS:
      return resourceStart <= filterEnd;
    case Operator.GREATER_THAN_OR_EQUALS:
      return resourceEnd >= filterStart;
    case Operator.STARTS_AFTER:
      return resourceStart > filterEnd;
    case Operator.ENDS_BEFORE:
      return resourceEnd < filterStart;
    default:
      return false;
  }
}

function isNegated(operator: Operator): boolean {
  return operator === Operator.NOT_EQUALS || operator === Operator.NOT;
}

/** Compiles one filter; undefined when the index cannot evaluate it identically (caller scans). */
function compileFilter(type: string, filter: Filter): CompiledFilter | undefined {
  const single: SearchRequest = { resourceType: type as Resource['resourceType'], filters: [filter] };
  const generic: CompiledFilter = {
    evaluate: (entry) => matchesSearchRequest(entry.resource, single),
    cheap: false,
    usesLastUpdated: false,
  };
  const param = paramOf(type, filter.code);
  if (!param || filter.operator === Operator.MISSING || filter.operator === Operator.PRESENT) {
    return generic;
  }
  const negated = isNegated(filter.operator);

  if (param.type === 'date' && isExpression(type, param, 'meta.lastUpdated')) {
    let periods: (Period | undefined)[];
    try {
      periods = splitSearchOnComma(filter.value).map((v) => toPeriod(v));
    } catch {
      return undefined; // let the scan fail (or not) exactly as it would
    }
    const operator = filter.operator;
    const compiled: CompiledFilter = {
      // canonical store: the resource's period is [lastUpdated, lastUpdated]
      evaluate: (entry) => {
        const lu = entry.lastUpdated as string;
        const resourcePeriod = { start: lu, end: lu };
        for (const period of periods) {
          if (matchesDateValue(resourcePeriod, operator, period)) {
            return !negated;
          }
        }
        return negated;
      },
      cheap: true,
      usesLastUpdated: true,
    };
    const period = periods.length === 1 ? periods[0] : undefined;
    if (!negated && period?.start && period.end) {
      const { start, end } = period;
      switch (operator) {
        case Operator.GREATER_THAN:
        case Operator.STARTS_AFTER:
          compiled.range = { lower: { key: end, strict: true } };
          break;
        case Operator.GREATER_THAN_OR_EQUALS:
          compiled.range = { lower: { key: start, strict: false } };
          break;
        case Operator.LESS_THAN:
        case Operator.ENDS_BEFORE:
          compiled.range = { upper: { key: start, strict: true } };
          break;
        case Operator.LESS_THAN_OR_EQUALS:
          compiled.range = { upper: { key: end, strict: false } };
          break;
        case Operator.EQUALS:
        case Operator.APPROXIMATELY:
          compiled.range = { lower: { key: start, strict: true }, upper: { key: end, strict: true } };
          break;
        default:
          break;
      }
    }
    return compiled;
  }

  if (param.type !== 'token') {
    return generic;
  }
  const filterValues = splitSearchOnComma(filter.value);
  const matcher = tokenMatcher(filterValues);
  const tokenFilter = (visitTokens: (resource: Resource, visit: TokenVisitor) => boolean, candidates?: (index: TypeIndex) => Entry[]): CompiledFilter => ({
    evaluate: (entry) => visitTokens(entry.resource, matcher) !== negated,
    cheap: true,
    usesLastUpdated: false,
    candidates: negated ? undefined : candidates,
  });

  if (isExpression(type, param, 'meta.tag')) {
    return tokenFilter((r, visit) => visitCodings(r.meta?.tag, visit));
  }
  if (isExpression(type, param, 'meta.security')) {
    return tokenFilter((r, visit) => visitCodings(r.meta?.security, visit));
  }
  if (isExpression(type, param, 'id')) {
    const keys = tokenKeys(filterValues, false);
    return tokenFilter((r, visit) => visitToken(visit, undefined, r.id), keys && ((index) => keys.flatMap((key) => index.byId(key))));
  }
  const elements = identifierElements(type, param);
  if (elements) {
    const keys = elements.every((e) => (INDEXED_IDENTIFIER_ELEMENTS as readonly string[]).includes(e)) ? tokenKeys(filterValues, true) : undefined;
    return tokenFilter((r, visit) => visitIdentifiers(r, elements, visit), keys && ((index) => keys.flatMap((key) => index.byIdentifier(key))));
  }
  return generic;
}

/**
 * For an expression `T.a | T.b ...` whose paths are all top-level elements of type Identifier
 * (`Task.identifier`, `DocumentReference.masterIdentifier | DocumentReference.identifier`): the
 * element names. A union's matches are those of its parts, whatever its order and duplicates.
 */
function identifierElements(type: string, param: SearchParameter): string[] | undefined {
  const elements: string[] = [];
  for (const path of (param.expression ?? '').split('|').map((p) => p.trim())) {
    const m = /^([A-Za-z]+)\.([A-Za-z]+)$/.exec(path);
    if (m?.[1] !== type) {
      return undefined;
    }
    const element = getElementDefinition(type, m[2]);
    if (element?.type?.length !== 1 || element.type[0].code !== 'Identifier') {
      return undefined;
    }
    elements.push(m[2]);
  }
  return elements.length > 0 ? elements : undefined;
}

// ---------------------------------------------------------------------------------------------
// The index
// ---------------------------------------------------------------------------------------------

export class SearchIndex {
  private constructor(private readonly types: ObservedTypes) {}

  /**
   * Attaches an index to a MemoryRepository by replacing its internal `resources` map (see the
   * header). Returns undefined, leaving the repository untouched, if the internals are not the
   * expected Map<type, Map<id, Resource>>.
   */
  static attach(repo: object): SearchIndex | undefined {
    const internals = repo as { resources?: unknown };
    const current = internals.resources;
    if (!(current instanceof Map)) {
      return undefined;
    }
    for (const byId of current.values()) {
      if (!(byId instanceof Map)) {
        return undefined;
      }
    }
    const types = new ObservedTypes();
    for (const [type, byId] of current as Map<string, Map<string, Resource>>) {
      types.set(type, byId);
    }
    internals.resources = types;
    return new SearchIndex(types);
  }

  /**
   * MemoryRepository.search's result for `request` (without _include/_revinclude), or undefined
   * when the index cannot produce it identically.
   */
  search<T extends Resource>(request: SearchRequest<T>): Bundle<WithId<T>> | undefined {
    const type = request.resourceType;
    if (request.include?.length || request.revInclude?.length) {
      return undefined;
    }
    const filters = request.filters ?? [];
    if (filters.some((f) => f.code.includes('.') || f.code.startsWith('_has:'))) {
      return undefined;
    }
    let descending: boolean | undefined;
    const rules = request.sortRules ?? [];
    if (rules.length > 1) {
      return undefined;
    }
    if (rules.length === 1) {
      if (!isLastUpdatedParam(type, rules[0].code)) {
        return undefined;
      }
      descending = rules[0].descending === true;
    }
    const compiled: CompiledFilter[] = [];
    for (const filter of filters) {
      const c = compileFilter(type, filter);
      if (!c) {
        return undefined;
      }
      compiled.push(c);
    }
    const index = (this.types.get(type) as ObservedResources | undefined)?.index ?? new TypeIndex();
    if (index.odd > 0 && (descending !== undefined || compiled.some((c) => c.usesLastUpdated))) {
      return undefined;
    }

    const matches = this.match(index, compiled, descending !== undefined);
    let ordered = descending ? descendingOrder(matches) : matches;
    const total = ordered.length;
    if (request.offset !== undefined) {
      ordered = ordered.slice(request.offset);
    }
    if (request.count !== undefined) {
      ordered = ordered.slice(0, request.count);
    }
    const entry = ordered.map((e): BundleEntry<WithId<T>> => ({ search: { mode: 'match' }, resource: deepClone(e.resource) as WithId<T> }));
    return { resourceType: 'Bundle', type: 'searchset', entry: entry.length ? entry : undefined, total };
  }

  /** Matching entries, in (lastUpdated, store) order when `byLastUpdated`, else in store order. */
  private match(index: TypeIndex, filters: CompiledFilter[], byLastUpdated: boolean): Entry[] {
    // Narrowest source of candidates: a key lookup, a lastUpdated range, or everything.
    let keyed: Entry[] | undefined;
    for (const f of filters) {
      const found = f.candidates?.(index);
      if (found && (!keyed || found.length < keyed.length)) {
        keyed = found;
      }
    }
    let lo = 0;
    let hi = index.sorted.length;
    let ranged = false;
    for (const f of filters) {
      if (f.range?.lower) {
        lo = Math.max(lo, index.bound(f.range.lower.key, f.range.lower.strict));
        ranged = true;
      }
      if (f.range?.upper) {
        hi = Math.min(hi, index.bound(f.range.upper.key, !f.range.upper.strict));
        ranged = true;
      }
    }
    const ordered = [...filters.filter((f) => f.cheap), ...filters.filter((f) => !f.cheap)];
    const accept = (entry: Entry): boolean => ordered.every((f) => f.evaluate(entry));

    let out: Entry[];
    if (keyed && (!ranged || keyed.length <= hi - lo)) {
      const seen = new Set<Entry>();
      out = keyed.filter((e) => !seen.has(e) && seen.add(e) && accept(e));
      out.sort(byLastUpdated ? compareEntries : (a, b) => a.seq - b.seq);
    } else if (ranged || byLastUpdated) {
      out = [];
      for (let i = lo; i < hi; i++) {
        if (accept(index.sorted[i])) {
          out.push(index.sorted[i]);
        }
      }
      if (!byLastUpdated) {
        out.sort((a, b) => a.seq - b.seq);
      }
    } else {
      out = [];
      for (const entry of index.entries.values()) {
        if (accept(entry)) {
          out.push(entry);
        }
      }
    }
    return out;
  }
}

/**
 * (lastUpdated, seq) ascending -> lastUpdated descending with ties still in store order: what the
 * scan's stable sort with a reversed comparator gives.
 */
function descendingOrder(ascending: Entry[]): Entry[] {
  const out: Entry[] = [];
  let end = ascending.length;
  while (end > 0) {
    let start = end - 1;
    const key = ascending[start].lastUpdated;
    while (start > 0 && ascending[start - 1].lastUpdated === key) {
      start--;
    }
    for (let i = start; i < end; i++) {
      out.push(ascending[i]);
    }
    end = start;
  }
  return out;
}
