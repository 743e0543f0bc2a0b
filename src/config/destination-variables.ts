import { destinationSchema } from './destinations';

// Apart from config.ts so that the variable declarations (variables.ts) can list these names without a cycle.

/** Destination options with a variable of their own elsewhere (FHIR_BASE_URL, FHIR_AUTH..., FHIR_ORGANIZATION_*, FHIR_TIMEOUT_MS). */
// `type` too: the destination FHIR_BASE_URL defines is a FHIR server by definition.
export const OWN_VARIABLES = new Set(['type', 'id', 'baseUrl', 'auth', 'organization', 'timeoutMs']);

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
