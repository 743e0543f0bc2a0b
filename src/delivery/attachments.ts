import type { Binary, BundleEntry } from '@medplum/fhirtypes';
import type { Destination } from '../config/destinations';
import { inlineDocumentsOverLimit } from '../mapping/bundle';
import { documentIdentifierValue, GATEWAY_TAG } from '../mapping/constants';
import { entryFullUrl } from '../mapping/uuid';
import type { ReferralDocument } from '../referral/schema';

/** `Binary.meta.tag` system whose code names the referral document a Binary carries (`<referralId>/document/<n>`). */
export const BINARY_DOCUMENT_TAG_SYSTEM = 'https://referral-gateway.dev/fhir/CodeSystem/document-binary';

export type BinaryMode = NonNullable<Destination['binaryMode']>;

export interface BinaryPlan {
  /** For the mapper: the URL each large document's attachment points at, keyed by index in `documents`. */
  attachmentUrls: Record<number, string>;
  /** Binary entries to add to the same transaction. */
  entries: BundleEntry<Binary>[];
}

/**
 * Large documents travel as Binary resources in the same transaction as their DocumentReferences
 * (domain.md §6.4): every document whose decoded size is above `destination.maxInlineBytes` gets a Binary
 * entry, and its DocumentReference attachment carries a `url` instead of `data` (with `size` and SHA-1 `hash`,
 * which the mapper computes as for inline data).
 *
 * A resend must not create a second Binary, so each entry is idempotent by itself:
 * - `put` (default): `PUT Binary/<id>`, the id derived from referral id and document number (update as create;
 *   a resend writes the same content again as a new version of the same Binary; unlike a conditional create it
 *   is also safe when two requests race). The attachment URL is the literal `Binary/<id>`, so it does not rely
 *   on the server rewriting placeholders outside `Reference.reference` (domain.md §6.2).
 * - `conditional-create`: `POST Binary` with `meta.tag` = (BINARY_DOCUMENT_TAG_SYSTEM, `<referralId>/document/<n>`)
 *   and `ifNoneExist: _tag=<system>|<code>`; the attachment URL is the entry's `urn:uuid`, which the server
 *   rewrites to `Binary/<id>` (HAPI rewrites whole-value uri/url placeholders; so does the sandbox). For servers
 *   without client-assigned ids; the server must support `_tag` on Binary (the sandbox does not).
 *
 * `data` is the referral's own base64 string (not a copy); the request body streams it (src/fhir/client.ts).
 */
export function planBinaries(args: {
  referralId: string;
  documents: ReadonlyArray<ReferralDocument>;
  /** How many documents came before these (0 for the referral's own). */
  startIndex: number;
  destination: Pick<Destination, 'maxInlineBytes' | 'baseUrl' | 'binaryMode'>;
}): BinaryPlan {
  const mode: BinaryMode = args.destination.binaryMode ?? 'put';
  const plan: BinaryPlan = { attachmentUrls: {}, entries: [] };
  for (const i of inlineDocumentsOverLimit(args.documents, args.destination.maxInlineBytes)) {
    const doc = args.documents[i];
    const n = args.startIndex + i + 1;
    const code = documentIdentifierValue(args.referralId, n);
    const fullUrl = entryFullUrl(args.referralId, `binary/${n}`);
    const resource: Binary = {
      resourceType: 'Binary',
      meta: { tag: [{ ...GATEWAY_TAG }, { system: BINARY_DOCUMENT_TAG_SYSTEM, code }] },
      contentType: doc.contentType,
      data: doc.data,
    };
    if (mode === 'put') {
      const id = binaryId(args.referralId, n);
      plan.attachmentUrls[i] = `Binary/${id}`;
      plan.entries.push({
        fullUrl: `${args.destination.baseUrl.replace(/\/+$/, '')}/Binary/${id}`,
        resource: { ...resource, id },
        request: { method: 'PUT', url: `Binary/${id}` },
      });
    } else {
      plan.attachmentUrls[i] = fullUrl;
      plan.entries.push({
        fullUrl,
        resource,
        request: { method: 'POST', url: 'Binary', ifNoneExist: binaryTagQuery(code) },
      });
    }
  }
  return plan;
}

/** The client-assigned id of the Binary for document `n` of a referral: `rg-` + a name-based UUID (41 characters). */
export function binaryId(referralId: string, n: number): string {
  // Not purely numeric (HAPI refuses numeric client ids) and stable across resends and restarts.
  return `rg-${entryFullUrl(referralId, `binary/${n}`).slice('urn:uuid:'.length)}`;
}

/** `_tag=<system>|<code>` for the Binary of one document. */
export function binaryTagQuery(code: string): string {
  return `_tag=${encodeURIComponent(BINARY_DOCUMENT_TAG_SYSTEM)}|${encodeURIComponent(code)}`;
}
