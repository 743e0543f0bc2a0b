import { tmpdir } from 'node:os';
import path from 'node:path';
import type { z } from 'zod';
import { loadPrivateKey } from './secrets';
import { OWN_VARIABLES, destinationOptionVariable, destinationOptionVariables } from './destination-variables';
import { type Destination, destinationSchema, loadDestinationsFile } from './destinations';
import { type Env, type EnvName, envSchema } from './variables';

export { destinationOptionVariable, destinationOptionVariables } from './destination-variables';

export interface Config {
  nodeEnv: 'development' | 'production' | 'test';
  port: number;
  host: string;
  databaseUrl: string;
  /** Destinations from the file and FHIR_BASE_URL. Empty means the built-in sandbox is used. */
  destinations: Destination[];
  useSandbox: boolean;
  pollCron?: string;
  apiKeys: Map<string, string>;
  devKeys: boolean;
  adminApiKey?: string;
  webhookSecret?: string;
  /** Whether callbacks may go to loopback/private/link-local addresses (WEBHOOK_ALLOW_PRIVATE_NETWORKS; default: not in production). */
  webhookAllowPrivateNetworks: boolean;
  logLevel: string;
  maxBodyBytes: number;
  /** Request body bytes received, parsed and stored at once; more wait up to intakeWaitMs, then 503. */
  maxIntakeBytesInFlight: number;
  intakeWaitMs: number;
  /** Limits on what one request and one client may hold (issue 10: fair intake, slow clients, nesting). */
  intake: {
    /** MAX_JSON_DEPTH: deepest nesting of arrays and objects a body may have. */
    maxJsonDepth: number;
    /** INTAKE_CLIENT_SHARE: the fraction of maxIntakeBytesInFlight one client may hold while others wait. */
    clientShare: number;
    /** INTAKE_BODY_TIMEOUT_MS: from admission until the whole body has arrived; 408 after. */
    bodyTimeoutMs: number;
    headersTimeoutMs: number;
    requestTimeoutMs: number;
    /** MAX_CONNECTIONS_PER_ADDRESS: open connections one remote address may hold (0: no cap). */
    maxConnectionsPerAddress: number;
  };
  /** STORE_BUSY_WAIT_MS: how long a store call waits (asynchronously) for a locked database; STORE_PROBE_CACHE_MS: readiness write probe cache. */
  store: { busyWaitMs: number; probeCacheMs: number };
  /** CLIENT_IDENTIFIER_SYSTEMS: the patient identifier systems each client may send (a system listed for one client is refused from the others). */
  clientIdentifierSystems: Map<string, string[]>;
  delivery: { maxAttempts: number; maxAgeMs: number; baseDelayMs: number; maxDelayMs: number; concurrency: number };
  shutdownTimeoutMs: number;
  /** Streamed documents (issue 13): the blob store, the limits and the upload deadline. */
  documents: { blobStore: 'fs' | 'postgres'; blobDir: string; maxDocumentBytes: number; maxReferralBytes: number; uploadDeadlineMs: number };
  /** HL7 v2 over MLLP: the listener's port (undefined: off), which client each sending facility (MSH-4) is, the client of any other sender, the largest message. */
  hl7: {
    mllpPort?: number;
    mllpPortDefaulted: boolean;
    senders: Map<string, string>;
    listenerClient?: string;
    maxMessageBytes: number;
    /** HL7_RETURN_CHANNELS: the MLLP receiver each client's v2 referrals send their status changes back to. */
    returnChannels: Map<string, { host: string; port: number }>;
  };
  /** Closed referrals lose their inline document bytes after `documentDays` and are deleted after `referralDays` (0: never). */
  retention: { documentDays: number; referralDays: number; cron: string };
  /** The built-in sandbox's server profile and trait overrides (SANDBOX_PROFILE, SANDBOX_TRAITS). */
  sandbox: { profile: 'default' | 'medplum' | 'hapi' | 'strict'; traits?: string };
  /** The browser console (src/console): served or not, session idle and absolute lifetimes, refresh period, centre desk. */
  console: { enabled: boolean; sessionIdleMs: number; sessionMaxMs: number; refreshMs: number; centreDesk: boolean };
}

/**
 * A configuration the gateway cannot run with. `problems` holds every problem found, one line each naming its
 * variable; the message is those lines, so one bad value is still one line.
 */
export class ConfigError extends Error {
  readonly problems: string[];

  constructor(problems: string | string[]) {
    const list = typeof problems === 'string' ? [problems] : problems;
    super(list.join('\n'));
    this.problems = list;
  }
}

/** Values of these variables are never shown in an error. */
const SECRET_NAME = /KEY|SECRET|PASSWORD|TOKEN/;

/** The variables the FHIR_BASE_URL destination is built from: while one of them is bad, it is not built. */
const FHIR_VARIABLES: EnvName[] = [
  'FHIR_AUTH',
  'FHIR_TOKEN_URL',
  'FHIR_SCOPE',
  'FHIR_PRIVATE_KEY_FILE',
  'FHIR_JWT_ALG',
  'FHIR_JWT_KID',
  'FHIR_ORGANIZATION_SYSTEM',
  'FHIR_ORGANIZATION_VALUE',
  'FHIR_TIMEOUT_MS',
];

/**
 * Parses and checks the environment. Every bad value and every broken rule between values is reported at once:
 * one ConfigError listing them (`problems`), each one line naming the variable. A rule that needs a value which
 * is itself bad is not checked (that value is already reported).
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const cleaned = Object.fromEntries(Object.entries(env).filter((kv): kv is [string, string] => kv[1] !== undefined && kv[1] !== ''));
  const problems: string[] = [];
  const { e, failed } = parseEnv(cleaned, problems);
  const ok = (...names: EnvName[]): boolean => names.every((n) => !failed.has(n));
  const production = ok('NODE_ENV') && e.NODE_ENV === 'production';

  let destinations: Destination[] = [];
  // Whether the destinations are all known: if not, whether the sandbox would be used is not known either.
  let destinationsKnown = ok('FHIR_BASE_URL');
  try {
    destinations = loadDestinationsFile(e.DESTINATIONS_FILE);
  } catch (err) {
    problems.push((err as Error).message);
    destinationsKnown = false;
  }
  if (e.FHIR_BASE_URL) {
    const single = fhirBaseUrlDestination(e, cleaned, destinations, ok(...FHIR_VARIABLES), problems);
    if (single) destinations.push(single);
    else destinationsKnown = false;
  }
  for (const d of destinations) {
    checkSecretsPresent(d, cleaned, problems);
  }
  const useSandbox = destinations.length === 0;
  if (useSandbox && destinationsKnown && production) {
    problems.push('FHIR_BASE_URL (or DESTINATIONS_FILE) is required with NODE_ENV=production: the sandbox is for development only');
  }
  if (ok('BLOB_STORE', 'DATABASE_URL') && e.BLOB_STORE === 'postgres' && !e.DATABASE_URL.startsWith('postgres')) {
    problems.push('BLOB_STORE=postgres needs a postgres:// DATABASE_URL (the documents are kept in that database)');
  }
  if (ok('MAX_DOCUMENT_BYTES', 'MAX_REFERRAL_DOCUMENT_BYTES') && e.MAX_DOCUMENT_BYTES > e.MAX_REFERRAL_DOCUMENT_BYTES) {
    problems.push(
      `MAX_DOCUMENT_BYTES (${e.MAX_DOCUMENT_BYTES}) is more than MAX_REFERRAL_DOCUMENT_BYTES (${e.MAX_REFERRAL_DOCUMENT_BYTES}): one document could never fit`
    );
  }
  if (ok('DOCUMENT_RETENTION_DAYS', 'REFERRAL_RETENTION_DAYS') && e.REFERRAL_RETENTION_DAYS > 0 && e.DOCUMENT_RETENTION_DAYS > e.REFERRAL_RETENTION_DAYS) {
    problems.push(
      `DOCUMENT_RETENTION_DAYS (${e.DOCUMENT_RETENTION_DAYS}) is longer than REFERRAL_RETENTION_DAYS (${e.REFERRAL_RETENTION_DAYS}): referrals would be deleted with their documents first`
    );
  }
  // The client keys; undefined while they are not known (API_KEYS bad, or missing in production), so no rule about them is checked.
  let apiKeys = e.API_KEYS;
  let devKeys = false;
  if (!apiKeys && ok('API_KEYS', 'NODE_ENV')) {
    if (production) {
      problems.push('API_KEYS is required with NODE_ENV=production');
    } else {
      apiKeys = new Map([['dev', DEV_KEY]]);
      devKeys = true;
    }
  }
  if (production) {
    for (const [clientId, key] of apiKeys ?? []) {
      if (key === DEV_KEY) {
        problems.push(`API_KEYS gives client ${clientId} the development key, which production refuses`);
      } else if (key.length < MIN_PRODUCTION_KEY_LENGTH) {
        problems.push(`API_KEYS: the key of client ${clientId} is shorter than ${MIN_PRODUCTION_KEY_LENGTH} characters, which production refuses`);
      }
    }
    if (e.ADMIN_API_KEY !== undefined && e.ADMIN_API_KEY.length < MIN_PRODUCTION_KEY_LENGTH) {
      problems.push(`ADMIN_API_KEY is shorter than ${MIN_PRODUCTION_KEY_LENGTH} characters, which production refuses`);
    }
  }
  if (apiKeys && e.ADMIN_API_KEY !== undefined && [...apiKeys.values()].includes(e.ADMIN_API_KEY)) {
    problems.push('ADMIN_API_KEY is also a client key in API_KEYS: give the admin a key of its own');
  }
  if (ok('REQUEST_TIMEOUT_MS', 'INTAKE_BODY_TIMEOUT_MS') && e.REQUEST_TIMEOUT_MS < e.INTAKE_BODY_TIMEOUT_MS) {
    problems.push(
      `REQUEST_TIMEOUT_MS (${e.REQUEST_TIMEOUT_MS}) is shorter than INTAKE_BODY_TIMEOUT_MS (${e.INTAKE_BODY_TIMEOUT_MS}): bodies would be cut off before their deadline`
    );
  }
  const clientIdentifierSystems = parseClientIdentifierSystems(e.CLIENT_IDENTIFIER_SYSTEMS, problems);
  if (apiKeys) {
    for (const clientId of clientIdentifierSystems.keys()) {
      if (!apiKeys.has(clientId)) problems.push(`CLIENT_IDENTIFIER_SYSTEMS names client ${clientId}, which API_KEYS does not have`);
    }
  }
  const hl7Senders = e.HL7_MLLP_SENDERS ?? new Map<string, string>();
  let hl7Client = e.HL7_MLLP_CLIENT;
  if (apiKeys) {
    for (const [facility, clientId] of hl7Senders) {
      if (!apiKeys.has(clientId)) problems.push(`HL7_MLLP_SENDERS gives facility ${facility} client ${clientId}, which API_KEYS does not have`);
    }
    if (hl7Client !== undefined && !apiKeys.has(hl7Client)) problems.push(`HL7_MLLP_CLIENT names client ${hl7Client}, which API_KEYS does not have`);
    if (hl7Client === undefined && devKeys) hl7Client = 'dev';
    for (const clientId of e.HL7_RETURN_CHANNELS?.keys() ?? []) {
      if (!apiKeys.has(clientId)) problems.push(`HL7_RETURN_CHANNELS names client ${clientId}, which API_KEYS does not have`);
    }
  }
  if (production && ok('WEBHOOK_SECRET') && !e.WEBHOOK_SECRET) {
    problems.push('WEBHOOK_SECRET is required with NODE_ENV=production');
  }
  // With nothing reported every variable parsed, so `e` is whole and the keys are known.
  if (problems.length > 0 || !apiKeys) {
    throw new ConfigError([...new Set(problems)]);
  }
  return {
    nodeEnv: e.NODE_ENV,
    port: e.PORT,
    host: e.HOST ?? (e.NODE_ENV === 'production' ? '0.0.0.0' : '127.0.0.1'),
    databaseUrl: e.DATABASE_URL,
    destinations,
    useSandbox,
    pollCron: e.POLL_CRON,
    apiKeys,
    devKeys,
    adminApiKey: e.ADMIN_API_KEY,
    webhookSecret: e.WEBHOOK_SECRET,
    webhookAllowPrivateNetworks: e.WEBHOOK_ALLOW_PRIVATE_NETWORKS ? e.WEBHOOK_ALLOW_PRIVATE_NETWORKS === 'true' : e.NODE_ENV !== 'production',
    logLevel: e.LOG_LEVEL,
    maxBodyBytes: e.MAX_BODY_BYTES,
    maxIntakeBytesInFlight: e.MAX_INTAKE_BYTES_IN_FLIGHT,
    intakeWaitMs: e.INTAKE_WAIT_MS,
    intake: {
      maxJsonDepth: e.MAX_JSON_DEPTH,
      clientShare: e.INTAKE_CLIENT_SHARE,
      bodyTimeoutMs: e.INTAKE_BODY_TIMEOUT_MS,
      headersTimeoutMs: e.HEADERS_TIMEOUT_MS,
      requestTimeoutMs: e.REQUEST_TIMEOUT_MS,
      maxConnectionsPerAddress: e.MAX_CONNECTIONS_PER_ADDRESS,
    },
    store: { busyWaitMs: e.STORE_BUSY_WAIT_MS, probeCacheMs: e.STORE_PROBE_CACHE_MS },
    clientIdentifierSystems,
    delivery: {
      maxAttempts: e.DELIVERY_MAX_ATTEMPTS,
      maxAgeMs: e.DELIVERY_MAX_AGE_MS,
      baseDelayMs: e.DELIVERY_BASE_DELAY_MS,
      maxDelayMs: e.DELIVERY_MAX_DELAY_MS,
      concurrency: e.DELIVERY_CONCURRENCY,
    },
    shutdownTimeoutMs: e.SHUTDOWN_TIMEOUT_MS,
    documents: {
      blobStore: blobStoreFor(e.BLOB_STORE, e.DATABASE_URL),
      blobDir: e.BLOB_DIR ?? defaultBlobDir(e.DATABASE_URL),
      maxDocumentBytes: e.MAX_DOCUMENT_BYTES,
      maxReferralBytes: e.MAX_REFERRAL_DOCUMENT_BYTES,
      uploadDeadlineMs: e.UPLOAD_DEADLINE_HOURS * 3600 * 1000,
    },
    hl7: {
      mllpPort: e.HL7_MLLP_PORT ?? (e.NODE_ENV === 'development' ? 2575 : undefined),
      mllpPortDefaulted: e.HL7_MLLP_PORT === undefined,
      senders: hl7Senders,
      listenerClient: hl7Client,
      maxMessageBytes: e.HL7_MAX_MESSAGE_BYTES ?? e.MAX_BODY_BYTES,
      returnChannels: e.HL7_RETURN_CHANNELS ?? new Map(),
    },
    retention: { documentDays: e.DOCUMENT_RETENTION_DAYS, referralDays: e.REFERRAL_RETENTION_DAYS, cron: e.RETENTION_CRON },
    sandbox: { profile: e.SANDBOX_PROFILE, traits: e.SANDBOX_TRAITS },
    console: {
      enabled: e.CONSOLE_ENABLED ? e.CONSOLE_ENABLED === 'true' : e.NODE_ENV !== 'production',
      sessionIdleMs: e.CONSOLE_SESSION_IDLE_MINUTES * 60_000,
      sessionMaxMs: e.CONSOLE_SESSION_MAX_HOURS * 3_600_000,
      refreshMs: e.CONSOLE_REFRESH_SECONDS * 1000,
      centreDesk: e.CONSOLE_CENTRE_DESK ? e.CONSOLE_CENTRE_DESK === 'true' : useSandbox,
    },
  };
}

/** BLOB_STORE=auto: the database itself on PostgreSQL (replicas share it), files otherwise. */
function blobStoreFor(choice: 'auto' | 'fs' | 'postgres', databaseUrl: string): 'fs' | 'postgres' {
  if (choice !== 'auto') return choice;
  return databaseUrl.startsWith('postgres') ? 'postgres' : 'fs';
}

/** `blobs` beside the SQLite file; PostgreSQL: `./data/blobs`; an in-memory database: a directory of this process under the system's temporary one. */
function defaultBlobDir(databaseUrl: string): string {
  const file = databaseUrl.startsWith('sqlite:') ? databaseUrl.slice('sqlite:'.length) : '';
  if (file === ':memory:') return path.join(tmpdir(), `referral-gateway-blobs-${process.pid}`);
  return file ? path.join(path.dirname(file), 'blobs') : path.join('data', 'blobs');
}

/** The key `npm start` serves with no API_KEYS in development (README); production refuses it. */
export const DEV_KEY = 'dev-key';
const MIN_PRODUCTION_KEY_LENGTH = 24;

/**
 * Each declared variable parsed on its own, so that one bad value neither hides another nor stops the rules between
 * the good ones. A variable in `failed` has no value in `e` (rules about it check `failed` first).
 */
function parseEnv(cleaned: Record<string, string>, problems: string[]): { e: Env; failed: Set<EnvName> } {
  const values: Record<string, unknown> = {};
  const failed = new Set<EnvName>();
  for (const [name, schema] of Object.entries(envSchema.shape) as Array<[EnvName, z.ZodType]>) {
    const parsed = schema.safeParse(cleaned[name]);
    if (parsed.success) {
      if (parsed.data !== undefined) values[name] = parsed.data;
      continue;
    }
    failed.add(name);
    const shown = name in cleaned && !SECRET_NAME.test(name) ? ` (got "${cleaned[name].slice(0, 80)}")` : '';
    for (const issue of parsed.error.issues) problems.push(`${name} ${issue.message}${shown}`);
  }
  return { e: values as Env, failed };
}

/**
 * CLIENT_IDENTIFIER_SYSTEMS: `a=http://a.org/mrn urn:oid:1.2;b=http://b.org/mrn` (clients separated by `;`,
 * systems by spaces or commas). A system may belong to one client only.
 */
function parseClientIdentifierSystems(text: string | undefined, problems: string[]): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (!text) return out;
  const owner = new Map<string, string>();
  for (const part of text
    .split(';')
    .map((p) => p.trim())
    .filter(Boolean)) {
    const i = part.indexOf('=');
    const clientId = part.slice(0, i).trim();
    const systems = part
      .slice(i + 1)
      .split(/[\s,]+/)
      .filter(Boolean);
    if (i <= 0 || !/^[\w.-]+$/.test(clientId) || systems.length === 0) {
      problems.push('CLIENT_IDENTIFIER_SYSTEMS must be `clientId=system system;clientId=system` (got a part without a client id or systems)');
      continue;
    }
    if (out.has(clientId)) {
      problems.push(`CLIENT_IDENTIFIER_SYSTEMS lists client ${clientId} twice`);
      continue;
    }
    for (const system of systems) {
      const other = owner.get(system);
      if (other) problems.push(`CLIENT_IDENTIFIER_SYSTEMS gives system ${system} to both ${other} and ${clientId}`);
      else owner.set(system, clientId);
    }
    out.set(clientId, systems);
  }
  return out;
}

/** The destination `default` from FHIR_BASE_URL and the FHIR_* variables; undefined (with its problems reported) when it cannot be built. */
function fhirBaseUrlDestination(
  e: Env,
  env: Record<string, string>,
  fromFile: Destination[],
  variablesOk: boolean,
  problems: string[]
): Destination | undefined {
  if (fromFile.some((d) => d.id === 'default')) {
    problems.push('FHIR_BASE_URL defines destination "default", which DESTINATIONS_FILE already has');
    return undefined;
  }
  if (!e.FHIR_BASE_URL || !variablesOk) return undefined;
  const auth = fhirAuthFromEnv(e, env, problems);
  if (!auth) return undefined;
  return singleDestination(
    {
      id: 'default',
      name: 'Default destination (FHIR_BASE_URL)',
      organization: { system: e.FHIR_ORGANIZATION_SYSTEM, value: e.FHIR_ORGANIZATION_VALUE },
      baseUrl: e.FHIR_BASE_URL.replace(/\/+$/, ''),
      auth,
      timeoutMs: e.FHIR_TIMEOUT_MS,
      maxInlineBytes: 1_048_576,
    },
    env,
    problems
  );
}

function fhirAuthFromEnv(e: Env, env: Record<string, string | undefined>, problems: string[]): Destination['auth'] | undefined {
  switch (e.FHIR_AUTH) {
    case 'none':
      return { type: 'none' };
    case 'basic':
      return { type: 'basic', usernameEnv: 'FHIR_USERNAME', passwordEnv: 'FHIR_PASSWORD' };
    case 'bearer':
      return { type: 'bearer', tokenEnv: 'FHIR_TOKEN' };
    case 'client-credentials':
      if (!e.FHIR_TOKEN_URL) {
        problems.push('FHIR_TOKEN_URL is required when FHIR_AUTH=client-credentials');
        return undefined;
      }
      return {
        type: 'client-credentials',
        tokenUrl: e.FHIR_TOKEN_URL,
        clientIdEnv: 'FHIR_CLIENT_ID',
        clientSecretEnv: 'FHIR_CLIENT_SECRET',
        scope: e.FHIR_SCOPE,
      };
    case 'smart-backend':
      if (!e.FHIR_TOKEN_URL || !e.FHIR_SCOPE) {
        problems.push('FHIR_TOKEN_URL and FHIR_SCOPE are required when FHIR_AUTH=smart-backend');
        return undefined;
      }
      return {
        type: 'smart-backend',
        tokenUrl: e.FHIR_TOKEN_URL,
        clientIdEnv: 'FHIR_CLIENT_ID',
        ...(e.FHIR_PRIVATE_KEY_FILE ? { privateKeyFile: e.FHIR_PRIVATE_KEY_FILE } : { privateKeyEnv: 'FHIR_PRIVATE_KEY' }),
        alg: e.FHIR_JWT_ALG,
        kid: e.FHIR_JWT_KID ?? env.FHIR_JWT_KID,
        scope: e.FHIR_SCOPE,
      };
  }
}

function checkSecretsPresent(d: Destination, env: Record<string, string | undefined>, problems: string[]): void {
  const names: string[] = [];
  const a = d.auth;
  if (a.type === 'basic') names.push(a.usernameEnv, a.passwordEnv);
  if (a.type === 'bearer') names.push(a.tokenEnv);
  if (a.type === 'client-credentials') names.push(a.clientIdEnv, a.clientSecretEnv);
  if (a.type === 'smart-backend') {
    names.push(a.clientIdEnv);
    if (a.privateKeyEnv) names.push(a.privateKeyEnv);
  }
  const missing = names.filter((n) => !env[n]);
  for (const n of missing) {
    problems.push(`${n} is required by destination "${d.id}" (auth ${a.type}) but is not set`);
  }
  if (a.type === 'smart-backend' && missing.length === 0) {
    // A wrong key type or an unreadable file should stop start-up, not the first delivery.
    try {
      loadPrivateKey(a, env);
    } catch (err) {
      problems.push(
        `${a.privateKeyFile ? `FHIR private key file ${a.privateKeyFile}` : a.privateKeyEnv} for destination "${d.id}": ${(err as Error).message.split('\n')[0]}`
      );
    }
  }
}

/**
 * The FHIR_BASE_URL destination: every other destination option can be set by a FHIR_<OPTION> variable
 * (FHIR_PROFILE, FHIR_BINARY_MODE, FHIR_MAX_INLINE_BYTES, FHIR_CLIENT_IDS, FHIR_ATTACHMENT_ORIGINS as a comma
 * list, FHIR_CIRCUIT_BREAKER as JSON...), checked by the same schema as a destinations file entry.
 */
function singleDestination(base: Record<string, unknown>, env: Record<string, string | undefined>, problems: string[]): Destination | undefined {
  const raw: Record<string, unknown> = { ...base };
  const shape = destinationSchema.shape as Record<string, z.ZodType>;
  for (const { option, variable } of destinationOptionVariables()) {
    const value = env[variable];
    if (value === undefined) continue;
    raw[option] = envValue(shape[option], value);
  }
  const parsed = destinationSchema.safeParse(raw);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const option = String(issue.path[0] ?? '');
      const name = OWN_VARIABLES.has(option) || option === '' ? 'FHIR_BASE_URL' : destinationOptionVariable(option);
      const rest = issue.path.slice(1).join('.');
      problems.push(`${name}${rest ? ` (${rest})` : ''} ${issue.message}`);
    }
    return undefined;
  }
  return parsed.data;
}

/** A variable's text as the option's type wants it: booleans, numbers, comma lists, JSON objects, else the text. */
function envValue(schema: z.ZodType | undefined, text: string): unknown {
  const kind = innerKind(schema);
  const t = text.trim();
  switch (kind) {
    case 'boolean':
    case 'union':
      if (t === 'true') return true;
      if (t === 'false') return false;
      return t;
    case 'number':
      return t !== '' && Number.isFinite(Number(t)) ? Number(t) : t;
    case 'array':
      return t
        .split(',')
        .map((x) => x.trim())
        .filter(Boolean);
    case 'object':
      try {
        return JSON.parse(t) as unknown;
      } catch {
        return t;
      }
    default:
      return t;
  }
}

function innerKind(schema: z.ZodType | undefined): string | undefined {
  let s: unknown = schema;
  for (let i = 0; i < 5 && s; i++) {
    const def = (s as { def?: { type?: string; innerType?: unknown } }).def;
    if (!def) return undefined;
    if (def.type === 'optional' || def.type === 'default' || def.type === 'nullable') {
      s = def.innerType;
      continue;
    }
    return def.type;
  }
  return undefined;
}
