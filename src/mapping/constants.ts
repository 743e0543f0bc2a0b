/**
 * Identifiers and tags the gateway puts on the FHIR resources it creates.
 *
 * These are the contract between the mapper (what we send) and the poller (what we search for), so they
 * are plain constants. mappings/identifier-systems.json holds the same values as data for the loader; a
 * unit test keeps the two in step.
 */

/** `meta.tag` on every referral-specific resource we create; the poller searches `Task?_tag=<system>|<code>`. */
export const GATEWAY_TAG = {
  system: 'https://referral-gateway.dev/fhir/CodeSystem/tags',
  code: 'referral-gateway',
  display: 'Sent by referral-gateway',
} as const;

/** Base of the gateway's own identifier systems. */
export const GATEWAY_IDENTIFIER_BASE = 'https://referral-gateway.dev/fhir/sid/';

/** `ServiceRequest.identifier` and `Task.identifier` (type PLAC) carry the gateway referral id under this system. */
export const REFERRAL_IDENTIFIER_SYSTEM = 'https://referral-gateway.dev/fhir/sid/referral';

/** `DocumentReference.identifier` system; value `<referralId>/document/<n>`, n counting from 1. */
export const DOCUMENT_IDENTIFIER_SYSTEM = 'https://referral-gateway.dev/fhir/sid/document';

/** `identifier.type` of every gateway identifier: v2-0203 PLAC (placer identifier). */
export const PLACER_IDENTIFIER_TYPE = {
  system: 'http://terminology.hl7.org/CodeSystem/v2-0203',
  code: 'PLAC',
  display: 'Placer Identifier',
} as const;

/** The EHR's own referral id (`externalId`) is kept under a system scoped by the EHR client id. */
export function externalIdSystem(clientId: string): string {
  return `${GATEWAY_IDENTIFIER_BASE}client/${encodeURIComponent(clientId)}/external-id`;
}

/** Value of the gateway document identifier for document number `n` (1-based) of a referral. */
export function documentIdentifierValue(referralId: string, n: number): string {
  return `${referralId}/document/${n}`;
}

/** Search string for "our" Tasks at a centre: `Task?_tag=...`. */
export const GATEWAY_TAG_SEARCH = `${GATEWAY_TAG.system}|${GATEWAY_TAG.code}`;
