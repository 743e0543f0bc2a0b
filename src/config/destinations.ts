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
  maxCooldownMs: z
    .number()
    .int()
    .min(10)
    .max(24 * 3_600_000)
    .default(600_000),
});

export const destinationSchema = z.strictObject({
  /** The kind of destination (its adapter in src/destinations); `fhir`, the default, is the only kind so far. */
  type: z.literal('fhir').optional(),
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
   * Which kind of server this is. It fills in the defaults of the settings below that are not given
   * (see `serverProfileDefaults`): `generic` (any R4 server, today's behaviour), `medplum` (Medplum: raw
   * Binary uploads with server ids, no `Prefer: return=minimal`, conditional entries resolved by search
   * first, JSON bodies under 1 MB, presigned attachment URLs), `hapi` (HAPI FHIR: raw Binary uploads with
   * stable client ids).
   */
  profile: z.enum(['generic', 'medplum', 'hapi']).optional(),
  /**
   * How a document larger than `maxInlineBytes` reaches the centre:
   * - `raw`: uploaded before the transaction as a raw `Binary` (the document's own Content-Type, the bytes as
   *   the body): `PUT Binary/<stable id>` when `clientIds` is true, otherwise `POST Binary` whose returned id is
   *   recorded before the transaction is sent, so a resend reuses it. The DocumentReference points at
   *   `Binary/<id>`. Works on Medplum, HAPI and any server that accepts raw Binary.
   * - `put`: inside the transaction, `PUT Binary/<id>` with an id derived from referral + document number
   *   (update-as-create). Needs a server that accepts client-assigned ids (HAPI, Firely, Azure, the sandbox).
   * - `conditional-create`: inside the transaction, `POST Binary` with a `meta.tag` unique to referral +
   *   document and `ifNoneExist: _tag=system|code`. Needs `_tag` search on Binary (HAPI; not Medplum).
   */
  binaryMode: z.enum(['raw', 'put', 'conditional-create']).optional(),
  /** The server accepts client-assigned ids (`PUT Type/<id>` creating the resource). Default true; Medplum false. */
  clientIds: z.boolean().optional(),
  /**
   * Largest JSON request body the server takes, in bytes (Medplum: `maxJsonSize`, 1 MB by default). The
   * gateway uploads documents raw until the transaction fits, and fails clearly if it cannot.
   */
  maxJsonBytes: z.number().int().min(1024).optional(),
  /**
   * Send transactions with `Prefer: return=minimal`. Default true (generic); false for Medplum, which answers
   * it with an empty 200. An empty answer is in any case confirmed by reading the resources back.
   */
  preferMinimal: z.boolean().optional(),
  /**
   * `conditional` (default): every entry of the referral's transaction is a conditional create (`ifNoneExist`
   * on a business identifier). `resolve-first`: the gateway searches those identifiers first (one batch
   * request), references what exists and creates the rest with plain POSTs, so the transaction has no
   * conditional entries (Medplum projects with real transactions refuse conditional transactions of more
   * than 8 entries) and a resend after a partial failure reuses what the centre already holds.
   */
  transactionMode: z.enum(['conditional', 'resolve-first']).optional(),
  /**
   * After a delivery, read back what the centre holds (the Task's focus and basedOn resolve to the recorded
   * ServiceRequest; every DocumentReference has its data or a resolvable URL), repair what is broken, and
   * never report `sent` over a broken referral. `true` (default): whenever the answer leaves any doubt, i.e.
   * unless every entry answered `201 Created` in one transaction (an entry matched an existing resource, an
   * earlier attempt failed part-way, the answer was empty, entries were resolved by search); `'always'`:
   * after every delivery; `false`: never.
   */
  verifyDelivery: z.union([z.boolean(), z.literal('always')]).optional(),
  /**
   * Attachment URLs outside the FHIR base (presigned storage URLs, as Medplum returns) are fetched WITHOUT the
   * gateway's credentials when their origin is listed here, or (with `presignedUrls`) when they are on the
   * base's own host name. Anything else outside the base is refused.
   */
  attachmentOrigins: z.array(z.url()).optional(),
  /** Fetch presigned attachment URLs on the base's host name without credentials. Default false; Medplum true. */
  presignedUrls: z.boolean().optional(),
  /**
   * What delivery does when the centre already holds a Patient with the referral's identifier (the one its
   * Patient entry is matched on) whose birth date, administrative gender or family name differs from the
   * referral's (src/delivery/patient-match.ts has the comparison rules):
   * - `hold` (default): nothing is written at the centre; the referral becomes `delivery-failed` with a reason
   *   naming the fields that differ (not their values), is not retried, and can be re-queued by an operator
   *   (POST /admin/deliveries/{id}/retry) once the identifier or the centre's Patient is put right;
   * - `new-patient`: the referral is sent with a Patient of its own, created without the colliding
   *   identifier and matched instead on a gateway identifier scoped to the sending client (so the sender's
   *   later referrals for the same patient reuse it); a warning is logged and the referral's history says so.
   */
  patientMismatch: z.enum(['hold', 'new-patient']).optional(),
  /** node-cron expression for polling this destination's Tasks; the service default applies when absent. */
  pollCron: z.string().optional(),
  circuitBreaker: circuitBreakerSchema.optional(),
});

export type DestinationAuth = z.output<typeof destinationAuthSchema>;
export type Destination = z.output<typeof destinationSchema>;
export type SmartBackendAuth = z.output<typeof smartBackendAuthSchema>;
export type CircuitBreakerSettings = z.output<typeof circuitBreakerSchema>;

/** The settings a destination's profile fills in when the destination does not give them. */
export interface DestinationSettings {
  profile: NonNullable<Destination['profile']>;
  binaryMode: NonNullable<Destination['binaryMode']>;
  clientIds: boolean;
  maxJsonBytes: number | undefined;
  preferMinimal: boolean;
  transactionMode: NonNullable<Destination['transactionMode']>;
  verifyDelivery: boolean | 'always';
  presignedUrls: boolean;
  attachmentOrigins: string[];
  patientMismatch: NonNullable<Destination['patientMismatch']>;
}

type ProfileDefaults = Omit<DestinationSettings, 'profile' | 'attachmentOrigins'>;

/** Defaults per server profile (docs/for-cancer-centres.md explains each). */
export const serverProfileDefaults: Record<DestinationSettings['profile'], ProfileDefaults> = {
  generic: {
    binaryMode: 'put',
    clientIds: true,
    maxJsonBytes: undefined,
    preferMinimal: true,
    transactionMode: 'conditional',
    verifyDelivery: true,
    presignedUrls: false,
    patientMismatch: 'hold',
  },
  medplum: {
    binaryMode: 'raw',
    clientIds: false,
    // Medplum's maxJsonSize default is '1mb' (1,048,576 bytes); stay a little under it.
    maxJsonBytes: 1_000_000,
    preferMinimal: false,
    transactionMode: 'resolve-first',
    verifyDelivery: true,
    presignedUrls: true,
    patientMismatch: 'hold',
  },
  hapi: {
    binaryMode: 'raw',
    clientIds: true,
    maxJsonBytes: undefined,
    preferMinimal: true,
    transactionMode: 'conditional',
    verifyDelivery: true,
    presignedUrls: false,
    patientMismatch: 'hold',
  },
};

/** A destination's effective settings: what it sets, else its profile's default. */
export function destinationSettings(d: Partial<Pick<Destination, keyof DestinationSettings>>): DestinationSettings {
  const profile = d.profile ?? 'generic';
  const base = serverProfileDefaults[profile];
  return {
    profile,
    binaryMode: d.binaryMode ?? base.binaryMode,
    clientIds: d.clientIds ?? base.clientIds,
    maxJsonBytes: d.maxJsonBytes ?? base.maxJsonBytes,
    preferMinimal: d.preferMinimal ?? base.preferMinimal,
    transactionMode: d.transactionMode ?? base.transactionMode,
    verifyDelivery: d.verifyDelivery ?? base.verifyDelivery,
    presignedUrls: d.presignedUrls ?? base.presignedUrls,
    attachmentOrigins: d.attachmentOrigins ?? [],
    patientMismatch: d.patientMismatch ?? base.patientMismatch,
  };
}

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
    throw new Error(`DESTINATIONS_FILE ${path}: not valid JSON (${(err as Error).message})`, { cause: err });
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

/** The destinations a referral can be routed to (the gateway's Directory implements it). */
export interface DestinationDirectory {
  ids(): string[];
  get(id: string): Destination | undefined;
}
