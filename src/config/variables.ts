import { z } from 'zod';
import { validate as validateCron } from 'node-cron';
import { destinationOptionVariables } from './destination-variables';

/**
 * One environment variable, declared once: how it is checked, what it means, what it defaults to. loadConfig
 * parses the variables that have a schema; the README's configuration table is rendered from all of them
 * (src/config/config-table.ts, `npx tsx src/cli/config-table.ts --write`).
 */
export interface Variable {
  /** How the value is checked and converted. Absent: read elsewhere (a destination's secret...) and declared here for the table. */
  schema?: z.ZodType;
  /** The README's "meaning" column: markdown, one line. */
  doc: string;
  /** The README's "default" column when the schema's own default says too little (or there is none but the code picks one). */
  shownDefault?: string;
}

const cron = z.string().refine((s) => validateCron(s), 'is not a valid cron expression (5 or 6 fields)');

const apiKeys = z.string().transform((s, ctx) => {
  const out = new Map<string, string>();
  for (const pair of s
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)) {
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

const optionVariables = destinationOptionVariables()
  .map((v) => `\`${v.variable}\``)
  .join(', ');

/** Every variable, in the order of the README's table. */
export const variables = {
  NODE_ENV: {
    schema: z.enum(['development', 'production', 'test']).default('development'),
    doc: '`production` requires `API_KEYS`, `WEBHOOK_SECRET` and a real destination, and refuses callbacks to private networks by default',
  },
  PORT: {
    schema: z.coerce.number().int().min(0).max(65535).default(8080),
    doc: 'HTTP port (0 = any free port)',
  },
  HOST: {
    // No schema default: it depends on NODE_ENV (loadConfig), so the open sandbox stays on this machine outside production.
    schema: z.string().optional(),
    shownDefault: '127.0.0.1; 0.0.0.0 in production',
    doc:
      'listen address. Outside production the service (and its open sandbox) stays on this machine unless you set `HOST=0.0.0.0`; ' +
      'the start-up line prints the address bound',
  },
  DATABASE_URL: {
    schema: z
      .string()
      .regex(/^(sqlite:.+|postgres(ql)?:\/\/.+)$/, 'must be sqlite:<path> or postgres://...')
      .default('sqlite:./data/gateway.db'),
    doc: '`sqlite:<path>` or `postgres://user:pass@host/db`; migrations run at start-up',
  },
  DESTINATIONS_FILE: {
    schema: z.string().default('mappings/destinations.json'),
    doc: 'the destination registry (a missing file means none)',
  },
  FHIR_BASE_URL: {
    schema: z.url().optional(),
    doc: 'one destination, id `default`',
  },
  FHIR_AUTH: {
    schema: z.enum(['none', 'basic', 'bearer', 'client-credentials', 'smart-backend']).default('none'),
    doc:
      '`none`, `basic` (`FHIR_USERNAME`/`FHIR_PASSWORD`), `bearer` (`FHIR_TOKEN`), `client-credentials` (`FHIR_CLIENT_ID`/`FHIR_CLIENT_SECRET`/`FHIR_TOKEN_URL`, ' +
      '`FHIR_SCOPE`), `smart-backend` (`FHIR_CLIENT_ID`, `FHIR_TOKEN_URL`, `FHIR_SCOPE`, `FHIR_PRIVATE_KEY` PEM or `FHIR_PRIVATE_KEY_FILE`, ' +
      '`FHIR_JWT_ALG` ES384/RS384, `FHIR_JWT_KID`)',
  },
  // The secrets below are read when the destination authenticates (its usernameEnv, tokenEnv...); loadConfig checks they are set.
  FHIR_USERNAME: { doc: 'with `FHIR_AUTH=basic`: the user name' },
  FHIR_PASSWORD: { doc: 'with `FHIR_AUTH=basic`: the password' },
  FHIR_TOKEN: { doc: 'with `FHIR_AUTH=bearer`: the bearer token' },
  FHIR_CLIENT_ID: { doc: 'with `FHIR_AUTH=client-credentials` or `smart-backend`: the client id at the token endpoint' },
  FHIR_CLIENT_SECRET: { doc: 'with `FHIR_AUTH=client-credentials`: the client secret' },
  FHIR_TOKEN_URL: {
    schema: z.url().optional(),
    doc: 'the token endpoint; required with `FHIR_AUTH=client-credentials` and `smart-backend`',
  },
  FHIR_SCOPE: {
    schema: z.string().optional(),
    doc: 'the scope asked for; optional with `FHIR_AUTH=client-credentials`, required with `smart-backend`',
  },
  FHIR_PRIVATE_KEY: { doc: 'with `FHIR_AUTH=smart-backend`: the private key, PEM, unless `FHIR_PRIVATE_KEY_FILE` is set' },
  FHIR_PRIVATE_KEY_FILE: {
    schema: z.string().optional(),
    doc: 'with `FHIR_AUTH=smart-backend`: a PEM file holding the private key, instead of `FHIR_PRIVATE_KEY`',
  },
  FHIR_JWT_ALG: {
    schema: z.enum(['RS384', 'ES384']).default('ES384'),
    doc: 'with `FHIR_AUTH=smart-backend`: how the client assertion is signed, `ES384` or `RS384`',
  },
  FHIR_JWT_KID: {
    schema: z.string().optional(),
    doc: 'with `FHIR_AUTH=smart-backend`: the key id (`kid`) as registered at the centre, put in the JWT header',
  },
  FHIR_ORGANIZATION_SYSTEM: {
    schema: z.string().default('https://referral-gateway.dev/fhir/sid/destination'),
    doc: "the system of the centre's Organization identifier for the `default` destination",
  },
  FHIR_ORGANIZATION_VALUE: {
    schema: z.string().default('default'),
    doc: "the value of the centre's Organization identifier for the `default` destination",
  },
  FHIR_TIMEOUT_MS: {
    schema: z.coerce.number().int().min(100).max(600_000).default(30_000),
    doc: 'per-request timeout for the `default` destination',
  },
  'FHIR_<OPTION>': {
    shownDefault: "the option's default",
    doc:
      `every other option of the \`default\` destination (see the destinations table above): ${optionVariables}; ` +
      'lists comma-separated, objects as JSON, checked like a destinations file entry',
  },
  POLL_CRON: {
    // No schema default: it depends on whether the sandbox is the destination (gateway.ts).
    schema: cron.optional(),
    shownDefault: '`*/5 * * * *` (sandbox: `*/10 * * * * *`)',
    doc: "poll schedule, 5 or 6 cron fields; a destination's `pollCron` wins",
  },
  API_KEYS: {
    schema: apiKeys.optional(),
    shownDefault: 'dev client `dev:dev-key`',
    doc:
      '`clientId:key` pairs, comma-separated; required in production, where `dev-key` and keys shorter than 24 characters are refused. ' +
      'A client listed twice, or two clients with one key, stops start-up',
  },
  ADMIN_API_KEY: {
    schema: z.string().min(8, 'must be at least 8 characters').optional(),
    doc: 'enables `/admin/*`; at least 24 characters in production, and not one of the client keys',
  },
  CLIENT_IDENTIFIER_SYSTEMS: {
    schema: z.string().optional(),
    doc:
      'the patient identifier systems each client sends, `city-hospital=urn:oid:1.2.3 http://city.example/mrn;other-clinic=http://other.example/mrn`. ' +
      'A system listed for one client is refused (422 naming `patient.identifiers[i].system`) from every other; a client with a list may use only its own systems; ' +
      "a client without one may use any system nobody claims. It keeps one hospital's referral from attaching to another hospital's patient at the centre",
  },
  WEBHOOK_SECRET: {
    schema: z
      .string()
      .min(16, 'must be at least 16 characters (or whsec_<base64>)')
      .refine((s) => !s.startsWith('whsec_') || /^[A-Za-z0-9+/]+={0,2}$/.test(s.slice(6)), 'starts with whsec_ but the rest is not base64')
      .optional(),
    doc: 'signs status webhooks; required in production',
  },
  WEBHOOK_ALLOW_PRIVATE_NETWORKS: {
    schema: z.enum(['true', 'false'], { message: 'must be true or false' }).optional(),
    shownDefault: '`true`, `false` in production',
    doc:
      'whether a `callbackUrl` may point at loopback, private, link-local or other non-public addresses (or `localhost`, `*.local`, `*.internal`). ' +
      'When `false`, such a URL is refused at submission (422 naming `callbackUrl`), and a host that resolves to such an address when the webhook is sent ' +
      'is never called (the event is dead-lettered with the reason)',
  },
  LOG_LEVEL: {
    schema: z.enum(['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly']).default('info'),
    doc: 'winston level',
  },
  HL7_MLLP_PORT: {
    schema: z.coerce.number().int().min(0).max(65535).optional(),
    doc:
      'TCP port of the HL7 v2 MLLP listener (REF^I12/I13/I14, OMG^O19; 0 = any free port). Off unless set, except in development, ' +
      'where it listens on 2575 and says so at start-up',
    shownDefault: '2575 in development, off otherwise',
  },
  HL7_MLLP_SENDERS: {
    schema: z
      .string()
      .transform((s, ctx) => {
        const out = new Map<string, string>();
        for (const pair of s
          .split(',')
          .map((p) => p.trim())
          .filter(Boolean)) {
          const i = pair.lastIndexOf(':');
          const facility = pair.slice(0, i).trim();
          const clientId = pair.slice(i + 1).trim();
          if (i <= 0 || !facility || !/^[\w.-]+$/.test(clientId)) {
            ctx.addIssue({ code: 'custom', message: 'must be comma-separated FACILITY:clientId pairs (MSH-4 sending facility, API_KEYS client)' });
            return z.NEVER;
          }
          if (out.has(facility)) {
            ctx.addIssue({ code: 'custom', message: `lists sending facility ${facility} twice` });
            return z.NEVER;
          }
          out.set(facility, clientId);
        }
        return out;
      })
      .optional(),
    doc:
      'which client each MLLP sender is (`FACILITY:clientId,...`, MSH-4 sending facility to an `API_KEYS` client): a message from a facility not ' +
      'listed is refused with an AR, unless `HL7_MLLP_CLIENT` is set',
  },
  HL7_MLLP_CLIENT: {
    schema: z
      .string()
      .regex(/^[\w.-]+$/)
      .optional(),
    doc: 'the client every MLLP message is from when its sending facility is not in `HL7_MLLP_SENDERS` (a listener for one sender)',
    shownDefault: '`dev` in development with the development key, none otherwise',
  },
  HL7_MAX_MESSAGE_BYTES: {
    schema: z.coerce
      .number()
      .int()
      .min(1024)
      .max(1024 * 1024 * 1024)
      .optional(),
    doc:
      'the largest HL7 v2 message taken over MLLP; a larger one is answered AR and the connection stays open. Also bounds the report sent back ' +
      'in a status message (its Base64 beside 16 KiB for the other segments): a larger report is left out and the history says so',
    shownDefault: '`MAX_BODY_BYTES`',
  },
  HL7_RETURN_CHANNELS: {
    schema: z
      .string()
      .optional()
      .transform((s, ctx) => {
        if (s === undefined) return undefined;
        const out = new Map<string, { host: string; port: number }>();
        for (const pair of (s ?? '')
          .split(',')
          .map((p) => p.trim())
          .filter(Boolean)) {
          const m = /^([\w.-]+)=(\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})$/.exec(pair);
          const port = Number(m?.[3]);
          if (!m || port < 1 || port > 65535) {
            ctx.addIssue({ code: 'custom', message: 'must be comma-separated clientId=host:port pairs (an API_KEYS client, its MLLP receiver)' });
            return z.NEVER;
          }
          if (out.has(m[1])) {
            ctx.addIssue({ code: 'custom', message: `lists client ${m[1]} twice` });
            return z.NEVER;
          }
          out.set(m[1], { host: m[2].replace(/^\[|\]$/g, ''), port });
        }
        return out;
      }),
    doc:
      "where each client's HL7 v2 referrals send their status changes back over MLLP (`clientId=host:port,...`): RRI^I12 to a REF^I12 sender, " +
      'OSU^O51 to an OMG^O19 (360X) sender, with the report when it completes. Recorded with each referral as it comes in; a client not listed gets none',
  },
  MAX_BODY_BYTES: {
    schema: z.coerce
      .number()
      .int()
      .min(1024)
      .max(1024 * 1024 * 1024)
      .default(25 * 1024 * 1024),
    doc:
      'request body limit, after decoding `Content-Encoding: gzip`, `deflate` or `br` ' +
      '(413 above it; a `Content-Length` above it is refused before the body is read)',
  },
  MAX_INTAKE_BYTES_IN_FLIGHT: {
    schema: z.coerce
      .number()
      .int()
      .min(1024)
      .default(256 * 1024 * 1024),
    shownDefault: '268435456 (256 MiB)',
    doc:
      'the memory budget for referrals in hand: request bodies received, parsed and stored at once (each counted by its `Content-Length`; ' +
      'a compressed body, or one without a length, counts as `MAX_BODY_BYTES`, the most it may inflate to) and stored submissions being delivered ' +
      '(each counted by its stored size). A request that does not fit waits; a delivery that does not fit waits too, then is put off a second without an attempt counted',
  },
  INTAKE_WAIT_MS: {
    schema: z.coerce.number().int().min(0).max(600_000).default(10_000),
    doc: 'how long it waits for room before a 503 with `Retry-After`',
  },
  INTAKE_CLIENT_SHARE: {
    schema: z.coerce.number().gt(0).max(1).default(0.5),
    doc:
      'the fraction of `MAX_INTAKE_BYTES_IN_FLIGHT` one client (API key), or delivery, may hold; its further requests wait while others are admitted ' +
      '(one request of a client holding nothing is always admitted). With a single client, set 1',
  },
  INTAKE_BODY_TIMEOUT_MS: {
    schema: z.coerce.number().int().min(100).max(3_600_000).default(60_000),
    doc: 'from admission until the whole body has arrived; a slower body gets `408` and its room is freed at once',
  },
  HEADERS_TIMEOUT_MS: {
    schema: z.coerce.number().int().min(100).max(600_000).default(10_000),
    doc: 'a client that has not sent its headers by then gets `408` and is disconnected',
  },
  REQUEST_TIMEOUT_MS: {
    schema: z.coerce.number().int().min(100).max(3_600_000).default(120_000),
    doc: 'a client that has not sent its whole request by then gets `408` and is disconnected. It must cover `INTAKE_WAIT_MS` + `INTAKE_BODY_TIMEOUT_MS`',
  },
  MAX_CONNECTIONS_PER_ADDRESS: {
    schema: z.coerce.number().int().min(0).max(100_000).default(32),
    doc:
      'open connections one remote address may hold; more get `503` and are closed. ' +
      'Behind a reverse proxy every connection comes from the proxy: raise it or set 0 (no cap) and cap at the proxy',
  },
  MAX_JSON_DEPTH: {
    schema: z.coerce.number().int().min(8).max(512).default(64),
    doc: 'deepest nesting of arrays and objects in a body (400 naming where it was exceeded)',
  },
  STORE_BUSY_WAIT_MS: {
    schema: z.coerce.number().int().min(0).max(600_000).default(5_000),
    doc:
      'how long a store call waits, without blocking the process, for a locked SQLite database (a `VACUUM`, a `sqlite3` shell); ' +
      'then `503` with `Retry-After`',
  },
  STORE_PROBE_CACHE_MS: {
    schema: z.coerce.number().int().min(0).max(600_000).default(2_000),
    doc: '`/readyz` writes a probe row at most this often; it fails while the store refuses writes and recovers by itself',
  },
  DELIVERY_MAX_ATTEMPTS: {
    schema: z.coerce.number().int().min(1).max(1000).default(12),
    doc: 'attempts before a referral becomes `delivery-failed`',
  },
  DELIVERY_BASE_DELAY_MS: {
    schema: z.coerce.number().int().min(1).default(1000),
    doc: 'the base of the exponential backoff, with full jitter, between delivery attempts',
  },
  DELIVERY_MAX_DELAY_MS: {
    schema: z.coerce
      .number()
      .int()
      .min(1)
      .default(5 * 60_000),
    doc: 'the longest wait between delivery attempts (the cap of that backoff)',
  },
  DELIVERY_CONCURRENCY: {
    schema: z.coerce.number().int().min(1).max(64).default(4),
    doc: 'transactions in flight per process',
  },
  DELIVERY_MAX_AGE_MS: {
    schema: z.coerce
      .number()
      .int()
      .min(1000)
      .default(7 * 24 * 3600_000),
    shownDefault: '604800000 (7 days)',
    doc: 'a referral still not delivered this long after it was accepted becomes `delivery-failed` ' + '(retries and circuit pauses never wait past it)',
  },
  SHUTDOWN_TIMEOUT_MS: {
    schema: z.coerce.number().int().min(0).default(15_000),
    doc: 'on SIGTERM/SIGINT, how long requests in flight may finish before connections are closed',
  },
  BLOB_STORE: {
    schema: z.enum(['auto', 'fs', 'postgres']).default('auto'),
    doc:
      'where streamed documents (multipart parts, `PUT .../content` uploads) are kept: `fs` (files under `BLOB_DIR`), `postgres` (in the database, ' +
      'so that replicas sharing it can all deliver; needs a `postgres://` `DATABASE_URL`), `auto` (`postgres` on PostgreSQL, else `fs`)',
  },
  BLOB_DIR: {
    schema: z.string().optional(),
    shownDefault: '`blobs` beside the SQLite file (`sqlite::memory:`: a temporary directory), else `./data/blobs`',
    doc: 'with the `fs` blob store: the directory (content-addressed files, written to a temporary name, fsynced, renamed)',
  },
  MAX_DOCUMENT_BYTES: {
    schema: z.coerce
      .number()
      .int()
      .min(1)
      .default(2 * 1024 ** 3),
    shownDefault: '2147483648 (2 GiB)',
    doc: 'the largest streamed document (a multipart file part or an upload); larger is refused 413 and nothing is kept',
  },
  MAX_REFERRAL_DOCUMENT_BYTES: {
    schema: z.coerce
      .number()
      .int()
      .min(1)
      .default(8 * 1024 ** 3),
    shownDefault: '8589934592 (8 GiB)',
    doc: "the most a referral's streamed documents may hold together; an upload that would go past it is refused 413",
  },
  UPLOAD_DEADLINE_HOURS: {
    schema: z.coerce.number().positive().default(72),
    doc: 'how long a referral waits in `awaiting-documents` for its `upload: true` documents before it becomes `expired` (never sent)',
  },
  DOCUMENT_RETENTION_DAYS: {
    schema: z.coerce.number().int().min(0).max(36_500).default(30),
    doc:
      'days after a referral closes (completed, rejected, failed or cancelled, with nothing left to send) when the gateway deletes its inline document bytes, ' +
      "keeping each document's size and SHA-256; 0 keeps them. See Retention below",
  },
  REFERRAL_RETENTION_DAYS: {
    schema: z.coerce.number().int().min(0).max(36_500).default(0),
    shownDefault: '0 (never)',
    doc: 'days after a referral closes when it is deleted with its history; must not be shorter than `DOCUMENT_RETENTION_DAYS`',
  },
  RETENTION_CRON: {
    schema: cron.default('17 3 * * *'),
    shownDefault: '`17 3 * * *` (03:17 daily)',
    doc: 'when the retention job runs',
  },
  SANDBOX_PROFILE: {
    schema: z.enum(['default', 'medplum', 'hapi', 'strict']).default('default'),
    doc:
      'the built-in sandbox behaves as `medplum` (1 MB JSON cap, empty answer to `Prefer: return=minimal`, non-atomic transactions, ' +
      'a 409 on one entry under concurrent transactions, server UUIDs only, no search on Binary, presigned Binary URLs on a second loopback port), ' +
      '`hapi` (numeric client ids refused, opaque `_getpages` paging, 409 on a stale If-Match) or `strict` (all of them, atomic with the 8-entry ' +
      'strict-isolation limit); the sandbox destination gets the matching profile. `npm run sandbox` reads it too. ' +
      '`docs/sandbox-profiles.md` lists each trait with its source',
  },
  SANDBOX_TRAITS: {
    schema: z.string().optional(),
    doc: 'traits switched over the profile, e.g. `nonAtomic=false,strictIsolationMaxEntries=8` (a Medplum project with real transactions) or `-emptyMinimal`',
  },
  CONSOLE_ENABLED: {
    schema: z.enum(['true', 'false'], { message: 'must be true or false' }).optional(),
    shownDefault: '`true`, `false` in production',
    doc: 'serves the browser console at `/console` (sign-in with an API key or `ADMIN_API_KEY`); production refuses it unless this is `true`. See docs/console.md',
  },
  CONSOLE_SESSION_IDLE_MINUTES: {
    schema: z.coerce.number().int().min(1).max(1440).default(30),
    doc: 'a console session ends after this many minutes without a request',
  },
  CONSOLE_SESSION_MAX_HOURS: {
    schema: z.coerce.number().int().min(1).max(168).default(12),
    doc: 'a console session ends this many hours after sign-in, however active',
  },
  CONSOLE_REFRESH_SECONDS: {
    schema: z.coerce.number().int().min(1).max(300).default(1),
    doc:
      "how often the console's list and destinations pages refresh (htmx polling); an open referral's page waits on the server for its next change, " +
      'looked for this often (at once when this instance made it)',
  },
  CONSOLE_CENTRE_DESK: {
    schema: z.enum(['true', 'false'], { message: 'must be true or false' }).optional(),
    shownDefault: '`true` with the sandbox, else `false`',
    doc:
      "the console's centre desk (admin only): the Tasks waiting at each destination and buttons that accept, reject, hold, start or complete them " +
      "with plain FHIR REST on the centre's server, using the gateway's credentials for it",
  },
} satisfies Record<string, Variable>;

type Declared = typeof variables;

/** The declarations loadConfig parses (those with a schema), by name. */
type Parsed = {
  [K in keyof Declared as Declared[K] extends { schema: z.ZodType } ? K : never]: Declared[K] extends { schema: infer S extends z.ZodType } ? S : never;
};

const parsedDeclarations = Object.entries(variables as Record<string, Variable>).flatMap(([name, v]) => (v.schema ? [[name, v.schema] as const] : []));

/** The environment as loadConfig reads it, built from the declarations. */
export const envSchema = z.object(Object.fromEntries(parsedDeclarations) as Parsed);

export type Env = z.output<typeof envSchema>;
export type EnvName = keyof Env & string;
