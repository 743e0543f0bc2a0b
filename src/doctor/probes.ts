// The doctor's probes: each sends a few requests with tagged, clearly named test resources and records
// what the server did (statuses, sizes, link shapes) as Facts. Nothing here judges: evaluate.ts turns
// Facts and a destination's settings into report lines. Probe data is never real patient data.
import { randomBytes, randomUUID } from 'node:crypto';
import type { Destination } from '../config';
import { createAuthProvider } from '../destinations';
import { fetchWithDeadline } from '../http';
import {
  BudgetExceeded,
  FHIR_JSON,
  type HttpAnswer,
  type ProbeHttp,
  type ResourceRef,
  bundleEntries,
  describeAnswer,
  describeError,
  etagVersion,
  is2xx,
  outcomeCodes,
  parseLocation,
  writtenRef,
} from './http';

export const DOCTOR_TAG_SYSTEM = 'https://referral-gateway.dev/fhir/CodeSystem/tags';
export const DOCTOR_TAG_CODE = 'referral-gateway-doctor';
export const DOCTOR_RUN_SYSTEM = 'https://referral-gateway.dev/fhir/CodeSystem/doctor-run';
export const DOCTOR_ID_SYSTEM = 'https://referral-gateway.dev/fhir/sid/doctor';

const KiB = 1024;
const MiB = 1024 * 1024;
export const DEFAULT_JSON_SIZES = [256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB];
export const DEFAULT_RAW_SIZES = [1 * MiB, 8 * MiB, 32 * MiB];
/** A conditional transaction this long is refused by Medplum projects with real transactions (more than 8 entries). */
export const STRICT_ISOLATION_ENTRIES = 9;

/** A probe that could not run: why (prerequisite missing, budget reached, network error). */
export interface NotRun {
  notRun: string;
  /** True when the probe itself failed (network error, timeout); false when it was skipped. */
  error: boolean;
}

export type Fact<T> = T | NotRun | undefined;

export function ran<T>(f: Fact<T>): f is T {
  return f !== undefined && !(typeof f === 'object' && f !== null && 'notRun' in f);
}

export interface Facts {
  /** Tags this run's probe resources (meta.tag DOCTOR_RUN_SYSTEM|runId) and prefixes their identifiers. */
  runId: string;
  baseUrl: string;
  https: boolean;
  loopback: boolean;
  /** GET metadata without credentials (and with them when the first answer was 401/403). */
  metadata: Fact<{
    status: number;
    withAuth: boolean;
    isCapabilityStatement: boolean;
    fhirVersion?: string;
    software?: string;
    declaresTransaction?: boolean;
    durationMs: number;
  }>;
  /** The metadata request failed without an HTTP answer. */
  unreachable?: { message: string; tlsCode?: string };
  clock: Fact<{ skewMs: number } | { noDate: true }>;
  token: Fact<{ ok: true; scopes?: string[]; requested?: string; expiresInS?: number } | { ok: false; message: string }>;
  /** The first authenticated request (the _lastUpdated search). */
  authStatus: Fact<number>;
  lastUpdated: Fact<{ withSort: number; withSortCodes: string[]; withoutSort?: number }>;
  transaction: Fact<{
    status: number;
    answer: string;
    isResponseBundle: boolean;
    entryStatuses: number[];
    /** Task.for read back as Patient/<id> (urn:uuid resolved), when the Task could be read. */
    referencesResolved?: boolean;
    fallbackCreate?: boolean;
  }>;
  atomicity: Fact<
    | { kind: 'atomic'; answer: string }
    | { kind: 'non-atomic'; answer: string; failedEntry: number; keptEntries: number }
    | { kind: 'written-despite-error'; answer: string }
    | { kind: 'not-provoked'; answer: string }
  >;
  conditional: Fact<{ firstAnswer: string; firstOk: boolean; secondAnswer: string; secondOk: boolean; matches: number }>;
  minimal: Fact<{ status: number; answer: string; body: 'empty' | 'bundle' | 'other' }>;
  strictIsolation: Fact<{ status: number; answer: string; refused: boolean; entries: number }>;
  concurrency: Fact<{ answers: string[]; conflict: boolean }>;
  binaryTagSearch: Fact<{ status: number; answer: string }>;
  /** JSON `PUT Binary/<new uuid>`. */
  updateAsCreate: Fact<{ status: number; answer: string }>;
  /** `PUT Binary/rg-<uuid>` (the gateway's form), as FHIR JSON and as raw bytes; `PUT Patient/<digits>`. */
  clientIdForm: Fact<{ json: { status: number; answer: string }; raw: { status: number; answer: string }; numeric: { status: number; answer: string } }>;
  jsonBody: Fact<{ tried: Array<{ size: number; accepted: boolean; answer: string }>; largestAccepted?: number; smallestRefused?: number }>;
  rawBinary: Fact<{
    tried: Array<{ size: number; accepted: boolean; answer: string }>;
    largestAccepted?: number;
    smallestRefused?: number;
    /** The first upload's id, when the server named it. */
    firstId?: string;
    contentType: string;
  }>;
  readBack: Fact<{
    anyAccept: { status: number; kind: 'raw' | 'json' | 'other'; contentType: string; identical: boolean };
    jsonAccept: { status: number; kind: 'raw' | 'json' | 'other'; identical: boolean };
  }>;
  attachment: Fact<{
    created: string;
    url?: string;
    where: 'relative' | 'under-base' | 'outside-base' | 'missing';
    origin?: string;
    sameHost?: boolean;
    fetch?: { status?: number; identical?: boolean; error?: string };
  }>;
  task: Fact<{ readStatus: number; readAnswer: string; versionId?: string; updateStatus?: number; updateAnswer?: string; newVersionId?: string }>;
  ifMatch: Fact<{ staleStatus: number; answer: string }>;
  paging: Fact<{
    total?: number;
    firstCount: number;
    next?: string;
    shape?: 'absolute' | 'relative' | 'outside-base';
    opaque?: boolean;
    follow?: { status: number; answer: string; distinct: boolean; count: number };
  }>;
  requests: number;
}

type ProbeKey = Exclude<keyof Facts, 'runId' | 'baseUrl' | 'https' | 'loopback' | 'unreachable' | 'requests'>;

export interface ProbeOptions {
  env: NodeJS.ProcessEnv;
  now: () => number;
  fetchImpl: typeof fetch;
  jsonSizes: number[];
  rawSizes: number[];
  /** Extra JSON sizes to try exactly when the ladder leaves them undecided (configured maxJsonBytes, profile defaults). */
  jsonCandidates: number[];
}

function notRun(reason: string, error = false): NotRun {
  return { notRun: reason, error };
}

function isLoopback(hostname: string): boolean {
  const h = hostname.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\./.test(h);
}

const TLS_CODES = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER|ERR_TLS|HOSTNAME|ALTNAME|SSL/;

/** Runs every probe against the destination; returns what was seen. The caller cleans up (cleanupProbes). */
export async function runProbes(dest: Destination, http: ProbeHttp, o: ProbeOptions): Promise<Facts> {
  const base = new URL(http.baseUrl);
  const runId = `doctor-${randomUUID().slice(0, 8)}`;
  const facts: Facts = {
    runId,
    baseUrl: http.baseUrl,
    https: base.protocol === 'https:',
    loopback: isLoopback(base.hostname),
    metadata: undefined,
    clock: undefined,
    token: undefined,
    authStatus: undefined,
    lastUpdated: undefined,
    transaction: undefined,
    atomicity: undefined,
    conditional: undefined,
    minimal: undefined,
    strictIsolation: undefined,
    concurrency: undefined,
    binaryTagSearch: undefined,
    updateAsCreate: undefined,
    clientIdForm: undefined,
    jsonBody: undefined,
    rawBinary: undefined,
    readBack: undefined,
    attachment: undefined,
    task: undefined,
    ifMatch: undefined,
    paging: undefined,
    requests: 0,
  };

  const meta = (): Record<string, unknown> => ({
    tag: [
      { system: DOCTOR_TAG_SYSTEM, code: DOCTOR_TAG_CODE, display: 'referral-gateway doctor probe (test data, deleted after the run)' },
      { system: DOCTOR_RUN_SYSTEM, code: runId },
    ],
  });
  const identifier = (key: string): Array<{ system: string; value: string }> => [{ system: DOCTOR_ID_SYSTEM, value: `${runId}-${key}` }];
  const patient = (key: string, id?: string): Record<string, unknown> => ({
    resourceType: 'Patient',
    ...(id ? { id } : {}),
    meta: meta(),
    identifier: identifier(key),
    active: false,
    name: [{ text: 'Doctor Probe', family: 'Probe', given: ['Doctor'] }],
  });
  const identifierQuery = (key: string): string => `identifier=${encodeURIComponent(`${DOCTOR_ID_SYSTEM}|${runId}-${key}`)}`;
  const runTagQuery = `_tag=${encodeURIComponent(`${DOCTOR_RUN_SYSTEM}|${runId}`)}`;
  const urn = (): string => `urn:uuid:${randomUUID()}`;
  const transaction = (entry: unknown[]): Record<string, unknown> => ({ resourceType: 'Bundle', type: 'transaction', entry });
  const post = (fullUrl: string, resource: Record<string, unknown>, ifNoneExist?: string): Record<string, unknown> => ({
    fullUrl,
    resource,
    request: { method: 'POST', url: String(resource.resourceType), ...(ifNoneExist ? { ifNoneExist } : {}) },
  });
  const postBundle = (bundle: unknown, headers: Record<string, string> = {}): Promise<HttpAnswer> => http.sendJson('POST', http.baseUrl, bundle, headers);
  const trackEntries = (res: HttpAnswer): void => {
    for (const e of bundleEntries(res.json) ?? []) {
      if (is2xx(e.status) && e.ref) http.track({ type: e.ref.type, id: e.ref.id });
    }
  };
  /** Finds this run's resources of `type` by an identifier key and tracks them; returns how many match. */
  const findByIdentifier = async (type: string, key: string): Promise<number> => {
    const res = await http.get(`${type}?${identifierQuery(key)}&_count=20`);
    const entries = searchEntries(res.json);
    for (const r of entries) http.track({ type: r.type, id: r.id });
    return is2xx(res.status) ? entries.length : 0;
  };

  /** Runs one probe; a failed request becomes a NotRun with its reason (no bodies in messages). */
  async function probe<K extends ProbeKey>(key: K, fn: () => Promise<Exclude<Facts[K], NotRun | undefined>>): Promise<void> {
    const set = (v: unknown): void => {
      (facts as unknown as Record<string, unknown>)[key] = v;
    };
    try {
      set(await fn());
    } catch (err) {
      set(notRun(err instanceof BudgetExceeded ? 'not run: request budget reached' : `probe failed: ${describeError(err)}`, !(err instanceof BudgetExceeded)));
    }
  }

  // --- reachable, TLS, metadata, FHIR version, clock ------------------------------------------------
  try {
    let res = await http.send('GET', 'metadata', { headers: { Accept: FHIR_JSON }, auth: false });
    const localAt = o.now() - res.durationMs / 2;
    let withAuth = false;
    if ((res.status === 401 || res.status === 403) && dest.auth.type !== 'none') {
      try {
        res = await http.get('metadata');
        withAuth = true;
      } catch {
        // keep the unauthenticated answer; the auth line reports token problems
      }
    }
    const cs = res.json;
    const isCs = cs?.resourceType === 'CapabilityStatement';
    const software = isCs && cs.software && typeof cs.software === 'object' ? (cs.software as { name?: unknown; version?: unknown }) : undefined;
    const rest = isCs && Array.isArray(cs.rest) ? (cs.rest as Array<{ interaction?: Array<{ code?: unknown }> }>) : [];
    facts.metadata = {
      status: res.status,
      withAuth,
      isCapabilityStatement: isCs,
      fhirVersion: isCs && typeof cs.fhirVersion === 'string' ? cs.fhirVersion : undefined,
      software:
        software && typeof software.name === 'string'
          ? `${software.name}${typeof software.version === 'string' ? ` ${software.version}` : ''}`.slice(0, 100)
          : undefined,
      declaresTransaction: isCs ? rest.some((r) => (r.interaction ?? []).some((i) => i?.code === 'transaction')) : undefined,
      durationMs: res.durationMs,
    };
    const date = res.headers.get('date');
    const serverMs = date ? Date.parse(date) : Number.NaN;
    facts.clock = Number.isFinite(serverMs) ? { skewMs: serverMs - localAt } : { noDate: true };
  } catch (err) {
    const message = describeError(err);
    const code = /\(([A-Z0-9_]+)\)\s*$/.exec(message)?.[1];
    facts.unreachable = { message, tlsCode: code && TLS_CODES.test(code) ? code : undefined };
    const skip = notRun('not run: the server did not answer');
    for (const key of Object.keys(facts) as Array<keyof Facts>) {
      if ((facts as unknown as Record<string, unknown>)[key] === undefined && key !== 'unreachable' && key !== 'runId') {
        (facts as unknown as Record<string, unknown>)[key] = skip;
      }
    }
    facts.requests = http.requests;
    return facts;
  }

  // --- auth: token (client-credentials / smart-backend), then the first authenticated request ----------
  if (dest.auth.type === 'client-credentials' || dest.auth.type === 'smart-backend') {
    const requested = dest.auth.scope;
    let granted: { scope?: string; expiresIn?: number } = {};
    const spy: typeof fetch = async (input, init) => {
      const res = await o.fetchImpl(input, init);
      try {
        const body = (await res.clone().json()) as { scope?: unknown; expires_in?: unknown };
        granted = {
          scope: typeof body.scope === 'string' ? body.scope : undefined,
          expiresIn: Number.isFinite(Number(body.expires_in)) ? Number(body.expires_in) : undefined,
        };
      } catch {
        // not JSON: the provider reports it
      }
      return res;
    };
    try {
      const provider = createAuthProvider(dest.auth, o.env, spy, { timeoutMs: dest.timeoutMs });
      await provider.getHeaders(); // the header (the token) is dropped at once
      facts.token = {
        ok: true,
        scopes: granted.scope ? granted.scope.split(/\s+/).filter(Boolean) : undefined,
        requested,
        expiresInS: granted.expiresIn,
      };
    } catch (err) {
      facts.token = { ok: false, message: (err as Error).message.split('\n')[0].slice(0, 200) };
    }
  }
  if (ran(facts.token) && !facts.token.ok) {
    return skipRest(facts, http, 'not run: no access token');
  }

  await probe('lastUpdated', async () => {
    const since = new Date(o.now() - 3600_000).toISOString();
    const q = `${runTagQuery}&_lastUpdated=${encodeURIComponent(`gt${since}`)}&_count=1`;
    const withSort = await http.get(`Task?${q}&_sort=_lastUpdated`);
    facts.authStatus = withSort.status;
    if (is2xx(withSort.status) || withSort.status === 401 || withSort.status === 403) {
      return { withSort: withSort.status, withSortCodes: outcomeCodes(withSort.json) };
    }
    const without = await http.get(`Task?${q}`);
    return { withSort: withSort.status, withSortCodes: outcomeCodes(withSort.json), withoutSort: without.status };
  });
  if (facts.authStatus === undefined && !ran(facts.lastUpdated)) {
    facts.authStatus = notRun((facts.lastUpdated as NotRun | undefined)?.notRun ?? 'not run', true);
  }
  if (facts.authStatus === 401 || facts.authStatus === 403) {
    return skipRest(facts, http, `not run: the server refused the credentials (HTTP ${facts.authStatus})`);
  }

  // --- transaction with urn:uuid references (Patient + Task) ----------------------------------------------
  let patientA: ResourceRef | undefined;
  let task: ResourceRef | undefined;
  await probe('transaction', async () => {
    const pUrn = urn();
    const taskBody = {
      resourceType: 'Task',
      meta: meta(),
      identifier: identifier('task'),
      status: 'requested',
      intent: 'order',
      code: { coding: [{ system: 'http://hl7.org/fhir/CodeSystem/task-code', code: 'fulfill' }] },
      description: 'referral-gateway doctor probe (test data)',
      authoredOn: new Date(o.now()).toISOString(),
    };
    const res = await postBundle(transaction([post(pUrn, patient('a')), post(urn(), { ...taskBody, for: { reference: pUrn } })]));
    const entries = bundleEntries(res.json);
    trackEntries(res);
    patientA = entries?.[0] && is2xx(entries[0].status) ? entries[0].ref : undefined;
    task = entries?.[1] && is2xx(entries[1].status) ? entries[1].ref : undefined;
    const out = {
      status: res.status,
      answer: describeAnswer(res),
      isResponseBundle: res.json?.resourceType === 'Bundle' && res.json.type === 'transaction-response',
      entryStatuses: entries?.map((e) => e.status) ?? [],
      fallbackCreate: false,
    };
    if (!is2xx(res.status) || !task) {
      // Still get a Task for the Task line: plain creates.
      const p = await http.sendJson('POST', 'Patient', patient('a'));
      patientA = is2xx(p.status) ? writtenRef(p, 'Patient') : undefined;
      http.track(patientA);
      const t = await http.sendJson('POST', 'Task', patientA ? { ...taskBody, for: { reference: `Patient/${patientA.id}` } } : taskBody);
      task = is2xx(t.status) ? writtenRef(t, 'Task') : undefined;
      http.track(task);
      out.fallbackCreate = true;
    }
    return out;
  });

  // --- atomicity: a transaction with one entry that must fail (stale If-Match) ----------------------------
  await probe('atomicity', async () => {
    const target = patientA ?? { type: 'Patient', id: randomUUID() };
    const res = await postBundle(
      transaction([
        post(urn(), patient('atomic')),
        {
          fullUrl: `${http.baseUrl}/Patient/${target.id}`,
          resource: patient('a', target.id),
          request: { method: 'PUT', url: `Patient/${target.id}`, ifMatch: 'W/"999999"' },
        },
      ])
    );
    const answer = describeAnswer(res);
    const entries = bundleEntries(res.json);
    if (is2xx(res.status) && entries) {
      trackEntries(res);
      const failed = entries.findIndex((e) => !is2xx(e.status));
      if (failed >= 0) {
        return {
          kind: 'non-atomic' as const,
          answer: `${answer}, entry ${failed + 1} HTTP ${entries[failed].status}`,
          failedEntry: failed,
          keptEntries: entries.filter((e) => is2xx(e.status)).length,
        };
      }
      return { kind: 'not-provoked' as const, answer };
    }
    if (is2xx(res.status)) {
      // 2xx without a readable Bundle: look for what was written
      const n = await findByIdentifier('Patient', 'atomic');
      return n > 0 ? { kind: 'non-atomic' as const, answer, failedEntry: 1, keptEntries: n } : { kind: 'not-provoked' as const, answer };
    }
    const n = await findByIdentifier('Patient', 'atomic');
    return n > 0 ? { kind: 'written-despite-error' as const, answer } : { kind: 'atomic' as const, answer };
  });

  // --- conditional create (ifNoneExist) and Prefer: return=minimal on its resend --------------------------
  await probe('conditional', async () => {
    const bundle = (): Record<string, unknown> => transaction([post(urn(), patient('conditional'), `Patient?${identifierQuery('conditional')}`)]);
    const first = await postBundle(bundle());
    trackEntries(first);
    const firstEntries = bundleEntries(first.json);
    const firstOk = is2xx(first.status) && (firstEntries ?? []).every((e) => is2xx(e.status));
    let second: HttpAnswer | undefined;
    try {
      second = await postBundle(bundle(), { Prefer: 'return=minimal' });
      facts.minimal = {
        status: second.status,
        answer: describeAnswer(second),
        body: minimalBody(second),
      };
      trackEntries(second);
    } catch (err) {
      facts.minimal = notRun(`probe failed: ${describeError(err)}`, !(err instanceof BudgetExceeded));
    }
    const secondEntries = second ? bundleEntries(second.json) : undefined;
    const secondOk = second !== undefined && is2xx(second.status) && (secondEntries ?? []).every((e) => is2xx(e.status));
    const matches = await findByIdentifier('Patient', 'conditional');
    return { firstAnswer: describeAnswer(first), firstOk, secondAnswer: second ? describeAnswer(second) : 'not sent', secondOk, matches };
  });
  if (facts.minimal === undefined) facts.minimal = notRun('not run: the conditional-create probe failed', true);

  // --- strict isolation: a conditional transaction of 9 entries --------------------------------------------
  await probe('strictIsolation', async () => {
    const entries = Array.from({ length: STRICT_ISOLATION_ENTRIES }, (_, i) =>
      post(urn(), patient(`isolation-${i + 1}`), `Patient?${identifierQuery(`isolation-${i + 1}`)}`)
    );
    const res = await postBundle(transaction(entries));
    trackEntries(res);
    if (is2xx(res.status) && !bundleEntries(res.json)) {
      for (let i = 1; i <= STRICT_ISOLATION_ENTRIES && i <= 2; i++) await findByIdentifier('Patient', `isolation-${i}`);
    }
    return { status: res.status, answer: describeAnswer(res), refused: !is2xx(res.status), entries: STRICT_ISOLATION_ENTRIES };
  });

  // --- two transactions at once ------------------------------------------------------------------------------
  await probe('concurrency', async () => {
    const results = await Promise.all([1, 2].map((i) => postBundle(transaction([post(urn(), patient(`concurrent-${i}`))]))));
    let conflict = false;
    const answers: string[] = [];
    for (const res of results) {
      trackEntries(res);
      const entries = bundleEntries(res.json) ?? [];
      const bad = entries.find((e) => !is2xx(e.status));
      if (res.status === 409 || bad?.status === 409) conflict = true;
      answers.push(bad && is2xx(res.status) ? `${describeAnswer(res)} with an entry HTTP ${bad.status}` : describeAnswer(res));
    }
    return { answers, conflict };
  });

  // --- _tag search on Binary -------------------------------------------------------------------------------
  await probe('binaryTagSearch', async () => {
    const res = await http.get(`Binary?_tag=${encodeURIComponent(`${DOCTOR_TAG_SYSTEM}|${DOCTOR_TAG_CODE}`)}&_count=1`);
    return { status: res.status, answer: describeAnswer(res) };
  });

  // --- client-assigned ids ------------------------------------------------------------------------------------
  const smallBinary = (id?: string): Record<string, unknown> => ({
    resourceType: 'Binary',
    ...(id ? { id } : {}),
    meta: meta(),
    contentType: 'text/plain',
    data: Buffer.from('referral-gateway doctor probe (test data)').toString('base64'),
  });
  await probe('updateAsCreate', async () => {
    const id = randomUUID();
    const res = await http.sendJson('PUT', `Binary/${id}`, smallBinary(id));
    if (is2xx(res.status)) http.track({ type: 'Binary', id });
    return { status: res.status, answer: describeAnswer(res) };
  });
  await probe('clientIdForm', async () => {
    const jsonId = `rg-${randomUUID()}`;
    const json = await http.sendJson('PUT', `Binary/${jsonId}`, smallBinary(jsonId));
    if (is2xx(json.status)) http.track({ type: 'Binary', id: jsonId });
    const rawId = `rg-${randomUUID()}`;
    const raw = await http.send('PUT', `Binary/${rawId}`, {
      headers: { 'Content-Type': 'text/plain', Accept: FHIR_JSON },
      body: Buffer.from('referral-gateway doctor probe (test data)'),
    });
    if (is2xx(raw.status)) http.track({ type: 'Binary', id: rawId });
    const numericId = String(9_000_000_000 + Math.floor(Math.random() * 999_999_999));
    const numeric = await http.sendJson('PUT', `Patient/${numericId}`, patient('numeric-id', numericId));
    if (is2xx(numeric.status)) http.track({ type: 'Patient', id: numericId });
    return {
      json: { status: json.status, answer: describeAnswer(json) },
      raw: { status: raw.status, answer: describeAnswer(raw) },
      numeric: { status: numeric.status, answer: describeAnswer(numeric) },
    };
  });

  // --- largest JSON body (a transaction holding one Binary, padded to the exact size) ----------------------
  await probe('jsonBody', async () => {
    const tried: Array<{ size: number; accepted: boolean; answer: string }> = [];
    const bounds = (): { lo: number; hi?: number } => ({
      lo: Math.max(0, ...tried.filter((t) => t.accepted).map((t) => t.size)),
      hi: tried.some((t) => !t.accepted) ? Math.min(...tried.filter((t) => !t.accepted).map((t) => t.size)) : undefined,
    });
    const attempt = async (size: number): Promise<boolean> => {
      const body = sizedTransaction(size, meta());
      let accepted = false;
      let answer: string;
      try {
        const res = await http.send('POST', http.baseUrl, {
          headers: { 'Content-Type': FHIR_JSON, Accept: FHIR_JSON, Prefer: 'return=OperationOutcome' },
          body,
        });
        const entries = bundleEntries(res.json);
        accepted = is2xx(res.status) && (entries === undefined || entries.every((e) => is2xx(e.status)));
        answer = describeAnswer(res);
        trackEntries(res);
        if (is2xx(res.status) && !entries) http.untracked.push(`Binary of ${size} bytes (the answer named no id)`);
      } catch (err) {
        if (err instanceof BudgetExceeded) throw err; // a timeout or reset counts as a refusal of this size
        answer = describeError(err); // a reset connection is how some servers refuse a large body
      }
      tried.push({ size, accepted, answer });
      return accepted;
    };
    for (const size of o.jsonSizes) {
      if (!(await attempt(size))) break;
    }
    for (const size of o.jsonCandidates) {
      const { lo, hi } = bounds();
      if (hi !== undefined && size > lo && size < hi) await attempt(size);
    }
    for (let step = 0; step < 2; step++) {
      const { lo, hi } = bounds();
      if (hi === undefined || (lo > 0 && hi / lo < 1.25)) break;
      const mid = lo > 0 ? Math.round(Math.sqrt(lo * hi)) : Math.round(hi / 4);
      if (mid < 1024) break;
      await attempt(mid);
    }
    const { lo, hi } = bounds();
    return { tried, largestAccepted: lo > 0 ? lo : undefined, smallestRefused: hi };
  });

  // --- largest raw Binary, and the first one read back -------------------------------------------------------
  const rawContentType = 'application/pdf';
  let firstRaw: { id: string; bytes: Buffer } | undefined;
  await probe('rawBinary', async () => {
    const tried: Array<{ size: number; accepted: boolean; answer: string }> = [];
    let firstId: string | undefined;
    const chunk = randomBytes(Math.min(MiB, Math.max(1, ...o.rawSizes)));
    for (const size of o.rawSizes) {
      const bytes = repeatTo(chunk, size);
      let accepted = false;
      let answer: string;
      try {
        const res = await http.send('POST', 'Binary', { headers: { 'Content-Type': rawContentType, Accept: FHIR_JSON }, body: bytes });
        accepted = is2xx(res.status);
        answer = describeAnswer(res);
        if (accepted) {
          const ref = writtenRef(res, 'Binary');
          if (ref) http.track(ref);
          else http.untracked.push(`Binary of ${size} bytes (the answer named no id)`);
          if (!firstRaw && ref) {
            firstRaw = { id: ref.id, bytes };
            firstId = ref.id;
          }
        }
      } catch (err) {
        if (err instanceof BudgetExceeded) throw err; // a timeout or reset counts as a refusal of this size
        answer = describeError(err);
      }
      tried.push({ size, accepted, answer });
      if (!accepted) break;
    }
    const acc = tried.filter((t) => t.accepted).map((t) => t.size);
    const ref = tried.find((t) => !t.accepted);
    return { tried, largestAccepted: acc.length ? Math.max(...acc) : undefined, smallestRefused: ref?.size, firstId, contentType: rawContentType };
  });

  if (firstRaw) {
    const uploaded = firstRaw;
    await probe('readBack', async () => {
      const any = await http.get(`Binary/${uploaded.id}`, '*/*');
      const json = await http.get(`Binary/${uploaded.id}`, FHIR_JSON);
      const judge = (res: HttpAnswer): { kind: 'raw' | 'json' | 'other'; identical: boolean } => {
        if (!is2xx(res.status)) return { kind: 'other', identical: false };
        if (res.json?.resourceType === 'Binary') {
          const data = typeof res.json.data === 'string' ? Buffer.from(res.json.data, 'base64') : undefined;
          return { kind: 'json', identical: data !== undefined && data.equals(uploaded.bytes) };
        }
        return { kind: 'raw', identical: res.body.equals(uploaded.bytes) };
      };
      const a = judge(any);
      const j = judge(json);
      return {
        anyAccept: { status: any.status, ...a, contentType: (any.headers.get('content-type') ?? 'none').split(';')[0].trim().slice(0, 80) },
        jsonAccept: { status: json.status, ...j },
      };
    });

    // --- attachment URLs: a DocumentReference pointing at Binary/<id>, read back ---------------------------
    await probe('attachment', async () => {
      const created = await http.sendJson('POST', 'DocumentReference', {
        resourceType: 'DocumentReference',
        meta: meta(),
        identifier: identifier('document'),
        status: 'current',
        description: 'referral-gateway doctor probe (test data)',
        content: [{ attachment: { contentType: rawContentType, url: `Binary/${uploaded.id}`, size: uploaded.bytes.length, title: 'Doctor probe attachment' } }],
      });
      const ref = is2xx(created.status) ? writtenRef(created, 'DocumentReference') : undefined;
      if (!ref) {
        if (is2xx(created.status)) http.untracked.push('DocumentReference (the answer named no id)');
        return { created: describeAnswer(created), where: 'missing' as const };
      }
      http.track(ref);
      const read = await http.get(`DocumentReference/${ref.id}`);
      const content = (read.json?.content as Array<{ attachment?: { url?: unknown } }> | undefined) ?? [];
      const url = typeof content[0]?.attachment?.url === 'string' ? content[0].attachment.url : undefined;
      if (!is2xx(read.status) || url === undefined) {
        return { created: `${describeAnswer(created)}; read ${describeAnswer(read)}`, where: 'missing' as const };
      }
      const where = classifyUrl(url, http.baseUrl);
      if (where !== 'outside-base') return { created: describeAnswer(created), url: shortUrl(url), where };
      const u = new URL(url);
      const out = { created: describeAnswer(created), url: shortUrl(url), where, origin: u.origin, sameHost: u.hostname === base.hostname } as const;
      try {
        http.requests++;
        // Presigned URLs carry their own signature: fetched WITHOUT the gateway's credentials.
        const res = await fetchWithDeadline(o.fetchImpl, url, { method: 'GET', headers: { Accept: '*/*' }, redirect: 'manual' }, dest.timeoutMs);
        const bytes = Buffer.from(res.bytes);
        return { ...out, fetch: { status: res.status, identical: is2xx(res.status) && bytes.equals(uploaded.bytes) } };
      } catch (err) {
        return {
          ...out,
          fetch: { error: (err as Error).name === 'DeadlineExceeded' ? `no answer within ${dest.timeoutMs} ms` : `network error (${errorCodeOf(err)})` },
        };
      }
    });
  } else {
    const why = notRun('not run: no raw Binary was stored');
    facts.readBack = why;
    facts.attachment = why;
  }

  // --- Task read and update (If-Match), then a stale If-Match ------------------------------------------------
  if (task) {
    const t = task;
    await probe('task', async () => {
      const read = await http.get(`Task/${t.id}`);
      const resource = read.json;
      const versionId = etagVersion(read.headers.get('etag')) ?? ((resource?.meta as { versionId?: unknown } | undefined)?.versionId as string | undefined);
      if (ran(facts.transaction) && !facts.transaction.fallbackCreate && resource?.resourceType === 'Task') {
        const forRef = (resource.for as { reference?: unknown } | undefined)?.reference;
        facts.transaction.referencesResolved = typeof forRef === 'string' && /(^|\/)Patient\/[A-Za-z0-9\-.]{1,64}$/.test(forRef);
      }
      if (!is2xx(read.status) || resource?.resourceType !== 'Task') {
        return { readStatus: read.status, readAnswer: describeAnswer(read), versionId };
      }
      const updated = { ...resource, status: 'cancelled' };
      const headers: Record<string, string> = { Prefer: 'return=representation' };
      if (versionId) headers['If-Match'] = `W/"${versionId}"`;
      const upd = await http.sendJson('PUT', `Task/${t.id}`, updated, headers);
      const newVersionId = etagVersion(upd.headers.get('etag')) ?? ((upd.json?.meta as { versionId?: unknown } | undefined)?.versionId as string | undefined);
      return {
        readStatus: read.status,
        readAnswer: describeAnswer(read),
        versionId,
        updateStatus: upd.status,
        updateAnswer: describeAnswer(upd),
        newVersionId,
      };
    });
    if (ran(facts.task) && facts.task.versionId && facts.task.updateStatus !== undefined && is2xx(facts.task.updateStatus)) {
      const stale = facts.task.versionId;
      await probe('ifMatch', async () => {
        const res = await http.sendJson(
          'PUT',
          `Task/${t.id}`,
          { resourceType: 'Task', id: t.id, meta: meta(), identifier: identifier('task'), status: 'cancelled', intent: 'order' },
          { 'If-Match': `W/"${stale}"` }
        );
        return { staleStatus: res.status, answer: describeAnswer(res) };
      });
    } else {
      facts.ifMatch = notRun(
        ran(facts.task) && !facts.task.versionId
          ? 'not run: the Task read named no version (no ETag, no meta.versionId)'
          : 'not run: the Task could not be updated'
      );
    }
  } else {
    const why = notRun('not run: no Task could be created');
    facts.task = why;
    facts.ifMatch = why;
  }

  // --- paging: _count=1 over this run's Patients, follow next ------------------------------------------------
  await probe('paging', async () => {
    const first = await http.get(`Patient?${runTagQuery}&_count=1`);
    const firstEntries = searchEntries(first.json);
    const total = typeof first.json?.total === 'number' ? first.json.total : undefined;
    const links = Array.isArray(first.json?.link) ? (first.json.link as Array<{ relation?: unknown; url?: unknown }>) : [];
    const next = links.find((l) => l.relation === 'next' && typeof l.url === 'string')?.url as string | undefined;
    const out: NonNullable<Exclude<Facts['paging'], NotRun>> = { total, firstCount: firstEntries.length };
    if (!is2xx(first.status)) return { ...out, follow: { status: first.status, answer: describeAnswer(first), distinct: false, count: 0 } };
    if (!next) return out;
    const where = classifyUrl(next, http.baseUrl);
    out.next = shortUrl(next);
    out.shape = where === 'under-base' ? 'absolute' : where;
    out.opaque = /[?&]_getpages=/.test(next) || !next.includes('_tag=');
    if (out.shape === 'outside-base') return out; // never sent: it would carry the credentials elsewhere
    const page = await http.get(next);
    const pageEntries = searchEntries(page.json);
    const firstIds = new Set(firstEntries.map((r) => r.id));
    out.follow = {
      status: page.status,
      answer: describeAnswer(page),
      count: pageEntries.length,
      distinct: pageEntries.length > 0 && pageEntries.every((r) => !firstIds.has(r.id)),
    };
    return out;
  });

  facts.requests = http.requests;
  return facts;
}

function skipRest(facts: Facts, http: ProbeHttp, reason: string): Facts {
  const skip = notRun(reason);
  for (const key of Object.keys(facts) as Array<keyof Facts>) {
    if ((facts as unknown as Record<string, unknown>)[key] === undefined && key !== 'unreachable') {
      (facts as unknown as Record<string, unknown>)[key] = skip;
    }
  }
  facts.requests = http.requests;
  return facts;
}

/** Resources of a searchset (matches and includes), by type and id. */
function searchEntries(json: Record<string, unknown> | undefined): ResourceRef[] {
  if (!json || json.resourceType !== 'Bundle' || !Array.isArray(json.entry)) return [];
  const out: ResourceRef[] = [];
  for (const e of json.entry as Array<{ resource?: { resourceType?: unknown; id?: unknown } }>) {
    const r = e?.resource;
    if (r && typeof r.resourceType === 'string' && r.resourceType !== 'OperationOutcome' && typeof r.id === 'string') {
      out.push({ type: r.resourceType, id: r.id });
    }
  }
  return out;
}

export function classifyUrl(url: string, baseUrl: string): 'relative' | 'under-base' | 'outside-base' {
  if (!/^[a-z][a-z0-9+.-]*:/i.test(url)) return 'relative';
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return 'outside-base';
  }
  const base = new URL(baseUrl);
  const basePath = base.pathname.replace(/\/+$/, '');
  return u.origin === base.origin && (basePath === '' || u.pathname === basePath || u.pathname.startsWith(basePath + '/')) ? 'under-base' : 'outside-base';
}

/** What a `Prefer: return=minimal` answer's body held. */
function minimalBody(answer: HttpAnswer): 'empty' | 'bundle' | 'other' {
  if (answer.body.length === 0) return 'empty';
  return answer.json?.resourceType === 'Bundle' ? 'bundle' : 'other';
}

/** A URL for the report without its query (presigned signatures, paging tokens). */
function shortUrl(url: string): string {
  try {
    const u = new URL(url);
    const first = u.pathname.split('/').filter(Boolean)[0];
    const more = u.pathname.split('/').filter(Boolean).length > 1 || u.search ? '/…' : '';
    return `${u.origin}/${first ?? ''}${more}`.slice(0, 120);
  } catch {
    return url.replace(/[?#].*$/, '').slice(0, 120);
  }
}

function errorCodeOf(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown } })?.cause;
  const code = cause?.code ?? (err as { code?: unknown })?.code;
  return typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code) ? code : ((err as Error)?.name ?? 'error');
}

function repeatTo(chunk: Buffer, size: number): Buffer {
  if (size <= chunk.length) return Buffer.from(chunk.subarray(0, size));
  const out = Buffer.allocUnsafe(size);
  for (let off = 0; off < size; off += chunk.length) chunk.copy(out, off, 0, Math.min(chunk.length, size - off));
  return out;
}

/** A transaction Bundle of exactly `size` bytes: one Binary whose base64 data fills it, then spaces. */
export function sizedTransaction(size: number, meta: Record<string, unknown>): string {
  const fullUrl = `urn:uuid:${randomUUID()}`;
  const marker = '\u0000DATA\u0000';
  const skeleton = JSON.stringify({
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl,
        resource: { resourceType: 'Binary', meta, contentType: 'application/octet-stream', data: marker },
        request: { method: 'POST', url: 'Binary' },
      },
    ],
  });
  const [head, tail] = skeleton.split(JSON.stringify(marker).slice(1, -1));
  const room = size - head.length - tail.length;
  const dataLength = Math.max(4, Math.floor(room / 4) * 4);
  const text = head + 'A'.repeat(dataLength) + tail;
  return text.length < size ? text + ' '.repeat(size - text.length) : text;
}

export const PROBE_HELPERS_FOR_TESTS = { isLoopback, parseLocation };
