import { z } from 'zod';
import { validate as validateCron } from 'node-cron';
import { loadPrivateKey } from '../fhir/auth';
import { type Destination, destinationSchema, loadDestinationsFile } from './destinations';

const cron = z.string().refine((s) => validateCron(s), 'is not a valid cron expression (5 or 6 fields)');

const apiKeys = z
  .string()
  .transform((s, ctx) => {
    const out = new Map<string, string>();
    for (const pair of s.split(',').map((p) => p.trim()).filter(Boolean)) {
      const i = pair.indexOf(':');
      const clientId = pair.slice(0, i);
      const key = pair.slice(i + 1);
      if (i <= 0 || !key || !/^[\w.-]+$/.test(clientId)) {
        ctx.addIssue({ code: 'custom', message: 'must be comma-separated clientId:key pairs' });
        return z.NEVER;
      }
      if (out.has(clientId)) {
        ctx.addIssue({ code: 'custom', message: `lists client ${clientId} twice: give each client one key` });
        return z.NEVER;
      }
      if ([...out.values()].includes(key)) {
        ctx.addIssue({ code: 'custom', message: `the key of ${clientId} is used by another client` });
        return z.NEVER;
      }
      out.set(clientId, key);
    }
    if (out.size === 0) {
      ctx.addIssue({ code: 'custom', message: 'holds no clientId:key pair' });
      return z.NEVER;
    }
    return out;
  });

const envSchema = z.object({
  NODE_ENV: z.enum(['development', 'production', 'test']).default('development'),
  PORT: z.coerce.number().int().min(0).max(65535).default(8080),
  /** Default: 127.0.0.1 in development and test (the open sandbox stays on this machine), all interfaces in production. */
  HOST: z.string().optional(),
  DATABASE_URL: z
    .string()
    .regex(/^(sqlite:.+|postgres(ql)?:\/\/.+)$/, 'must be sqlite:<path> or postgres://...')
    .default('sqlite:./data/gateway.db'),
  DESTINATIONS_FILE: z.string().default('mappings/destinations.json'),
  FHIR_BASE_URL: z.url().optional(),
  FHIR_AUTH: z.enum(['none', 'basic', 'bearer', 'client-credentials', 'smart-backend']).default('none'),
  FHIR_PRIVATE_KEY_FILE: z.string().optional(),
  FHIR_JWT_ALG: z.enum(['RS384', 'ES384']).default('ES384'),
  FHIR_JWT_KID: z.string().optional(),
  FHIR_TOKEN_URL: z.url().optional(),
  FHIR_SCOPE: z.string().optional(),
  FHIR_ORGANIZATION_SYSTEM: z.string().default('https://referral-gateway.dev/fhir/sid/destination'),
  FHIR_ORGANIZATION_VALUE: z.string().default('default'),
  FHIR_TIMEOUT_MS: z.coerce.number().int().min(100).max(600_000).default(30_000),
  POLL_CRON: cron.optional(),
  API_KEYS: apiKeys.optional(),
  ADMIN_API_KEY: z.string().min(8, 'must be at least 8 characters').optional(),
  WEBHOOK_SECRET: z
    .string()
    .min(16, 'must be at least 16 characters (or whsec_<base64>)')
    .refine((s) => !s.startsWith('whsec_') || /^[A-Za-z0-9+/]+={0,2}$/.test(s.slice(6)), 'starts with whsec_ but the rest is not base64')
    .optional(),
  WEBHOOK_ALLOW_PRIVATE_NETWORKS: z.enum(['true', 'false'], { message: 'must be true or false' }).optional(),
  LOG_LEVEL: z.enum(['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly']).default('info'),
  MAX_BODY_BYTES: z.coerce.number().int().min(1024).max(1024 * 1024 * 1024).default(25 * 1024 * 1024),
  MAX_INTAKE_BYTES_IN_FLIGHT: z.coerce.number().int().min(1024).default(256 * 1024 * 1024),
  INTAKE_WAIT_MS: z.coerce.number().int().min(0).max(600_000).default(10_000),
  MAX_JSON_DEPTH: z.coerce.number().int().min(8).max(512).default(64),
  INTAKE_CLIENT_SHARE: z.coerce.number().gt(0).max(1).default(0.5),
  INTAKE_BODY_TIMEOUT_MS: z.coerce.number().int().min(100).max(3_600_000).default(60_000),
  HEADERS_TIMEOUT_MS: z.coerce.number().int().min(100).max(600_000).default(10_000),
  REQUEST_TIMEOUT_MS: z.coerce.number().int().min(100).max(3_600_000).default(120_000),
  MAX_CONNECTIONS_PER_ADDRESS: z.coerce.number().int().min(0).max(100_000).default(32),
  STORE_BUSY_WAIT_MS: z.coerce.number().int().min(0).max(600_000).default(5_000),
  STORE_PROBE_CACHE_MS: z.coerce.number().int().min(0).max(600_000).default(2_000),
  CLIENT_IDENTIFIER_SYSTEMS: z.string().optional(),
  DELIVERY_MAX_ATTEMPTS: z.coerce.number().int().min(1).max(1000).default(12),
  DELIVERY_BASE_DELAY_MS: z.coerce.number().int().min(1).default(1000),
  DELIVERY_MAX_DELAY_MS: z.coerce.number().int().min(1).default(5 * 60_000),
  DELIVERY_CONCURRENCY: z.coerce.number().int().min(1).max(64).default(4),
  DELIVERY_MAX_AGE_MS: z.coerce.number().int().min(1000).default(7 * 24 * 3600_000),
  SHUTDOWN_TIMEOUT_MS: z.coerce.number().int().min(0).default(15_000),
  DOCUMENT_RETENTION_DAYS: z.coerce.number().int().min(0).max(36_500).default(30),
  REFERRAL_RETENTION_DAYS: z.coerce.number().int().min(0).max(36_500).default(0),
  RETENTION_CRON: cron.default('17 3 * * *'),
  /** How the built-in sandbox behaves: as today (`default`), or like a Medplum, HAPI or the strictest server. */
  SANDBOX_PROFILE: z.enum(['default', 'medplum', 'hapi', 'strict']).default('default'),
  /** Traits switched on or off over the profile, e.g. `nonAtomic=false,strictIsolationMaxEntries=8,-emptyMinimal`. */
  SANDBOX_TRAITS: z.string().optional(),
});

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
  /** Closed referrals lose their inline document bytes after `documentDays` and are deleted after `referralDays` (0: never). */
  retention: { documentDays: number; referralDays: number; cron: string };
  /** The built-in sandbox's server profile and trait overrides (SANDBOX_PROFILE, SANDBOX_TRAITS). */
  sandbox: { profile: 'default' | 'medplum' | 'hapi' | 'strict'; traits?: string };
}

export class ConfigError extends Error {}

/** Parses and checks the environment. Throws ConfigError whose message is one line naming the variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const cleaned = Object.fromEntries(Object.entries(env).filter(([, v]) => v !== undefined && v !== ''));
  const parsed = envSchema.safeParse(cleaned);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const name = String(issue.path[0] ?? 'environment');
    const shown = name in cleaned && !/KEY|SECRET|PASSWORD|TOKEN/.test(name) ? ` (got "${String(cleaned[name]).slice(0, 80)}")` : '';
    throw new ConfigError(`${name} ${issue.message}${shown}`);
  }
  const e = parsed.data;

  let destinations: Destination[];
  try {
    destinations = loadDestinationsFile(e.DESTINATIONS_FILE);
  } catch (err) {
    throw new ConfigError((err as Error).message);
  }
  if (e.FHIR_BASE_URL) {
    if (destinations.some((d) => d.id === 'default')) {
      throw new ConfigError('FHIR_BASE_URL defines destination "default", which DESTINATIONS_FILE already has');
    }
    destinations.push(
      singleDestination(
        {
          id: 'default',
          name: 'Default destination (FHIR_BASE_URL)',
          organization: { system: e.FHIR_ORGANIZATION_SYSTEM, value: e.FHIR_ORGANIZATION_VALUE },
          baseUrl: e.FHIR_BASE_URL.replace(/\/+$/, ''),
          auth: fhirAuthFromEnv(e, cleaned),
          timeoutMs: e.FHIR_TIMEOUT_MS,
          maxInlineBytes: 1_048_576,
        },
        cleaned
      )
    );
  }
  for (const d of destinations) {
    checkSecretsPresent(d, cleaned);
  }
  const useSandbox = destinations.length === 0;
  if (useSandbox && e.NODE_ENV === 'production') {
    throw new ConfigError('FHIR_BASE_URL (or DESTINATIONS_FILE) is required with NODE_ENV=production: the sandbox is for development only');
  }
  if (e.REFERRAL_RETENTION_DAYS > 0 && e.DOCUMENT_RETENTION_DAYS > e.REFERRAL_RETENTION_DAYS) {
    throw new ConfigError(
      `DOCUMENT_RETENTION_DAYS (${e.DOCUMENT_RETENTION_DAYS}) is longer than REFERRAL_RETENTION_DAYS (${e.REFERRAL_RETENTION_DAYS}): referrals would be deleted with their documents first`
    );
  }
  let apiKeys = e.API_KEYS;
  let devKeys = false;
  if (!apiKeys) {
    if (e.NODE_ENV === 'production') {
      throw new ConfigError('API_KEYS is required with NODE_ENV=production');
    }
    apiKeys = new Map([['dev', DEV_KEY]]);
    devKeys = true;
  }
  if (e.NODE_ENV === 'production') {
    for (const [clientId, key] of apiKeys) {
      if (key === DEV_KEY) throw new ConfigError(`API_KEYS gives client ${clientId} the development key, which production refuses`);
      if (key.length < MIN_PRODUCTION_KEY_LENGTH) {
        throw new ConfigError(`API_KEYS: the key of client ${clientId} is shorter than ${MIN_PRODUCTION_KEY_LENGTH} characters, which production refuses`);
      }
    }
    if (e.ADMIN_API_KEY !== undefined && e.ADMIN_API_KEY.length < MIN_PRODUCTION_KEY_LENGTH) {
      throw new ConfigError(`ADMIN_API_KEY is shorter than ${MIN_PRODUCTION_KEY_LENGTH} characters, which production refuses`);
    }
  }
  if (e.ADMIN_API_KEY !== undefined && [...apiKeys.values()].includes(e.ADMIN_API_KEY)) {
    throw new ConfigError('ADMIN_API_KEY is also a client key in API_KEYS: give the admin a key of its own');
  }
  if (e.REQUEST_TIMEOUT_MS < e.INTAKE_BODY_TIMEOUT_MS) {
    throw new ConfigError(`REQUEST_TIMEOUT_MS (${e.REQUEST_TIMEOUT_MS}) is shorter than INTAKE_BODY_TIMEOUT_MS (${e.INTAKE_BODY_TIMEOUT_MS}): bodies would be cut off before their deadline`);
  }
  const clientIdentifierSystems = parseClientIdentifierSystems(e.CLIENT_IDENTIFIER_SYSTEMS);
  for (const clientId of clientIdentifierSystems.keys()) {
    if (!apiKeys.has(clientId)) throw new ConfigError(`CLIENT_IDENTIFIER_SYSTEMS names client ${clientId}, which API_KEYS does not have`);
  }
  if (e.NODE_ENV === 'production' && !e.WEBHOOK_SECRET) {
    throw new ConfigError('WEBHOOK_SECRET is required with NODE_ENV=production');
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
    retention: { documentDays: e.DOCUMENT_RETENTION_DAYS, referralDays: e.REFERRAL_RETENTION_DAYS, cron: e.RETENTION_CRON },
    sandbox: { profile: e.SANDBOX_PROFILE, traits: e.SANDBOX_TRAITS },
  };
}

/** The key `npm start` serves with no API_KEYS in development (README); production refuses it. */
export const DEV_KEY = 'dev-key';
const MIN_PRODUCTION_KEY_LENGTH = 24;

/**
 * CLIENT_IDENTIFIER_SYSTEMS: `a=http://a.org/mrn urn:oid:1.2;b=http://b.org/mrn` (clients separated by `;`,
 * systems by spaces or commas). A system may belong to one client only.
 */
function parseClientIdentifierSystems(text: string | undefined): Map<string, string[]> {
  const out = new Map<string, string[]>();
  if (!text) return out;
  const owner = new Map<string, string>();
  for (const part of text.split(';').map((p) => p.trim()).filter(Boolean)) {
    const i = part.indexOf('=');
    const clientId = part.slice(0, i).trim();
    const systems = part
      .slice(i + 1)
      .split(/[\s,]+/)
      .filter(Boolean);
    if (i <= 0 || !/^[\w.-]+$/.test(clientId) || systems.length === 0) {
      throw new ConfigError('CLIENT_IDENTIFIER_SYSTEMS must be `clientId=system system;clientId=system` (got a part without a client id or systems)');
    }
    if (out.has(clientId)) throw new ConfigError(`CLIENT_IDENTIFIER_SYSTEMS lists client ${clientId} twice`);
    for (const system of systems) {
      const other = owner.get(system);
      if (other) throw new ConfigError(`CLIENT_IDENTIFIER_SYSTEMS gives system ${system} to both ${other} and ${clientId}`);
      owner.set(system, clientId);
    }
    out.set(clientId, systems);
  }
  return out;
}

function fhirAuthFromEnv(e: z.output<typeof envSchema>, env: Record<string, string | undefined>): Destination['auth'] {
  switch (e.FHIR_AUTH) {
    case 'none':
      return { type: 'none' };
    case 'basic':
      return { type: 'basic', usernameEnv: 'FHIR_USERNAME', passwordEnv: 'FHIR_PASSWORD' };
    case 'bearer':
      return { type: 'bearer', tokenEnv: 'FHIR_TOKEN' };
    case 'client-credentials':
      if (!e.FHIR_TOKEN_URL) {
        throw new ConfigError('FHIR_TOKEN_URL is required when FHIR_AUTH=client-credentials');
      }
      return { type: 'client-credentials', tokenUrl: e.FHIR_TOKEN_URL, clientIdEnv: 'FHIR_CLIENT_ID', clientSecretEnv: 'FHIR_CLIENT_SECRET', scope: e.FHIR_SCOPE };
    case 'smart-backend':
      if (!e.FHIR_TOKEN_URL || !e.FHIR_SCOPE) {
        throw new ConfigError('FHIR_TOKEN_URL and FHIR_SCOPE are required when FHIR_AUTH=smart-backend');
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

function checkSecretsPresent(d: Destination, env: Record<string, string | undefined>): void {
  const names: string[] = [];
  const a = d.auth;
  if (a.type === 'basic') names.push(a.usernameEnv, a.passwordEnv);
  if (a.type === 'bearer') names.push(a.tokenEnv);
  if (a.type === 'client-credentials') names.push(a.clientIdEnv, a.clientSecretEnv);
  if (a.type === 'smart-backend') {
    names.push(a.clientIdEnv);
    if (a.privateKeyEnv) names.push(a.privateKeyEnv);
  }
  for (const n of names) {
    if (!env[n]) {
      throw new ConfigError(`${n} is required by destination "${d.id}" (auth ${a.type}) but is not set`);
    }
  }
  if (a.type === 'smart-backend') {
    // A wrong key type or an unreadable file should stop start-up, not the first delivery.
    try {
      loadPrivateKey(a, env);
    } catch (err) {
      throw new ConfigError(`${a.privateKeyFile ? `FHIR private key file ${a.privateKeyFile}` : a.privateKeyEnv} for destination "${d.id}": ${(err as Error).message.split('\n')[0]}`);
    }
  }
}

/** Destination options with a variable of their own elsewhere (FHIR_BASE_URL, FHIR_AUTH..., FHIR_ORGANIZATION_*, FHIR_TIMEOUT_MS). */
const OWN_VARIABLES = new Set(['id', 'baseUrl', 'auth', 'organization', 'timeoutMs']);

/** `maxInlineBytes` -> `FHIR_MAX_INLINE_BYTES`. */
export function destinationOptionVariable(option: string): string {
  return `FHIR_${option.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`;
}

/** Every destination option that FHIR_BASE_URL's destination takes from a FHIR_<OPTION> variable. */
export function destinationOptionVariables(): Array<{ option: string; variable: string }> {
  return Object.keys(destinationSchema.shape)
    .filter((k) => !OWN_VARIABLES.has(k))
    .map((option) => ({ option, variable: destinationOptionVariable(option) }));
}

/**
 * The FHIR_BASE_URL destination: every other destination option can be set by a FHIR_<OPTION> variable
 * (FHIR_PROFILE, FHIR_BINARY_MODE, FHIR_MAX_INLINE_BYTES, FHIR_CLIENT_IDS, FHIR_ATTACHMENT_ORIGINS as a comma
 * list, FHIR_CIRCUIT_BREAKER as JSON...), checked by the same schema as a destinations file entry.
 */
function singleDestination(base: Record<string, unknown>, env: Record<string, string | undefined>): Destination {
  const raw: Record<string, unknown> = { ...base };
  const shape = destinationSchema.shape as Record<string, z.ZodType>;
  for (const { option, variable } of destinationOptionVariables()) {
    const value = env[variable];
    if (value === undefined) continue;
    raw[option] = envValue(shape[option], value);
  }
  const parsed = destinationSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const option = String(issue.path[0] ?? '');
    const name = OWN_VARIABLES.has(option) || option === '' ? 'FHIR_BASE_URL' : destinationOptionVariable(option);
    const rest = issue.path.slice(1).join('.');
    throw new ConfigError(`${name}${rest ? ` (${rest})` : ''} ${issue.message}`);
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
      return t === 'true' ? true : t === 'false' ? false : t;
    case 'number':
      return t !== '' && Number.isFinite(Number(t)) ? Number(t) : t;
    case 'array':
      return t.split(',').map((x) => x.trim()).filter(Boolean);
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
