import { z } from 'zod';

/**
 * The public shape of a referral as an EHR submits it (see shared/api-contract.md).
 * The same schema validates requests and types the code.
 */

const isoDate = z
  .string()
  .regex(/^\d{4}-\d{2}-\d{2}$/, 'must be a date as YYYY-MM-DD')
  .refine((s) => {
    const d = new Date(`${s}T00:00:00Z`);
    return !Number.isNaN(d.getTime()) && d.toISOString().slice(0, 10) === s;
  }, 'is not a real calendar date')
  .refine((s) => s >= '1900-01-01', 'is before 1900');

const notFuture = (s: string): boolean => s <= new Date(Date.now() + 24 * 3600 * 1000).toISOString().slice(0, 10);

const pastDate = isoDate.refine(notFuture, 'is in the future');

const nonEmpty = z.string().trim().min(1, 'must not be empty').max(1000);

export const codingSchema = z.strictObject({
  system: z.url({ message: 'must be a URI (e.g. http://snomed.info/sct)' }).or(z.string().regex(/^urn:(oid|uuid):\S+$/)),
  code: z.string().trim().min(1).max(200),
  display: z.string().max(500).optional(),
});

export const identifierSchema = z.strictObject({
  system: z.url({ message: 'must be a URI' }).or(z.string().regex(/^urn:(oid|uuid):\S+$/, 'must be a URI')),
  value: z.string().trim().min(1).max(200),
});

export const humanNameSchema = z.strictObject({
  given: z.array(nonEmpty).min(1).max(5),
  family: nonEmpty,
  prefix: z.array(nonEmpty).max(3).optional(),
});

export const referralKinds = ['second-opinion', 'expert-opinion', 'tumour-board-review'] as const;
export const priorities = ['routine', 'urgent', 'asap', 'stat'] as const;
export const reasonCodes = [
  'diagnosis-uncertain',
  'treatment-plan-review',
  'rare-or-complex-cancer',
  'treatment-options',
  'clinical-trial-eligibility',
  'patient-preference',
] as const;
export const documentKinds = [
  'pathology-report',
  'imaging-report',
  'imaging-study',
  'genomic-report',
  'lab-report',
  'discharge-summary',
  'treatment-summary',
  'clinical-note',
  'other',
] as const;
export const treatmentTypes = [
  'surgery',
  'radiotherapy',
  'chemotherapy',
  'immunotherapy',
  'targeted-therapy',
  'hormone-therapy',
  'stem-cell-transplant',
  'other',
] as const;

/** Base64 characters checked per step (a multiple of 4, so every slice but the last decodes on its own). */
const BASE64_SLICE_CHARS = 4 * 1024 * 1024;
let base64Scratch: Buffer | undefined;

/**
 * Whether `s` is canonical base64 (RFC 4648 section 4: A-Z a-z 0-9 + /, padded to a multiple of 4, `=` only at
 * the end), as FHIR base64Binary requires. Checked without a decoded copy: slices of at most 4 MiB are decoded
 * into one reused 3 MiB scratch buffer, and Node's decoder, which skips whitespace and characters outside the
 * alphabet and stops at padding, then writes fewer bytes than the canonical length gives. It accepts the
 * URL-safe alphabet too, so `-` and `_` are looked for separately. About ten times faster than a regular
 * expression over a 20 MB document, and it allocates nothing per call.
 */
export function isBase64(s: string): boolean {
  if (s.length % 4 !== 0) return false;
  if (s.length === 0) return true;
  base64Scratch ??= Buffer.allocUnsafe((BASE64_SLICE_CHARS / 4) * 3);
  for (let start = 0; start < s.length; start += BASE64_SLICE_CHARS) {
    const slice = s.length <= BASE64_SLICE_CHARS ? s : s.slice(start, start + BASE64_SLICE_CHARS);
    const last = start + BASE64_SLICE_CHARS >= s.length;
    const padding = last ? base64Padding(slice) : 0;
    if (base64Scratch.write(slice, 'base64') !== (slice.length / 4) * 3 - padding) return false;
  }
  return s.indexOf('-') < 0 && s.indexOf('_') < 0;
}

/** The number of `=` padding characters that end a base64 string (0, 1 or 2). */
function base64Padding(s: string): number {
  if (s.endsWith('==')) return 2;
  return s.endsWith('=') ? 1 : 0;
}

const base64 = z.string().min(1, 'must not be empty').refine(isBase64, 'is not valid base64');

/** A hex SHA-256 digest (64 characters; upper case is read as lower). */
export const sha256Hex = z
  .string()
  .regex(/^[0-9a-fA-F]{64}$/, 'must be a SHA-256 digest as 64 hex characters')
  .transform((s) => s.toLowerCase());

/** A multipart file part's name: what a document's `file` names. */
const partName = z
  .string()
  .min(1)
  .max(100)
  .regex(/^[\w.:-]+$/, 'may hold letters, digits and . _ : - only');

/**
 * DICOM modality codes a `study` may name (DCM, http://dicom.nema.org/resources/ontology/DCM): CID 29 "Acquisition
 * Modality", the value set FHIR R4 binds ImagingStudy.modality to (extensible), plus the CID 33 modalities a cancer
 * referral's study may hold besides images (radiotherapy objects, segmentations, structured reports, key images,
 * presentation states, encapsulated documents). Their displays are in mappings/imaging.json.
 */
export const dicomModalities = [
  'AR',
  'BDUS',
  'BMD',
  'CR',
  'CT',
  'DX',
  'ECG',
  'EPS',
  'ES',
  'GM',
  'HD',
  'IO',
  'IVOCT',
  'IVUS',
  'KER',
  'LEN',
  'MG',
  'MR',
  'NM',
  'OAM',
  'OCT',
  'OP',
  'OPM',
  'OPT',
  'OPTBSV',
  'OPTENF',
  'OPV',
  'OSS',
  'PA',
  'PT',
  'PX',
  'RF',
  'RG',
  'SM',
  'SRF',
  'US',
  'VA',
  'XA',
  'XC',
  'RTIMAGE',
  'RTDOSE',
  'RTSTRUCT',
  'RTPLAN',
  'SEG',
  'SR',
  'KO',
  'PR',
  'DOC',
] as const;

/** A DICOM UID (PS3.5 section 9.1): numeric components separated by dots, no leading zeros, at most 64 characters. */
export const dicomUid = z
  .string()
  .max(64, 'must be a DICOM UID of at most 64 characters')
  .regex(/^(0|[1-9]\d*)(\.(0|[1-9]\d*))+$/, 'must be a DICOM UID: numbers separated by dots, without leading zeros (e.g. 1.2.840.113619.2.55.3)');

/** A FHIR dateTime as a sender gives a study's start: a date, or a date and time with seconds and a zone; not in the future. */
const pastDateTime = z
  .string()
  .regex(
    /^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2}))?$/,
    'must be a date (YYYY-MM-DD) or a date and time with a zone (YYYY-MM-DDThh:mm:ssZ or +hh:mm)'
  )
  .refine((s) => isoDate.safeParse(s.slice(0, 10)).success && !Number.isNaN(Date.parse(s.length === 10 ? `${s}T00:00:00Z` : s)), 'is not a real date and time')
  .refine((s) => (s.length === 10 ? notFuture(s) : Date.parse(s) <= Date.now() + 24 * 3600 * 1000), 'is in the future');

/**
 * An imaging study (DICOM): what becomes an ImagingStudy at the centre. Alone it is a DICOMweb reference (the
 * document's source: `endpoint` is then required, the centre retrieves the study by WADO-RS); next to DICOM bytes
 * (`data`, `url`, `file` or `upload` with contentType application/dicom or application/zip) it describes them, and
 * `endpoint` is optional.
 */
export const studySchema = z
  .strictObject({
    /** The WADO-RS base URL of the PACS (DICOMweb), e.g. https://pacs.example.org/dicom-web. */
    endpoint: z
      .url({ protocol: /^https?$/, message: 'must be an http(s) URL (the DICOMweb WADO-RS base)' })
      .max(2000)
      .optional(),
    studyInstanceUid: dicomUid,
    modalities: z.array(z.enum(dicomModalities)).min(1, 'at least one DICOM modality code is required (e.g. CT)').max(20),
    seriesCount: z.int().min(1).max(100000),
    instanceCount: z.int().min(1).max(10000000).optional(),
    description: nonEmpty.optional(),
    started: pastDateTime.optional(),
  })
  .superRefine((study, ctx) => {
    if (new Set(study.modalities).size !== study.modalities.length) {
      ctx.addIssue({ code: 'custom', path: ['modalities'], message: 'lists a modality twice' });
    }
    if (study.instanceCount !== undefined && study.instanceCount < study.seriesCount) {
      ctx.addIssue({ code: 'custom', path: ['instanceCount'], message: 'is smaller than seriesCount (every series holds at least one instance)' });
    }
  });

/** The content types DICOM bytes come as: one DICOM file (Part 10), or a zip of a study's files. */
export const dicomContentTypes = ['application/dicom', 'application/zip'] as const;

/** A content type without its parameters, in lower case (`Application/DICOM; x=y` -> `application/dicom`). */
export function mediaTypeOf(contentType: string): string {
  return contentType.split(';')[0].trim().toLowerCase();
}

/**
 * Where a document's bytes come from; exactly one of them:
 * - `data`: inline base64 (small documents);
 * - `url`: a link the centre follows;
 * - `file`: a file part of the same multipart/form-data request, by name;
 * - `upload: true`: sent afterwards by `PUT /referrals/{id}/documents/{n}/content` (the referral waits in
 *   `awaiting-documents` until every such document has arrived);
 * - `study` alone: a DICOMweb reference (kind `imaging-study`): the centre retrieves the study from `study.endpoint`.
 * A `study` may also accompany DICOM bytes from one of the other four; it then describes them.
 */
export const documentSources = ['data', 'url', 'file', 'upload', 'study'] as const;

/** The sources that carry or point at the bytes themselves (all but `study`). */
const byteSources = ['data', 'url', 'file', 'upload'] as const;

export const documentSchema = z
  .strictObject({
    kind: z.enum(documentKinds),
    title: nonEmpty.max(300),
    date: pastDate.optional(),
    contentType: z.string().regex(/^[\w.+-]+\/[\w.+-]+(;.*)?$/, 'must be a MIME type such as application/pdf'),
    language: z
      .string()
      .regex(/^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$/)
      .optional(),
    data: base64.optional(),
    url: z.url({ protocol: /^https?$/, message: 'must be an http(s) URL' }).optional(),
    file: partName.optional(),
    upload: z.literal(true, { message: 'must be true (the bytes follow by PUT .../content)' }).optional(),
    /** The SHA-256 of the bytes a `file` or `upload` document will carry: checked as they arrive (422 on a mismatch). */
    sha256: sha256Hex.optional(),
    /** An imaging study (kind imaging-study only): a DICOMweb reference alone, or the description of DICOM bytes. */
    study: studySchema.optional(),
  })
  .superRefine((doc, ctx) => {
    const given = byteSources.filter((k) => doc[k] !== undefined);
    if (given.length > 1) {
      ctx.addIssue({ code: 'custom', path: [given[0]], message: `exactly one of data, url, file or upload is allowed (got ${given.join(', ')})` });
    } else if (given.length === 0 && doc.study === undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['data'],
        message: 'one of data (base64), url, file (a multipart part), upload (true) or study (a DICOMweb reference) is required',
      });
    }
    if (doc.sha256 !== undefined && doc.file === undefined && doc.upload === undefined) {
      ctx.addIssue({ code: 'custom', path: ['sha256'], message: 'is only read for a file or upload document (inline data is checked as it is)' });
    }
    if (doc.study !== undefined) {
      checkStudy(doc.kind, mediaTypeOf(doc.contentType), given.length > 0, doc.study.endpoint !== undefined, ctx);
    }
  });

/** The rules a document's `study` adds (see studySchema). */
function checkStudy(kind: string, mediaType: string, hasBytes: boolean, hasEndpoint: boolean, ctx: z.core.$RefinementCtx): void {
  if (kind !== 'imaging-study') {
    ctx.addIssue({ code: 'custom', path: ['study'], message: `is only allowed for kind imaging-study (got ${kind})` });
  }
  if (hasBytes) {
    if (!(dicomContentTypes as readonly string[]).includes(mediaType)) {
      ctx.addIssue({
        code: 'custom',
        path: ['contentType'],
        message: `must be application/dicom or application/zip (a zip of the study) when a study describes the bytes (got ${mediaType})`,
      });
    }
    return;
  }
  if (!hasEndpoint) {
    ctx.addIssue({
      code: 'custom',
      path: ['study', 'endpoint'],
      message: 'is required when the study is the only source (a DICOMweb reference; or send the DICOM bytes by data, url, file or upload)',
    });
  }
  if (mediaType !== 'application/dicom') {
    ctx.addIssue({ code: 'custom', path: ['contentType'], message: `must be application/dicom for a DICOMweb study reference (got ${mediaType})` });
  }
}

export const treatmentSchema = z.strictObject({
  type: z.enum(treatmentTypes),
  description: nonEmpty,
  code: codingSchema.optional(),
  start: pastDate.optional(),
  end: pastDate.optional(),
});

export const referralSchema = z.strictObject({
  externalId: z
    .string()
    .trim()
    .min(1)
    .max(128)
    .regex(/^[\w.:/-]+$/, 'may hold letters, digits and . _ : / - only'),
  kind: z.enum(referralKinds),
  priority: z.enum(priorities).default('routine'),
  destination: z.string().min(1).max(64).optional(),
  reasons: z.array(z.enum(reasonCodes)).max(10).default([]),
  reasonText: z.string().max(4000).optional(),
  questions: z.array(z.string().trim().min(1).max(2000)).max(50).default([]),
  patient: z.strictObject({
    identifiers: z.array(identifierSchema).min(1, 'at least one identifier is required').max(10),
    name: humanNameSchema,
    birthDate: pastDate,
    gender: z.enum(['male', 'female', 'other', 'unknown']),
    phone: z.string().max(50).optional(),
    email: z.email().optional(),
  }),
  referrer: z.strictObject({
    practitioner: z.strictObject({ identifier: identifierSchema, name: humanNameSchema }),
    organization: z.strictObject({ identifier: identifierSchema, name: nonEmpty }),
  }),
  diagnosis: z.strictObject({
    code: codingSchema,
    bodySite: codingSchema.optional(),
    laterality: z.enum(['left', 'right', 'bilateral']).optional(),
    histology: codingSchema.optional(),
    stage: z
      .strictObject({
        system: z.enum(['AJCC-8', 'AJCC-7', 'AJCC-9']).default('AJCC-8'),
        type: z.enum(['clinical', 'pathologic']).optional(),
        value: z.string().trim().min(1).max(20),
      })
      .optional(),
    clinicalStatus: z.enum(['active', 'recurrence', 'remission']).default('active'),
    diagnosedOn: pastDate.optional(),
  }),
  treatmentHistory: z.array(treatmentSchema).max(100).default([]),
  documents: z.array(documentSchema).max(100).default([]),
  /** The contract requires consent and the patient's agreement; the date is given when the sender knows it (the Consent then has a dateTime). */
  consent: z.strictObject({ patientAgreed: z.literal(true, { message: 'the patient must agree to share records (true)' }), date: pastDate.optional() }),
  callbackUrl: z.url({ protocol: /^https?$/, message: 'must be an http(s) URL' }).optional(),
});

export type ReferralInput = z.input<typeof referralSchema>;
export type Referral = Omit<z.output<typeof referralSchema>, 'documents'> & { documents: ReferralDocument[] };
/**
 * A document as stored: as submitted, plus `blob` once its bytes (a `file` part or an `upload`) are in the blob
 * store. `blob` is the gateway's, never read from a submission (the schema is strict).
 */
export type ReferralDocument = z.output<typeof documentSchema> & { blob?: BlobRef };

/**
 * Where a document's bytes are in the blob store (src/blobs): their SHA-256 (hex, the address) and size, and their
 * SHA-1 (base64, FHIR Attachment.hash), hashed as they arrived so that delivery need not read them twice.
 */
export interface BlobRef {
  sha256: string;
  bytes: number;
  sha1: string;
}
export type Coding = z.output<typeof codingSchema>;
/** An imaging study as submitted (a document's `study`). */
export type DocumentStudy = z.output<typeof studySchema>;
