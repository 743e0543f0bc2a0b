import { readFileSync, existsSync } from 'node:fs';
import { z } from 'zod';

/** How the gateway authenticates to a destination FHIR server. Secrets are named by env variable. */
export const destinationAuthSchema = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('none') }),
  z.strictObject({ type: z.literal('basic'), usernameEnv: z.string().min(1), passwordEnv: z.string().min(1) }),
  z.strictObject({ type: z.literal('bearer'), tokenEnv: z.string().min(1) }),
  z.strictObject({
    type: z.literal('client-credentials'),
    tokenUrl: z.url(),
    clientIdEnv: z.string().min(1),
    clientSecretEnv: z.string().min(1),
    scope: z.string().optional(),
  }),
]);

export const destinationSchema = z.strictObject({
  id: z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'lower-case letters, digits and -'),
  name: z.string().min(1),
  /** The centre's own Organization identifier, used as ServiceRequest.performer / Task.owner. */
  organization: z.strictObject({ system: z.string().min(1), value: z.string().min(1) }),
  baseUrl: z.url(),
  auth: destinationAuthSchema.default({ type: 'none' }),
  timeoutMs: z.number().int().min(100).max(600_000).default(30_000),
  maxInlineBytes: z.number().int().min(0).default(1_048_576),
  pollCron: z.string().optional(),
});

export type DestinationAuth = z.output<typeof destinationAuthSchema>;
export type Destination = z.output<typeof destinationSchema>;

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
