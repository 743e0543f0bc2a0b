import type { Binary, BundleEntry } from '@medplum/fhirtypes';
import { destinationSettings } from '../../config';
import type { Destination } from '../../config';
import { base64Length } from '../../blobs';
import { StreamedString } from '../../json';
import { inlineDocumentsOverLimit, documentIdentifierValue, GATEWAY_TAG, entryFullUrl } from '../../mapping';
import type { BlobRef, ReferralDocument } from '../../model';

/** `Binary.meta.tag` system whose code names the referral document a Binary carries (`<referralId>/document/<n>`). */
export const BINARY_DOCUMENT_TAG_SYSTEM = 'https://referral-gateway.dev/fhir/CodeSystem/document-binary';

export type BinaryMode = NonNullable<Destination['binaryMode']>;

export interface BinaryPlan {
  /** For the mapper: the URL each large document's attachment points at, keyed by index in `documents`. */
  attachmentUrls: Record<number, string>;
  /** Binary entries to add to the same transaction. */
  entries: BundleEntry<Binary>[];
  /** Documents (indexes in `documents`) to upload as raw Binary before the transaction (binaryMode raw). */
  raw: number[];
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
 * `data` is the referral's own base64 string (not a copy); the request body streams it (src/fhir/client.ts). A
 * document whose bytes are in the blob store (`blob`, no `data`) is uploaded raw whatever the profile's default mode,
 * unless the destination sets `binaryMode` itself; then, in put and conditional-create, it gets `blobData(blob)`: a
 * StreamedString that encodes the bytes to base64 as the request is sent (never the whole in memory).
 */
export function planBinaries(args: {
  referralId: string;
  documents: ReadonlyArray<ReferralDocument>;
  /** How many documents came before these (0 for the referral's own). */
  startIndex: number;
  destination: Pick<Destination, 'maxInlineBytes' | 'baseUrl' | 'binaryMode' | 'profile'>;
  /** Documents already chosen for raw upload (e.g. to fit the server's JSON body cap), whatever their size. */
  alsoRaw?: ReadonlyArray<number>;
  /** The base64 of a document in the blob store, streamed when the transaction is sent (put and conditional-create). */
  blobData?: (blob: BlobRef) => StreamedString;
}): BinaryPlan {
  const mode: BinaryMode = destinationSettings(args.destination).binaryMode;
  const plan: BinaryPlan = { attachmentUrls: {}, entries: [], raw: [] };
  const alsoRaw = new Set(args.alsoRaw ?? []);
  for (const i of inlineDocumentsOverLimit(args.documents, args.destination.maxInlineBytes)) {
    // A streamed document goes raw (never base64) unless the destination asks otherwise in its own settings: the
    // profile's default (generic: put) is for inline documents, which are base64 already.
    const streamedRaw = args.documents[i].blob !== undefined && args.destination.binaryMode === undefined;
    if (mode === 'raw' || streamedRaw || alsoRaw.has(i)) {
      plan.raw.push(i);
      alsoRaw.delete(i);
      continue;
    }
    const doc = args.documents[i];
    const n = args.startIndex + i + 1;
    const code = documentIdentifierValue(args.referralId, n);
    const fullUrl = entryFullUrl(args.referralId, `binary/${n}`);
    const resource: Binary = {
      resourceType: 'Binary',
      meta: { tag: [{ ...GATEWAY_TAG }, { system: BINARY_DOCUMENT_TAG_SYSTEM, code }] },
      contentType: doc.contentType,
      data: doc.data ?? streamedData(doc, args.blobData),
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
  for (const i of alsoRaw) {
    const doc = args.documents[i];
    if (doc?.data !== undefined || doc?.blob !== undefined) plan.raw.push(i);
  }
  plan.raw.sort((a, b) => a - b);
  return plan;
}

/** A blob document's Binary.data: its base64 streamed from the blob store (typed as the string it stands for). */
function streamedData(doc: ReferralDocument, blobData: ((blob: BlobRef) => StreamedString) | undefined): string {
  if (!doc.blob || !blobData) throw new Error('a document over the inline limit has neither data nor a readable blob');
  return blobData(doc.blob) as unknown as string;
}

/**
 * The size of `value` as JSON, in bytes, without building the whole string: long strings (base64 document
 * data) are counted, not copied, and a StreamedString (a blob document's base64, not in memory) by its length.
 */
export function estimateJsonBytes(value: unknown): number {
  let long = 0;
  const skeleton = JSON.stringify(value, (_key, v: unknown) => {
    if (v instanceof StreamedString || (typeof v === 'string' && v.length >= 65_536)) {
      long += v.length;
      return '';
    }
    return v;
  });
  return Buffer.byteLength(skeleton, 'utf8') + long;
}

/**
 * Which more documents must leave the transaction (uploaded raw) for it to fit `maxJsonBytes`: the largest
 * inline ones first, until the estimate fits. `undefined` when even without every inline document it would
 * not fit.
 */
export function documentsToMoveOut(
  documents: ReadonlyArray<ReferralDocument>,
  alreadyOut: ReadonlySet<number>,
  bundleBytes: number,
  maxJsonBytes: number
): number[] | undefined {
  if (bundleBytes <= maxJsonBytes) return [];
  // A document in the blob store counts with the base64 it would be in the transaction.
  const candidates = documents
    .map((d, i) => ({ i, len: d.data?.length ?? (d.blob ? base64Length(d.blob.bytes) : 0) }))
    .filter((c) => c.len > 0 && !alreadyOut.has(c.i))
    .sort((a, b) => b.len - a.len);
  const out: number[] = [];
  let size = bundleBytes;
  for (const c of candidates) {
    if (size <= maxJsonBytes) break;
    out.push(c.i);
    // The data leaves; its Binary entry (put/conditional-create modes) would too. A URL of ~60 bytes replaces it.
    size -= c.len;
  }
  return size <= maxJsonBytes ? out : undefined;
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
