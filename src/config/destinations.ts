import { readFileSync, existsSync } from 'node:fs';
import { z } from 'zod';

const envName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]{0,127}$/, 'must be an environment variable name');

/**
 * SMART Backend Services (client_credentials with a JWT client assertion, RFC 7523 / SMART App Launch
 * "backend services"). The private key is read from a PEM file or from an environment variable holding
 * the PEM; exactly one of the two is given. Only `alg` RS384 and ES384 are accepted (SMART requires a
 * server to support both).
 */
export const smartBackendAuthSchema = z
  .strictObject({
    type: z.literal('smart-backend'),
    tokenUrl: z.url(),
    clientIdEnv: envName,
    privateKeyEnv: envName.optional(),
    privateKeyFile: z.string().min(1).optional(),
    alg: z.enum(['RS384', 'ES384']),
    /** JWK `kid` of the key as registered at the centre (its JWKS); put in the JWT header. */
    kid: z.string().min(1).max(256).optional(),
    scope: z.string().min(1),
  })
  .refine((a) => (a.privateKeyEnv === undefined) !== (a.privateKeyFile === undefined), {
    message: 'give exactly one of privateKeyEnv and privateKeyFile',
    path: ['privateKeyEnv'],
  });

/** How the gateway authenticates to a destination FHIR server. Secrets are named by env variable, never stored here. */
export const destinationAuthSchema = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('none') }),
  z.strictObject({ type: z.literal('basic'), usernameEnv: envName, passwordEnv: envName }),
  z.strictObject({ type: z.literal('bearer'), tokenEnv: envName }),
  z.strictObject({
    type: z.literal('client-credentials'),
    tokenUrl: z.url(),
    clientIdEnv: envName,
    clientSecretEnv: envName,
    scope: z.string().optional(),
  }),
  smartBackendAuthSchema,
]);

/** Per-destination circuit breaker (src/delivery/circuit.ts). */
export const circuitBreakerSchema = z.strictObject({
  /** Consecutive retryable failures that open the circuit. */
  failureThreshold: z.number().int().min(1).max(1000).default(5),
  /** First open period; doubles after each failed probe. */
  cooldownMs: z.number().int().min(10).max(3_600_000).default(30_000),
  /** Longest open period. */
  maxCooldownMs: z.number().int().min(10).max(24 * 3_600_000).default(600_000),
});

export const destinationSchema = z.strictObject({
  id: z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'lower-case letters, digits and -'),
  name: z.string().min(1),
  /** The centre's own Organization identifier, used as ServiceRequest.performer / Task.owner. */
  organization: z.strictObject({ system: z.string().min(1), value: z.string().min(1) }),
  baseUrl: z.url(),
  auth: destinationAuthSchema.default({ type: 'none' }),
  /** Timeout of one HTTP request to the destination (and its token endpoint). */
  timeoutMs: z.number().int().min(100).max(600_000).default(30_000),
  /** Documents larger than this (decoded bytes) are sent as Binary resources instead of inline data. */
  maxInlineBytes: z.number().int().min(0).default(1_048_576),
  /**
   * How a Binary for a large document is written inside the transaction:
   * - `put` (default): `PUT Binary/<id>` with an id derived from referral + document number (update-as-create,
   *   idempotent even under races; the DocumentReference points at `Binary/<id>`). Needs a server that accepts
   *   client-assigned ids (HAPI, Firely, Azure, the sandbox).
   * - `conditional-create`: `POST Binary` with a `meta.tag` unique to referral + document and
   *   `ifNoneExist: _tag=system|code`; the DocumentReference points at the entry's urn:uuid, which the server
   *   rewrites. Needs `_tag` search on Binary (HAPI; not the sandbox, whose Binary has no search parameters).
   */
  binaryMode: z.enum(['put', 'conditional-create']).optional(),
  /** node-cron expression for polling this destination's Tasks; the service default applies when absent. */
  pollCron: z.string().optional(),
  circuitBreaker: circuitBreakerSchema.optional(),
});

export type DestinationAuth = z.output<typeof destinationAuthSchema>;
export type Destination = z.output<typeof destinationSchema>;
export type SmartBackendAuth = z.output<typeof smartBackendAuthSchema>;
export type CircuitBreakerSettings = z.output<typeof circuitBreakerSchema>;

export const destinationsFileSchema = z.strictObject({
  destinations: z.array(destinationSchema),
});

/** Reads a destinations file; a missing file means no destinations. Throws with a message naming the problem. */
export function loadDestinationsFile(path: string): Destination[] {
  if (!existsSync(path)) {
    return [];
  }
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`DESTINATIONS_FILE ${path}: not valid JSON (${(err as Error).message})`);
  }
  const parsed = destinationsFileSchema.safeParse(raw);
  if (!parsed.success) {
    const first = parsed.error.issues[0];
    throw new Error(`DESTINATIONS_FILE ${path}: ${first.path.join('.')} ${first.message}`);
  }
  const ids = new Set<string>();
  for (const d of parsed.data.destinations) {
    if (ids.has(d.id)) {
      throw new Error(`DESTINATIONS_FILE ${path}: duplicate destination id ${d.id}`);
    }
    ids.add(d.id);
  }
  return parsed.data.destinations;
}
