import { createHash } from 'node:crypto';

/** RFC 4122 name-based UUID, version 5 (SHA-1), lower-case. */
export function uuidV5(name: string, namespace: string): string {
  const ns = Buffer.from(namespace.replace(/-/g, ''), 'hex');
  if (ns.length !== 16) {
    throw new Error(`namespace is not a UUID: ${namespace}`);
  }
  const hash = createHash('sha1').update(ns).update(name, 'utf8').digest();
  const b = hash.subarray(0, 16);
  b[6] = (b[6] & 0x0f) | 0x50;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** RFC 4122 namespace for URLs. */
const URL_NAMESPACE = '6ba7b811-9dad-11d1-80b4-00c04fd430c8';

/** The gateway's namespace for bundle entry ids: uuidV5('https://referral-gateway.dev/fhir/bundle-entry', URL). */
export const ENTRY_NAMESPACE = uuidV5('https://referral-gateway.dev/fhir/bundle-entry', URL_NAMESPACE);

/**
 * The fullUrl of a bundle entry: `urn:uuid:` + a UUID derived from the referral id and the entry's role
 * (e.g. "patient", "document/3"), so mapping the same referral twice gives the same bundle.
 */
export function entryFullUrl(referralId: string, role: string): string {
  return `urn:uuid:${uuidV5(`${referralId}#${role}`, ENTRY_NAMESPACE)}`;
}
