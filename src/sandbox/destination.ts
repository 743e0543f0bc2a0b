import type { Destination } from '../config';

/** The id of the built-in sandbox destination. */
export const SANDBOX_ID = 'sandbox';

/** Where the gateway mounts the built-in sandbox's FHIR R4 base. */
export const SANDBOX_PATH = '/sandbox/fhir/R4';

/** The destination profile that fits each sandbox server profile (the `strict` sandbox needs Medplum's settings and more). */
const PROFILE_FOR_SANDBOX: Record<string, Destination['profile']> = { medplum: 'medplum', hapi: 'hapi', strict: 'medplum' };

/** The destination the gateway adds when none is configured (its built-in sandbox centre), with the settings its profile needs. */
export function sandboxDestination(baseUrl: string, sandboxProfile = 'default'): Destination {
  const profile = PROFILE_FOR_SANDBOX[sandboxProfile];
  return {
    ...(profile ? { profile } : {}),
    id: SANDBOX_ID,
    name: 'Built-in sandbox cancer centre',
    organization: { system: 'https://referral-gateway.dev/fhir/sid/destination', value: SANDBOX_ID },
    baseUrl,
    auth: { type: 'none' },
    timeoutMs: 30_000,
    maxInlineBytes: 1_048_576,
  };
}
