// The schemas of the OpenAPI document. Requests are the zod schemas that validate them; the referral view is the
// zod schema that types it (src/referral/view.ts); answers with no zod schema of their own are declared here, each
// tied at compile time to the type the code answers with, so a changed type fails `tsc` until the document follows.
import type { OperationOutcomeIssue } from '@medplum/fhirtypes';
import { z } from 'zod';
import type { DoctorReport } from '../../doctor';
import { codingSchema, documentSchema, humanNameSchema, identifierSchema, referralSchema, studySchema, treatmentSchema } from '../../model';
import { referralStatusSchema, referralViewSchema, addDocumentsSchema, cancelSchema } from '../../referral';
import { consoleAuditQuery, deliveriesQuery } from '../admin-router';
import { listQuery } from '../referrals-router';
import { webhooksQuery } from '../webhooks-admin-router';
import { hl7StatusMessagesQuery } from '../hl7-return-admin-router';
import type { RetentionRun } from '../../retention';
import type { ConsoleAuditEntry, Hl7ReturnEntry, Hl7ReturnState, OutboxEntry, WebhookEvent, WebhookEntry, WebhookState } from '../../store';

/** Compile-time: A and B have the same shape (each assignable to the other). */
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const same = <A, B>(proof: Same<A, B>): Same<A, B> => proof;

/** The description prefix of everything shared/api-contract.md does not name (the tests look for it). */
export const EXTENSION = 'Extension to the contract (shared/api-contract.md): ';
export const extension = (text: string): { description: string; 'x-extension': true } => ({ description: `${EXTENSION}${text}`, 'x-extension': true });

const dateTime = z.iso.datetime();
const count = z.int().min(0);

// ---- requests: src/model/schema.ts, described here (that module validates; it does not document) ----

const DATE = 'A real calendar date as YYYY-MM-DD, not before 1900-01-01 and not in the future (one day of clock skew is allowed).';
const SYSTEM = { description: 'A URI (e.g. http://snomed.info/sct) or an urn:oid: / urn:uuid: URN.' };
const TRIMMED = { description: 'Trimmed; must not be empty.' };

const rr = referralSchema.shape;
const dx = rr.diagnosis.shape;
const stage = dx.stage.unwrap().shape;
const doc = documentSchema.shape;

/**
 * Metadata for schemas of src/model/schema.ts, by instance: what a refinement checks in code (a real date, base64,
 * exactly one of data or url) in JSON Schema terms, descriptions and examples. An instance used in several fields
 * (the trimmed name string, the past date) is described once for all of them.
 */
export const requestNotes: ReadonlyArray<readonly [z.ZodType, z.core.JSONSchemaMeta]> = [
  [codingSchema, { description: 'A code from a code system (FHIR Coding).' }],
  [codingSchema.shape.system, SYSTEM],
  [identifierSchema, { description: 'A business identifier (FHIR Identifier).' }],
  [identifierSchema.shape.system, SYSTEM],
  [humanNameSchema.shape.family, TRIMMED],
  [rr.patient.shape.birthDate, { format: 'date', description: DATE }],
  [
    documentSchema,
    {
      description:
        'A clinical document sent with the referral. Exactly one of `data` (base64), `url`, `file` (a multipart part) or `upload` (true) is required, ' +
        'or `study` alone (kind imaging-study: a DICOMweb reference the centre retrieves by WADO-RS). A `study` may also describe DICOM bytes given by ' +
        'one of the four (contentType application/dicom, or application/zip for a zip of the study).',
      oneOf: [
        { required: ['data'] },
        { required: ['url'] },
        { required: ['file'] },
        { required: ['upload'] },
        { required: ['study'], not: { anyOf: [{ required: ['data'] }, { required: ['url'] }, { required: ['file'] }, { required: ['upload'] }] } },
      ],
    },
  ],
  [
    doc.study,
    extension(
      'an imaging study (DICOM), only for kind imaging-study: it becomes a FHIR ImagingStudy at the centre (identifier urn:dicom:uid, modalities, ' +
        'series and instance counts), listed in ServiceRequest.supportingInfo and Task.input, with an Endpoint (connection type dicom-wado-rs) for ' +
        '`endpoint`. Alone it is a DICOMweb reference and `endpoint` is required; next to DICOM bytes it describes them and `endpoint` is optional.'
    ),
  ],
  [studySchema.shape.endpoint, { pattern: '^https?://', description: 'The WADO-RS base URL of the PACS (DICOMweb), e.g. https://pacs.example.org/dicom-web.' }],
  [
    studySchema.shape.studyInstanceUid,
    {
      pattern: '^(0|[1-9][0-9]*)(\\.(0|[1-9][0-9]*))+$',
      description: 'The Study Instance UID (0020,000D): numbers separated by dots, at most 64 characters.',
      examples: ['1.2.826.0.1.3680043.8.498.12345'],
    },
  ],
  [studySchema.shape.modalities, { description: 'DICOM modality codes (DCM, CID 29 Acquisition Modality, plus RT objects, SEG, SR, KO, PR, DOC), each once.' }],
  [studySchema.shape.instanceCount, { description: 'Number of instances (images and other objects); not fewer than seriesCount.' }],
  [
    studySchema.shape.started,
    { description: 'When the study started: a date (YYYY-MM-DD) or a date and time with a zone (YYYY-MM-DDThh:mm:ssZ); not in the future.' },
  ],
  [doc.title, TRIMMED],
  [doc.contentType, { description: 'A MIME type such as application/pdf.', examples: ['application/pdf'] }],
  [doc.language, { examples: ['en', 'pt-BR'], ...extension('the document language as a BCP 47 tag (DocumentReference.content.attachment.language).') }],
  [doc.data, { contentEncoding: 'base64', pattern: '^[A-Za-z0-9+/]*={0,2}$', description: 'The content, base64-encoded (length a multiple of 4).' }],
  [doc.url, { pattern: '^https?://', description: 'Where the centre can fetch the content (http(s) URL).' }],
  [treatmentSchema.shape.code, extension('a coded procedure or medication for the treatment.')],
  [treatmentSchema.shape.end, extension(`the end date of the treatment. ${DATE}`)],
  [
    referralSchema,
    {
      description:
        'A referral as an EHR submits it (POST /referrals). Validation is strict: an unknown field anywhere answers 422 with the field path in ' +
        'OperationOutcome.issue.expression.',
    },
  ],
  [rr.externalId, { description: "The EHR's own id for the referral; unique per client (a resubmission with the same body is a replay)." }],
  [rr.priority, { description: 'FHIR request priority.' }],
  [
    rr.destination,
    {
      description:
        'A configured destination id. Without it the referral is routed by the rules in mappings/ (cancer type to centre). An unknown destination or no ' +
        'matching rule answers 422.',
    },
  ],
  [rr.reasonText, extension('free-text reason for the referral (ServiceRequest.reasonCode.text / note).')],
  [dx.laterality, extension('laterality of the body site.')],
  [stage.type, extension('whether the stage is clinical (cTNM) or pathologic (pTNM).')],
  [stage.value, { examples: ['IIB'] }],
  [dx.clinicalStatus, extension('Condition.clinicalStatus of the diagnosis.')],
  [rr.consent, { description: 'The patient must agree to share records: anything other than true answers 422.' }],
  [
    rr.callbackUrl,
    {
      pattern: '^https?://',
      description:
        'Where status webhooks (referral.status-changed) are POSTed; see `webhooks`. With WEBHOOK_ALLOW_PRIVATE_NETWORKS=false (the production default) it ' +
        'must name a public host: loopback, private and link-local addresses and local names are refused with a 422.',
    },
  ],
];

/** Notes on one use of a shared schema (diagnosis.code is the Coding itself), by JSON pointer into the components. */
export const useNotes: ReadonlyArray<readonly [string, z.core.JSONSchemaMeta]> = [
  ['ReferralRequest/properties/diagnosis/properties/code', { description: 'The cancer diagnosis, e.g. ICD-10-CM C50.912.' }],
];

// ---- requests: the schemas the routes parse with ----

export { cancelSchema as cancelRequestSchema, listQuery as listReferralsQuery, consoleAuditQuery, deliveriesQuery, webhooksQuery, hl7StatusMessagesQuery };

const outboxStates = deliveriesQuery.shape.state.unwrap().options;
const webhookStates = webhooksQuery.shape.state.unwrap().options;
const hl7ReturnStates = hl7StatusMessagesQuery.shape.state.unwrap().options;

/** addDocumentsSchema and the object around it that addDocuments also takes. */
export const addDocumentsRequestSchema = z.xor([z.object({ documents: addDocumentsSchema }), addDocumentsSchema]).meta({
  description: `Documents to add (same shape as documents[] of a referral), 1 to 100. ${EXTENSION}a bare JSON array is accepted as well as { "documents": [...] }.`,
  'x-extension': true,
});

// ---- answers ----

const severities = ['fatal', 'error', 'warning', 'information'] as const;

/** The body of every error answer (src/outcomes builds it). */
export const operationOutcomeSchema = z
  .object({
    resourceType: z.literal('OperationOutcome'),
    issue: z
      .array(
        z.object({
          severity: z.enum(severities),
          code: z.string().meta({
            description:
              'FHIR IssueType, e.g. invalid, structure, required, login, forbidden, not-found, conflict, business-rule, too-costly, not-supported, transient, exception.',
          }),
          details: z.object({ text: z.string().optional() }).optional(),
          diagnostics: z.string().optional(),
          expression: z
            .array(z.string())
            .optional()
            .meta({ examples: [['patient.identifiers[0].value']] }),
        })
      )
      .min(1),
  })
  .meta({
    description: 'A FHIR R4 OperationOutcome. Every error answer has this body; each issue names the offending field path in `expression` where there is one.',
    examples: [
      {
        resourceType: 'OperationOutcome',
        issue: [
          {
            severity: 'error',
            code: 'invalid',
            details: { text: 'patient.birthDate: Invalid input: expected string, received undefined' },
            expression: ['patient.birthDate'],
          },
        ],
      },
    ],
  });

/** The body of a status webhook (WebhookEvent, src/store/webhook-queue.ts). */
export const statusChangedEventSchema = z
  .object({
    type: z.literal('referral.status-changed'),
    referralId: z.string(),
    externalId: z.string(),
    status: referralStatusSchema,
    previousStatus: referralStatusSchema,
    at: dateTime,
    reason: z.string().optional().meta({ description: 'Present when the change has a reason.' }),
  })
  .meta({ description: 'The body of a status webhook.' });

/** GET /referrals. */
export const referralListSchema = z.object({
  items: z.array(referralViewSchema),
  nextCursor: z.string().nullable().meta({ description: 'Pass as `cursor` for the next page; null on the last page.' }),
});

/** The admin retry endpoints. */
export const requeuedSchema = z.object({ requeued: z.array(z.string()).meta({ description: 'The ids of the re-queued entries.' }) });

/** One row of GET /admin/console-audit (ConsoleAuditEntry, src/store/console-sessions.ts). */
export const consoleAuditEntrySchema = z.object({
  at: z.string().meta({ description: 'When (ISO 8601).' }),
  actor: z.string().meta({ description: '`admin` or `client:<client id>`: the console session that did it.' }),
  action: z.string().meta({ description: "`show-patient-identity` (the referral detail's button) or `centre-desk-view` (the centre desk's Task page)." }),
  referralId: z.string().meta({ description: 'The referral (ref_...), or `Task/<id>` for a desk Task that names none.' }),
});

/** One entry of GET /admin/deliveries (src/api/admin-router.ts). */
export const deliveryEntrySchema = z.object({
  id: z.string(),
  referralId: z.string(),
  kind: z.string().describe('submit, documents or cancel; an entry this version cannot read shows the kind it was stored with'),
  state: z.enum(outboxStates),
  attempts: count,
  lastError: z.string().nullable(),
  nextAttemptAt: dateTime.nullable(),
  createdAt: dateTime,
});

/** One entry of GET /admin/webhooks (src/api/webhooks-admin-router.ts). */
export const webhookEntrySchema = z.object({
  id: z.string().meta({ description: 'The webhook-id the receiver sees (wh_...).' }),
  referralId: z.string(),
  seq: z.int(),
  event: z
    .object({ type: z.string().optional(), status: z.string().optional(), previousStatus: z.string().optional(), at: z.string().optional() })
    .meta({ description: "The event's status fields only; the rest of the body is not shown." }),
  url: z.string().meta({ description: 'The callback URL without its query string.' }),
  state: z.enum(webhookStates),
  attempts: count,
  lastError: z.string().nullable(),
  nextAttemptAt: dateTime.nullable(),
  createdAt: dateTime,
  updatedAt: dateTime,
});

/** One entry of GET /admin/hl7-status-messages (src/api/hl7-return-admin-router.ts). */
export const hl7StatusMessageSchema = z.object({
  id: z.string().meta({ description: 'The status message id (h7_...); the MSH-10 control ids sent are derived from it.' }),
  referralId: z.string(),
  seq: z.int(),
  status: referralStatusSchema,
  previousStatus: referralStatusSchema,
  at: dateTime.meta({ description: 'When the status changed.' }),
  family: z
    .enum(['REF', 'OMG'])
    .meta({ description: 'REF: RRI^I12 to a REF^I12 sender; OMG: OSU^O51 (and ORU^R01 with the report) to an OMG^O19 (360X) sender.' }),
  channel: z.string().meta({ description: "The sender's MLLP receiver, host:port (HL7_RETURN_CHANNELS when the referral came in)." }),
  message: z.enum(['status', 'appointment']).meta({
    description:
      "status: the status change (status and previousStatus); appointment: the centre booked the board (SIU^S12 to an OMG^O19 sender; status is the referral's then).",
  }),
  appointmentStart: z
    .string()
    .nullable()
    .meta({ description: "An appointment's start as the centre's Task gave it (FHIR dateTime); null when it gave none, or for a status change." }),
  state: z.enum(hl7ReturnStates),
  attempts: count,
  lastError: z.string().nullable().meta({ description: "Why the last attempt failed; for an AE, the receiver's error text." }),
  nextAttemptAt: dateTime.nullable(),
  createdAt: dateTime,
  updatedAt: dateTime,
});

/** The sandbox's answers and bodies. */
export const fhirResourceSchema = z
  .looseObject({ resourceType: z.string(), id: z.string().optional() })
  .meta({ description: 'Any FHIR R4 resource (application/fhir+json).' });

/** GET /readyz (src/app.ts). */
export const readinessSchema = z.object({
  status: z.enum(['ready', 'not-ready', 'shutting-down']),
  checks: z.record(z.string(), z.string()).optional(),
});

/** POST /admin/retention/run (RetentionRun, src/retention/job.ts). */
export const retentionRunSchema = z.object({
  referralsStripped: count.meta({ description: 'Closed referrals whose inline document bytes were removed.' }),
  documentsStripped: count.meta({ description: 'Documents whose bytes were removed (size and SHA-256 kept).' }),
  referralsDeleted: count.meta({ description: 'Closed referrals deleted with their history.' }),
  blobsDeleted: count.meta({ description: "Streamed documents' bytes no referral names any more, removed from the blob store." }),
  skipped: z.string().optional().meta({ description: 'Why nothing ran (another instance runs retention).' }),
});

/** GET /admin/destinations/{id}/doctor (DoctorReport, src/doctor/types.ts). */
export const doctorReportSchema = z.object({
  destination: z.string(),
  baseUrl: z.string(),
  checkedAt: dateTime,
  canWork: z.boolean(),
  checks: z.array(
    z.object({ id: z.string(), label: z.string(), status: z.enum(['ok', 'warn', 'fail', 'skip']), detail: z.string(), advice: z.string().optional() })
  ),
  suggested: z.record(z.string(), z.unknown()),
  cleanup: z.object({ deleted: count, left: z.array(z.string()) }),
});

/** GET /healthz. */
export const healthSchema = z.object({ status: z.literal('ok') });

/** The named schemas, in the document's order. */
export const componentSchemas: Record<string, z.ZodType> = {
  Coding: codingSchema,
  Identifier: identifierSchema,
  HumanName: humanNameSchema,
  Document: documentSchema,
  Treatment: treatmentSchema,
  ReferralRequest: referralSchema,
  ReferralStatus: referralStatusSchema,
  Referral: referralViewSchema,
  ReferralList: referralListSchema,
  CancelRequest: cancelSchema,
  AddDocumentsRequest: addDocumentsRequestSchema,
  Requeued: requeuedSchema,
  DeliveryEntry: deliveryEntrySchema,
  WebhookEntry: webhookEntrySchema,
  Hl7StatusMessage: hl7StatusMessageSchema,
  ConsoleAuditEntry: consoleAuditEntrySchema,
  StatusChangedEvent: statusChangedEventSchema,
  OperationOutcome: operationOutcomeSchema,
  FhirResource: fhirResourceSchema,
  Readiness: readinessSchema,
  RetentionRun: retentionRunSchema,
};

// The answers' schemas and the types the code answers with: `tsc` fails here when one changes without the other.
export const shapeChecks: true[] = [
  same<z.output<typeof statusChangedEventSchema>, WebhookEvent>(true),
  same<z.output<typeof retentionRunSchema>, RetentionRun>(true),
  same<z.output<typeof consoleAuditEntrySchema>, ConsoleAuditEntry>(true),
  same<z.output<typeof doctorReportSchema>, DoctorReport>(true),
  same<
    z.output<typeof deliveryEntrySchema>,
    Pick<OutboxEntry, 'id' | 'referralId' | 'state' | 'attempts' | 'lastError' | 'createdAt'> & { kind: string; nextAttemptAt: string | null }
  >(true),
  same<
    Omit<z.output<typeof webhookEntrySchema>, 'event'>,
    Omit<WebhookEntry, 'payload' | 'lockedBy' | 'lockedUntil' | 'nextAttemptAt'> & { nextAttemptAt: string | null }
  >(true),
  same<(typeof outboxStates)[number], OutboxEntry['state']>(true),
  same<(typeof webhookStates)[number], WebhookState>(true),
  same<
    Omit<z.output<typeof hl7StatusMessageSchema>, 'channel'>,
    Omit<Hl7ReturnEntry, 'channel' | 'reason' | 'nextAttemptAt'> & { nextAttemptAt: string | null }
  >(true),
  same<(typeof hl7ReturnStates)[number], Hl7ReturnState>(true),
  same<(typeof severities)[number], OperationOutcomeIssue['severity']>(true),
];
