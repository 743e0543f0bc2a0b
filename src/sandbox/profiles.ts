// Server profiles for the FHIR sandbox: sets of traits that make it behave like a real FHIR server
// (Medplum 4.5.2, HAPI) on the points a gateway depends on. `default` is the sandbox as it always was.
// What each trait does, and the real server's behaviour it reproduces: docs/sandbox-profiles.md.

export type SandboxProfileName = 'default' | 'medplum' | 'hapi' | 'strict';

export interface SandboxTraits {
  /**
   * Largest JSON request body in bytes (bundles included); larger → 400 OperationOutcome, issue code
   * 'invalid', text 'File too large' (like Medplum). undefined = 50 MB as before (413 when exceeded).
   * Raw (non-JSON) Binary bodies are never subject to it.
   */
  maxJsonBytes?: number;
  /**
   * `Prefer: return=minimal` on any write (create, update, patch, delete, transaction, batch) → the usual
   * status with an EMPTY body (no Bundle, no resource), like Medplum. Error responses keep their
   * OperationOutcome.
   */
  emptyMinimal: boolean;
  /**
   * A transaction whose entry fails is NOT rolled back: 200 transaction-response where the failing entry
   * carries its own status + outcome, and the other entries are written and answered normally.
   * Placeholders of the failed entry are still rewritten in the other entries (so a Task can end up
   * pointing at ServiceRequest/<id> that was never stored), as Medplum does without transaction-bundles.
   */
  nonAtomic: boolean;
  /**
   * Atomic mode only: a transaction that contains any conditional entry (ifNoneExist, conditional
   * update/delete) and more than this many entries → 400 "Transaction requires strict isolation but has
   * too many entries" (Medplum with Project.features transaction-bundles: 8). undefined = no limit.
   */
  strictIsolationMaxEntries?: number;
  /**
   * A transaction that starts while another transaction request is in flight (received, not yet
   * answered) gets a 409 (issue code 'conflict', like a PostgreSQL serialization failure) on ONE entry:
   * the first entry that would create a new ServiceRequest if any, else the first new create. With
   * nonAtomic the other entries are kept; otherwise the whole transaction fails with 409. Transactions
   * are held in flight a few milliseconds (as if a database were behind them) so overlaps happen.
   */
  concurrentConflict: boolean;
  /**
   * Server-assigned ids are UUIDs; a client-supplied id that is not a UUID → 400 "Invalid id"; a PUT to
   * an id that does not exist → 404 (no update-as-create). POST ignores any id in the body.
   */
  uuidIdsOnly: boolean;
  /**
   * PUT to an id that does not exist → 404 (update-as-create refused) even for UUIDs; a conditional PUT
   * that matches nothing may still create, but only without an id in the body.
   */
  noUpdateAsCreate: boolean;
  /**
   * Any search on Binary (GET/POST Binary?..., ifNoneExist or conditional update/delete on a Binary
   * entry inside a bundle) → 400 "Cannot search on Binary resource type".
   */
  noBinarySearch: boolean;
  /**
   * Attachment URLs `Binary/<id>` (relative or absolute under the base) in resources read from the
   * server (read, vread, history, search results, write and transaction responses with a
   * representation) are rewritten to presigned URLs on a SECOND loopback HTTP server:
   * `http://127.0.0.1:<storagePort>/storage/<id>/<versionId>?Expires=<unix>&Signature=<hmac>`. That
   * server answers the raw bytes with the Binary's contentType, refuses (400) any request carrying an
   * Authorization header, and refuses a bad or expired signature (403). The stored resource keeps
   * `Binary/<id>` (presigned URLs written back are turned into `Binary/<id>` again).
   */
  presignedBinaryUrls: boolean;
  /**
   * Purely numeric client-assigned ids refused (HAPI: 400 "HAPI-0960: Can not create resource with
   * ID[123], no resource with this ID exists and clients may only assign IDs which contain at least one
   * non-numeric character").
   */
  refuseNumericClientIds: boolean;
  /**
   * HAPI-style opaque paging: next/previous links are absolute
   * `<base>?_getpages=<token>&_getpagesoffset=<n>&_count=<n>&_bundletype=searchset`, and GET of the base
   * with _getpages answers that page.
   */
  opaquePagingLinks: boolean;
  /** If-Match with a stale version on update/patch/delete → 409 Conflict (HAPI's ResourceVersionConflictException) instead of 412. */
  versionConflictAs409: boolean;
}

const OFF: SandboxTraits = {
  maxJsonBytes: undefined,
  emptyMinimal: false,
  nonAtomic: false,
  strictIsolationMaxEntries: undefined,
  concurrentConflict: false,
  uuidIdsOnly: false,
  noUpdateAsCreate: false,
  noBinarySearch: false,
  presignedBinaryUrls: false,
  refuseNumericClientIds: false,
  opaquePagingLinks: false,
  versionConflictAs409: false,
};

const MEDPLUM: SandboxTraits = {
  ...OFF,
  maxJsonBytes: 1_048_576,
  emptyMinimal: true,
  nonAtomic: true,
  concurrentConflict: true,
  uuidIdsOnly: true,
  noUpdateAsCreate: true,
  noBinarySearch: true,
  presignedBinaryUrls: true,
};

const HAPI: SandboxTraits = {
  ...OFF,
  refuseNumericClientIds: true,
  opaquePagingLinks: true,
  versionConflictAs409: true,
};

export const SANDBOX_PROFILES: Record<SandboxProfileName, SandboxTraits> = {
  default: OFF,
  medplum: MEDPLUM,
  hapi: HAPI,
  strict: {
    ...MEDPLUM,
    nonAtomic: false,
    strictIsolationMaxEntries: 8,
    refuseNumericClientIds: true,
    opaquePagingLinks: true,
    versionConflictAs409: true,
  },
};
for (const traits of Object.values(SANDBOX_PROFILES)) {
  Object.freeze(traits);
}
Object.freeze(SANDBOX_PROFILES);

const TRAIT_NAMES = Object.keys(OFF) as (keyof SandboxTraits)[];
const NUMERIC_TRAITS: ReadonlySet<keyof SandboxTraits> = new Set(['maxJsonBytes', 'strictIsolationMaxEntries']);
const PROFILE_NAMES = Object.keys(SANDBOX_PROFILES) as SandboxProfileName[];

export function isSandboxProfileName(value: string): value is SandboxProfileName {
  return (PROFILE_NAMES as string[]).includes(value);
}

function traitName(raw: string): keyof SandboxTraits {
  const found = TRAIT_NAMES.find((name) => name.toLowerCase() === raw.toLowerCase());
  if (!found) {
    throw new Error(`Unknown sandbox trait "${raw}" (known: ${TRAIT_NAMES.join(', ')})`);
  }
  return found;
}

const BYTE_UNITS: Record<string, number> = { '': 1, b: 1, kb: 1024, k: 1024, mb: 1024 * 1024, m: 1024 * 1024, gb: 1024 ** 3, g: 1024 ** 3 };

function parseNumber(name: keyof SandboxTraits, raw: string): number | undefined {
  const value = raw.trim().toLowerCase();
  if (['', 'none', 'off', 'false', 'undefined', 'unlimited'].includes(value)) {
    return undefined;
  }
  const match = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/.exec(value.replace(/_/g, ''));
  const unit = match ? BYTE_UNITS[match[2]] : undefined;
  if (!match || unit === undefined || (name !== 'maxJsonBytes' && unit !== 1)) {
    throw new Error(
      `Invalid value "${raw}" for sandbox trait ${name} (expected a non-negative integer${name === 'maxJsonBytes' ? ', e.g. 1048576 or 1mb' : ''}, or "none")`
    );
  }
  const n = Math.floor(Number(match[1]) * unit);
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new Error(`Invalid value "${raw}" for sandbox trait ${name}`);
  }
  return n;
}

function parseBoolean(name: keyof SandboxTraits, raw: string): boolean {
  const value = raw.trim().toLowerCase();
  if (['true', '1', 'on', 'yes'].includes(value)) {
    return true;
  }
  if (['false', '0', 'off', 'no'].includes(value)) {
    return false;
  }
  throw new Error(`Invalid value "${raw}" for sandbox trait ${name} (expected true or false)`);
}

/**
 * Parses an overrides string: comma-separated `name=value`, `+name` (on), `-name` (off) or a bare `name`
 * (on). Numeric traits take an integer (maxJsonBytes also `1mb`, `512kb`) or `none` (unset).
 */
export function parseSandboxTraitOverrides(overrides: string): Partial<SandboxTraits> {
  const out: Partial<SandboxTraits> = {};
  const set = out as Record<string, unknown>;
  for (const token of overrides
    .split(',')
    .map((t) => t.trim())
    .filter(Boolean)) {
    const eq = token.indexOf('=');
    if (eq >= 0) {
      const name = traitName(token.slice(0, eq).trim());
      const raw = token.slice(eq + 1);
      set[name] = NUMERIC_TRAITS.has(name) ? parseNumber(name, raw) : parseBoolean(name, raw);
      continue;
    }
    const sign = token[0] === '+' || token[0] === '-' ? token[0] : '';
    const name = traitName(token.slice(sign.length).trim());
    if (NUMERIC_TRAITS.has(name)) {
      if (sign !== '-') {
        throw new Error(`Sandbox trait ${name} needs a value (${name}=<n>), or -${name} to unset it`);
      }
      set[name] = undefined;
    } else {
      set[name] = sign !== '-';
    }
  }
  return out;
}

function checkPartial(partial: Partial<SandboxTraits>): Partial<SandboxTraits> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(partial)) {
    const name = traitName(key);
    if (NUMERIC_TRAITS.has(name)) {
      if (value !== undefined && (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0)) {
        throw new Error(`Invalid value ${JSON.stringify(value)} for sandbox trait ${name} (expected a non-negative integer)`);
      }
    } else if (typeof value !== 'boolean') {
      throw new Error(`Invalid value ${JSON.stringify(value)} for sandbox trait ${name} (expected true or false)`);
    }
    out[name] = value;
  }
  return out as Partial<SandboxTraits>;
}

/**
 * The traits of `profile` (default 'default'; case-insensitive, surrounding spaces ignored) with
 * `overrides` applied: a string like "nonAtomic=false,strictIsolationMaxEntries=8,-emptyMinimal,
 * +noBinarySearch,maxJsonBytes=2000000" or an object of traits. Throws an Error with a clear message on
 * an unknown profile, trait or value.
 */
export function resolveSandboxTraits(profile?: string, overrides?: string | Partial<SandboxTraits>): SandboxTraits & { profile: SandboxProfileName } {
  const name = (profile ?? '').trim().toLowerCase() || 'default';
  if (!isSandboxProfileName(name)) {
    throw new Error(`Unknown sandbox profile "${profile}" (known: ${PROFILE_NAMES.join(', ')})`);
  }
  let applied: Partial<SandboxTraits> = {};
  if (typeof overrides === 'string') applied = parseSandboxTraitOverrides(overrides);
  else if (overrides !== undefined) applied = checkPartial(overrides);
  return { ...SANDBOX_PROFILES[name], ...applied, profile: name };
}

/** `trait=value` pairs of `traits` that differ from `profile`'s own (for logs). */
export function describeTraitOverrides(traits: SandboxTraits & { profile: SandboxProfileName }): string {
  const base = SANDBOX_PROFILES[traits.profile];
  return TRAIT_NAMES.filter((name) => traits[name] !== base[name])
    .map((name) => `${name}=${traits[name] ?? 'none'}`)
    .join(',');
}
