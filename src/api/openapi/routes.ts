// The routes of the OpenAPI document, as data: OpenAPI objects with zod schemas where schemas go, and a few
// shortcuts (tag for tags and security, pathParams, params and query for parameters, component names for replies).
// src/api/openapi/index.ts turns them into the document.
import { z } from 'zod';
import breastSecondOpinion from '../../../fixtures/referrals/breast-second-opinion.json';
import { referralSchema } from '../../model';
import { referralViewSchema } from '../../referral';
import type { JsonSchema } from './json-schema';
import {
  addDocumentsRequestSchema,
  cancelRequestSchema,
  consoleAuditEntrySchema,
  consoleAuditQuery,
  deliveriesQuery,
  deliveryEntrySchema,
  doctorReportSchema,
  EXTENSION,
  fhirResourceSchema,
  healthSchema,
  listReferralsQuery,
  operationOutcomeSchema,
  readinessSchema,
  referralListSchema,
  requeuedSchema,
  retentionRunSchema,
  statusChangedEventSchema,
  webhookEntrySchema,
  webhooksQuery,
  hl7StatusMessageSchema,
  hl7StatusMessagesQuery,
} from './schemas';

/** A schema where OpenAPI wants one: a zod schema, or JSON Schema for what has none (bytes, text). */
export type Schema = z.ZodType | JsonSchema;

/** Tags; each implies its security (index.ts). */
export type Tag = 'referrals' | 'admin' | 'operations' | 'sandbox';

/** An OpenAPI object whose `schema` members may be zod schemas. */
export type Spec = { [key: string]: unknown };

/** A reply: the name of one of `componentResponses`, or a Response object. */
export type Reply = ResponseName | Spec;

export interface Route {
  method: 'get' | 'post' | 'put' | 'patch' | 'delete';
  path: string;
  operationId: string;
  tag: Tag;
  summary: string;
  description?: string;
  /** Not in shared/api-contract.md: marked `x-extension: true`. */
  extension?: true;
  /** The path template's parameters: `{ description, schema }` by name (the sandbox's default to SANDBOX_PARAMS). */
  pathParams?: Record<string, Spec>;
  /** Header and other parameters (Parameter objects). */
  params?: Spec[];
  /** The query (a router's zod schema): each property a parameter; `queryNotes` describes them. */
  query?: z.ZodObject;
  queryNotes?: Record<string, string>;
  /** The requestBody (required unless it says otherwise). */
  body?: Spec;
  responses: Record<string, Reply>;
}

// ---- reply building blocks ----

const REQUEST_ID = { 'X-Request-Id': { $ref: '#/components/headers/X-Request-Id' } };
const LOCATION = { Location: { $ref: '#/components/headers/Location' } };

/** A JSON (or other) answer of the gateway; every answer carries X-Request-Id. */
const answer = (description: string, schema: Schema, more: { media?: string; headers?: Spec } = {}): Spec => ({
  description,
  headers: { ...REQUEST_ID, ...more.headers },
  content: { [more.media ?? 'application/json']: { schema } },
});

/** An error answer of the gateway: an OperationOutcome. */
const outcome = (description: string, more: Spec = {}): Spec => ({
  description,
  headers: REQUEST_ID,
  content: { 'application/fhir+json': { schema: operationOutcomeSchema } },
  ...more,
});

/** A JSON body. */
const jsonBody = (schema: Schema, more: Spec = {}): Spec => ({ content: { 'application/json': { schema, ...more } } });

/** An id in a path. */
const idParam = (description: string, maxLength = 200): Spec => ({ description, schema: { type: 'string', maxLength } });

export const componentHeaders: Record<string, Spec> = {
  'X-Request-Id': { description: "The correlation id: the request's X-Request-Id when sane, otherwise a new one.", schema: { type: 'string' } },
  Location: { description: '/referrals/{id}', schema: { type: 'string' } },
};

export const componentParameters: Record<string, Spec> = {
  'X-Request-Id': {
    name: 'X-Request-Id',
    in: 'header',
    required: false,
    schema: { type: 'string', pattern: '^[\\w.:-]{1,128}$' },
    description: `${EXTENSION}a correlation id echoed in the response and logs (a new one is made when absent or not matching the pattern).`,
    'x-extension': true,
  },
};

const wwwAuthenticate = (realm: string): Spec => ({
  ...REQUEST_ID,
  'WWW-Authenticate': { description: `Bearer realm="${realm}"`, schema: { type: 'string' } },
});

export const componentResponses = {
  BadRequest: outcome('400: malformed JSON, an invalid query parameter (unknown parameters included), cursor or Idempotency-Key.'),
  Unauthorized: outcome('401: no API key or a wrong one.', { headers: wwwAuthenticate('referral-gateway') }),
  AdminUnauthorized: outcome('401: no admin key or a wrong one.', { headers: wwwAuthenticate('referral-gateway-admin') }),
  AdminDisabled: outcome(`403: admin endpoints are disabled because ADMIN_API_KEY is not set. ${EXTENSION}403 is not in the contract's error list.`, {
    'x-extension': true,
  }),
  NotFound: outcome('404: unknown id, or a referral of another client (indistinguishable).'),
  Conflict: outcome('409: conflict (see the operation).'),
  PayloadTooLarge: outcome('413: the body is larger than MAX_BODY_BYTES (default 25 MB).'),
  UnsupportedMediaType: outcome(
    '415: the body is not JSON (Content-Type must be application/json or application/*+json), or its encoding/charset is unsupported.'
  ),
  Unprocessable: outcome(
    '422: valid JSON that breaks a rule (schema, unknown fields, codes, consent, destination/routing, FHIR content that fails validation). Nothing is stored.'
  ),
  InternalError: outcome('500: unexpected error; the issue text quotes the request id (X-Request-Id).'),
  IntakeBusy: outcome(
    '503: request bodies already in flight fill MAX_INTAKE_BYTES_IN_FLIGHT and this one waited INTAKE_WAIT_MS without room; nothing was read or stored. ' +
      'Retry after Retry-After seconds.',
    { headers: { ...REQUEST_ID, 'Retry-After': { description: 'Seconds to wait before retrying', schema: { type: 'integer' } } } }
  ),
} satisfies Record<string, Spec>;

export type ResponseName = keyof typeof componentResponses;

// ---- the gateway ----

/** The submission example: fixtures/referrals/breast-second-opinion.json, its document bytes cut to 12 characters (still base64). */
const submissionExample = {
  ...breastSecondOpinion,
  documents: breastSecondOpinion.documents.map((d) => ('data' in d && typeof d.data === 'string' ? { ...d, data: d.data.slice(0, 12) } : d)),
};

const gateway: Route[] = [
  {
    method: 'get',
    path: '/healthz',
    operationId: 'healthz',
    tag: 'operations',
    summary: 'Liveness',
    responses: { 200: answer('The process is up.', healthSchema) },
  },
  {
    method: 'get',
    path: '/readyz',
    operationId: 'readyz',
    tag: 'operations',
    summary: 'Readiness (the store answers; not shutting down)',
    responses: {
      200: answer('Ready.', readinessSchema),
      503: answer('Not ready, or shutting down ({ "status": "shutting-down" }).', readinessSchema),
    },
  },
  {
    method: 'get',
    path: '/metrics',
    operationId: 'metrics',
    tag: 'operations',
    summary: 'Prometheus metrics',
    responses: { 200: answer('Prometheus text exposition format.', { type: 'string' }, { media: 'text/plain' }) },
  },
  {
    method: 'get',
    path: '/openapi.json',
    operationId: 'openapi',
    tag: 'operations',
    summary: 'This OpenAPI document',
    responses: { 200: answer('The OpenAPI 3.1 document.', { type: 'object' }) },
  },
  {
    method: 'post',
    path: '/referrals',
    operationId: 'submitReferral',
    tag: 'referrals',
    summary: 'Submit a referral',
    description:
      'Validates the referral completely (schema, codes, routing and the FHIR content it maps to), stores it and queues its delivery to the centre as a FHIR ' +
      'transaction. The same Idempotency-Key, or the same externalId for the same client, with the same body returns the original referral (200) and sends ' +
      'nothing twice; with a different body it answers 409.',
    params: [
      {
        name: 'Idempotency-Key',
        in: 'header',
        required: false,
        schema: { type: 'string', pattern: '^[\\x21-\\x7e]{1,255}$' },
        description: '1-255 visible ASCII characters (400 otherwise).',
      },
    ],
    body: {
      content: {
        ...(jsonBody(referralSchema, {
          examples: {
            'breast-second-opinion': { summary: 'fixtures/referrals/breast-second-opinion.json (document data shortened)', value: submissionExample },
          },
        }).content as Spec),
        'multipart/form-data': {
          schema: {
            type: 'object',
            description:
              `${EXTENSION}The referral with its documents' bytes in one request, streamed: a "referral" part first (the JSON referral; a field, or a part ` +
              'of type application/json), then one file part per document whose "file" names it. Each part goes to the blob store as it arrives, hashed (SHA-256, ' +
              'checked against the document\'s "sha256" when given: 422 on a mismatch); a document over MAX_DOCUMENT_BYTES, or parts over ' +
              'MAX_REFERRAL_DOCUMENT_BYTES together, 413; a part the referral names that never comes, 422; a full store, 507. The answer comes once the bytes and ' +
              'the referral are durable; a refused request keeps nothing.',
            required: ['referral'],
            properties: { referral: { type: 'string', description: 'The referral JSON (as application/json).' } },
            additionalProperties: { type: 'string', format: 'binary', description: "A document's bytes, named by its documents[i].file." },
          },
          encoding: { referral: { contentType: 'application/json' } },
        },
      },
    },
    responses: {
      200: answer('A replay (same Idempotency-Key or externalId with the same body): the original referral; nothing is sent again.', referralViewSchema, {
        headers: LOCATION,
      }),
      202: answer(
        'Accepted: stored and queued for delivery, or awaiting-documents when documents are declared "upload": true (see uploads).',
        referralViewSchema,
        {
          headers: LOCATION,
        }
      ),
      400: 'BadRequest',
      401: 'Unauthorized',
      408: outcome(`${EXTENSION}408: a multipart body sent nothing for INTAKE_BODY_TIMEOUT_MS; nothing was kept.`, { 'x-extension': true }),
      409: outcome('409: the Idempotency-Key or externalId was already used with a different body (expression names Idempotency-Key or externalId).'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      422: 'Unprocessable',
      500: 'InternalError',
      503: 'IntakeBusy',
      507: outcome(`${EXTENSION}507: the document store is full; nothing was kept. Retry later.`, { 'x-extension': true }),
    },
  },
  {
    method: 'get',
    path: '/referrals',
    operationId: 'listReferrals',
    tag: 'referrals',
    summary: "The client's referrals, newest first, cursor-paged",
    query: listReferralsQuery,
    queryNotes: { updatedSince: 'ISO 8601 date-time with an offset or Z.', cursor: 'nextCursor of the previous page (400 for anything else).' },
    responses: { 200: answer('A page of referrals.', referralListSchema), 400: 'BadRequest', 401: 'Unauthorized', 500: 'InternalError' },
  },
  {
    method: 'get',
    path: '/referrals/{id}',
    operationId: 'getReferral',
    tag: 'referrals',
    summary: 'A referral: status, status reason, FHIR ids at the centre, history, delivery attempts, report',
    pathParams: { id: idParam('The referral id (ref_...).') },
    responses: { 200: answer('The referral.', referralViewSchema), 401: 'Unauthorized', 404: 'NotFound', 500: 'InternalError' },
  },
  {
    method: 'post',
    path: '/referrals/{id}/cancel',
    operationId: 'cancelReferral',
    tag: 'referrals',
    summary: 'Cancel a referral',
    description:
      "Before delivery the referral is cancelled here; once at the centre a cancel is queued (the centre's Task becomes cancelled and the ServiceRequest " +
      'revoked). Cancelling a cancelled referral returns it unchanged.',
    pathParams: { id: idParam('The referral id.') },
    body: jsonBody(cancelRequestSchema, { example: { reason: 'Patient chose local treatment' } }),
    responses: {
      202: answer('The referral after the cancel was applied or queued.', referralViewSchema),
      400: 'BadRequest',
      401: 'Unauthorized',
      404: 'NotFound',
      409: outcome('409: the referral can no longer be cancelled directly (work started at the centre, or a final state).'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      422: outcome('422: no reason, or a body that is not { "reason": "..." }.'),
      500: 'InternalError',
      503: 'IntakeBusy',
    },
  },
  {
    method: 'post',
    path: '/referrals/{id}/documents',
    operationId: 'addDocuments',
    tag: 'referrals',
    summary: 'Add documents to a referral',
    description: 'They reach the centre as new DocumentReferences linked from the ServiceRequest.',
    pathParams: { id: idParam('The referral id.') },
    body: jsonBody(addDocumentsRequestSchema, {
      example: {
        documents: [
          { kind: 'genomic-report', title: 'Oncotype DX', date: '2026-09-20', contentType: 'application/pdf', url: 'https://ehr.example.org/docs/91' },
        ],
      },
    }),
    responses: {
      202: answer('The referral; the documents are queued for delivery.', referralViewSchema),
      400: 'BadRequest',
      401: 'Unauthorized',
      404: 'NotFound',
      409: outcome('409: the referral is in a final state, or its destination is no longer configured.'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      422: 'Unprocessable',
      500: 'InternalError',
      503: 'IntakeBusy',
    },
  },
  {
    method: 'put',
    path: '/referrals/{id}/documents/{n}/content',
    operationId: 'uploadDocumentContent',
    tag: 'referrals',
    extension: true,
    summary: 'The bytes of a document declared "upload": true, streamed',
    description:
      "For a referral awaiting-documents: the raw bytes of document n (1-based, as the view's uploads list them) with its declared Content-Type. They are " +
      'hashed as they stream into the blob store and checked against the declared digest (Repr-Digest or Content-Digest sha-256, RFC 9530; Digest SHA-256, ' +
      "RFC 3230; or the document's sha256). 202 once durable; when it was the last upload due, the referral is queued for delivery. The same bytes again: " +
      '200, nothing changes. A referral whose uploads do not all arrive within UPLOAD_DEADLINE_HOURS becomes expired.',
    pathParams: { id: idParam('The referral id.'), n: idParam('The document number, from 1.', 10) },
    params: [
      {
        name: 'Repr-Digest',
        in: 'header',
        required: false,
        schema: { type: 'string' },
        description: 'sha-256=:<base64 digest>: (RFC 9530); Content-Digest and Digest (SHA-256=<base64>) are read too.',
      },
    ],
    body: { content: { '*/*': { schema: { type: 'string', format: 'binary' } } } },
    responses: {
      200: answer('A resend of the same bytes: nothing changed.', referralViewSchema),
      202: answer('Stored durably; the referral as it is now (queued once every upload has arrived).', referralViewSchema),
      400: 'BadRequest',
      401: 'Unauthorized',
      404: outcome("404: unknown referral (or another client's), or no document n."),
      408: outcome('408: the body sent nothing for INTAKE_BODY_TIMEOUT_MS; nothing was kept.'),
      409: outcome('409: the document is not declared upload: true, already holds other bytes, or the referral no longer awaits documents (status).'),
      413: outcome('413: larger than MAX_DOCUMENT_BYTES, or than what MAX_REFERRAL_DOCUMENT_BYTES leaves; nothing was kept.'),
      415: outcome("415: the Content-Type is not the document's declared contentType, or the body has a Content-Encoding."),
      422: outcome('422: the bytes do not match the declared SHA-256; nothing was kept.'),
      500: 'InternalError',
      503: 'IntakeBusy',
      507: outcome('507: the document store is full; nothing was kept. Retry later.'),
    },
  },
  {
    method: 'get',
    path: '/referrals/{id}/report/content',
    operationId: 'getReportContent',
    tag: 'referrals',
    summary: "The opinion report's bytes, with its content type",
    pathParams: { id: idParam('The referral id.') },
    responses: {
      200: answer(
        'The report content, with the content type the centre gave it, streamed as the centre sends it (Content-Length when known). ' +
          'A centre that breaks off after the first bytes gives a cut transfer (short of Content-Length, or chunked without its end), never a whole-looking 200.',
        { type: 'string', format: 'binary' },
        { media: '*/*' }
      ),
      401: 'Unauthorized',
      404: outcome('404: unknown referral, no report yet, or the report has no attachment.'),
      500: 'InternalError',
      502: outcome(`${EXTENSION}502 is not in the contract's error list. 502: the centre's server did not return the report.`, { 'x-extension': true }),
    },
  },
  {
    method: 'post',
    path: '/hl7/v2',
    operationId: 'submitHl7v2',
    tag: 'referrals',
    extension: true,
    summary: 'An HL7 v2 message (REF^I12 new, REF^I13 documents added, REF^I14 cancel; OMG^O19 new or, with ORC-1 CA, cancel), answered with its ACK',
    description:
      'The same message MLLP takes (HL7_MLLP_PORT), over HTTP with the API keys. The answer is the acknowledgement (RRI^I12 for the REF family, ORG^O20 for ' +
      'OMG^O19): MSA-1 AA once the work is stored; AE with ERR segments naming the segment and field (ERR-2, e.g. PID^1^7) for bad content; AR for a type or ' +
      'version not taken, or when the gateway cannot take work now. A resend (same sending facility and MSH-10) gets the original answer. docs/for-ehr-integrators.md.',
    body: { content: { 'x-application/hl7-v2+er7': { schema: { type: 'string', description: 'ER7: segments separated by CR' } } } },
    responses: {
      200: answer('The acknowledgement (AA, AE or AR).', { type: 'string' }, { media: 'x-application/hl7-v2+er7' }),
      401: 'Unauthorized',
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      500: 'InternalError',
      503: answer('AR: the gateway cannot take work now; retry after Retry-After seconds.', { type: 'string' }, { media: 'x-application/hl7-v2+er7' }),
    },
  },
  ...(['/fhir/R4/Bundle', '/fhir/R4'] as const).map((path): Route => ({
    method: 'post',
    path,
    operationId: path === '/fhir/R4' ? 'submitFhirBundleAtBase' : 'submitFhirBundle',
    tag: 'referrals',
    extension: true,
    summary: 'A FHIR referral Bundle (BSeR / Gravity style: transaction, collection or message)',
    description:
      'A ServiceRequest (its identifier is the externalId) with its Patient, requester, Condition (+ stage Observation), Consent and DocumentReferences (inline ' +
      'data, or a Binary entry). Same checks, idempotency, store and delivery as POST /referrals. Answers 201 with the Location of the gateway Task for the ' +
      'referral (200 for a replay). Refusals are OperationOutcomes whose expressions point into the submitted bundle (Bundle.entry[2].resource.birthDate).',
    body: { content: { 'application/fhir+json': { schema: fhirResourceSchema } } },
    responses: {
      200: answer('A replay: the original referral as a Task.', fhirResourceSchema, { media: 'application/fhir+json', headers: LOCATION }),
      201: answer('Stored and queued: the referral as a Task (/fhir/R4/Task/{id}).', fhirResourceSchema, { media: 'application/fhir+json', headers: LOCATION }),
      400: 'BadRequest',
      401: 'Unauthorized',
      409: outcome('409: the Idempotency-Key or ServiceRequest identifier was already used with a different referral.'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      422: outcome('422: not a referral Bundle, or a rule broken; each issue points into the bundle. Nothing is stored.'),
      500: 'InternalError',
      503: 'IntakeBusy',
    },
  })),
  {
    method: 'get',
    path: '/fhir/R4/Task/{id}',
    operationId: 'readTask',
    tag: 'referrals',
    extension: true,
    summary: "A referral as a FHIR Task mirroring the centre's: status, businessStatus (the gateway's status), statusReason, output with the report",
    pathParams: { id: idParam('The referral id (ref_...).') },
    responses: { 200: answer('The Task.', fhirResourceSchema, { media: 'application/fhir+json' }), 401: 'Unauthorized', 404: 'NotFound', 500: 'InternalError' },
  },
  {
    method: 'get',
    path: '/fhir/R4/Task',
    operationId: 'searchTasks',
    tag: 'referrals',
    extension: true,
    summary: "The client's referral Tasks with an identifier ([system|]value: the ServiceRequest identifier it sent)",
    params: [{ name: 'identifier', in: 'query', required: true, schema: { type: 'string', maxLength: 300 } }],
    responses: {
      200: answer('A searchset Bundle of Tasks.', fhirResourceSchema, { media: 'application/fhir+json' }),
      401: 'Unauthorized',
      422: 'Unprocessable',
      500: 'InternalError',
    },
  },
  {
    method: 'get',
    path: '/admin/deliveries',
    operationId: 'listDeliveries',
    tag: 'admin',
    extension: true,
    summary: 'Delivery outbox entries: the dead letter by default',
    description: `${EXTENSION}the contract only names the retry endpoint.`,
    query: deliveriesQuery,
    responses: {
      200: answer('The entries.', z.object({ items: z.array(deliveryEntrySchema) })),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      500: 'InternalError',
    },
  },
  {
    method: 'post',
    path: '/admin/deliveries/{id}/retry',
    operationId: 'retryDelivery',
    tag: 'admin',
    summary: 'Re-queue a failed delivery',
    description:
      'Re-queues the failed outbox entries of a delivery-failed referral (which becomes queued again) after the cause is fixed. ' +
      `${EXTENSION}{id} may also be an outbox entry id.`,
    pathParams: { id: idParam('A referral id (ref_...) or an outbox entry id.') },
    responses: {
      202: answer('Re-queued.', requeuedSchema),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      404: outcome('404: no failed delivery with that id.'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      500: 'InternalError',
    },
  },
  {
    method: 'get',
    path: '/admin/webhooks',
    operationId: 'listWebhooks',
    tag: 'admin',
    extension: true,
    summary: 'Status webhook events: the dead letter by default, or the queue',
    description: `${EXTENSION}operator view of webhook delivery.`,
    query: webhooksQuery,
    responses: {
      200: answer('The events.', z.object({ items: z.array(webhookEntrySchema) })),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      500: 'InternalError',
    },
  },
  {
    method: 'post',
    path: '/admin/webhooks/{id}/retry',
    operationId: 'retryWebhook',
    tag: 'admin',
    extension: true,
    summary: 'Replay a dead-lettered webhook event',
    description: `${EXTENSION}moves a failed event back to pending with 0 attempts and a new age window; it keeps its webhook-id and arrives after newer events.`,
    pathParams: { id: idParam('The webhook id (wh_...).') },
    responses: {
      202: answer('Re-queued.', requeuedSchema),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      404: outcome('404: no failed webhook with that id.'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      500: 'InternalError',
    },
  },
  {
    method: 'get',
    path: '/admin/hl7-status-messages',
    operationId: 'listHl7StatusMessages',
    tag: 'admin',
    extension: true,
    summary: 'Status messages sent back to HL7 v2 senders: the dead letter by default, or the queue',
    description:
      `${EXTENSION}operator view of the status changes sent back over MLLP to the referrers whose referrals came in as HL7 v2 ` +
      '(HL7_RETURN_CHANNELS): RRI^I12 to REF^I12 senders, OSU^O51 to OMG^O19 senders. The messages themselves are not shown.',
    query: hl7StatusMessagesQuery,
    responses: {
      200: answer('The status messages.', z.object({ items: z.array(hl7StatusMessageSchema) })),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      500: 'InternalError',
    },
  },
  {
    method: 'post',
    path: '/admin/hl7-status-messages/{id}/retry',
    operationId: 'retryHl7StatusMessage',
    tag: 'admin',
    extension: true,
    summary: 'Re-queue a dead-lettered HL7 v2 status message',
    description:
      `${EXTENSION}moves a failed status message back to pending with 0 attempts and a new age window; it keeps its control ids ` +
      '(MSH-10) and goes back after newer changes of the referral.',
    pathParams: { id: idParam('The status message id (h7_...).') },
    responses: {
      202: answer('Re-queued.', requeuedSchema),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      404: outcome('404: no failed status message with that id.'),
      413: 'PayloadTooLarge',
      415: 'UnsupportedMediaType',
      500: 'InternalError',
    },
  },
  {
    method: 'get',
    path: '/admin/console-audit',
    operationId: 'listConsoleAudit',
    tag: 'admin',
    extension: true,
    summary: "The console's audit log: who was shown a patient's identity",
    description:
      `${EXTENSION}every "Show patient identity" click in the browser console and every centre desk Task page viewed (docs/console.md), ` +
      'most recent first; the same as `npm run admin -- console-audit [referral id]`.',
    query: consoleAuditQuery,
    responses: {
      200: answer('The audit rows.', z.object({ items: z.array(consoleAuditEntrySchema) })),
      400: 'BadRequest',
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      500: 'InternalError',
    },
  },
  {
    method: 'post',
    path: '/admin/retention/run',
    operationId: 'runRetention',
    tag: 'admin',
    summary: 'Apply the retention policy now',
    description:
      'Extension: runs the retention job (DOCUMENT_RETENTION_DAYS, REFERRAL_RETENTION_DAYS) at once, as RETENTION_CRON would, and answers what it did. ' +
      "See the README's Retention section.",
    responses: { 200: answer('What the run did.', retentionRunSchema), 401: 'AdminUnauthorized', 403: 'AdminDisabled', 415: 'UnsupportedMediaType' },
  },
  {
    method: 'get',
    path: '/admin/destinations/{id}/doctor',
    operationId: 'destinationDoctor',
    tag: 'admin',
    summary: 'Probe a destination FHIR server (the doctor)',
    description:
      'Probes the destination with tagged test resources that it deletes afterwards and answers a report: one check per line (reachable, TLS, auth, metadata, ' +
      'FHIR version, transactions, Prefer: return=minimal, conditional create, strict isolation, _lastUpdated search and sort, _tag on Binary, client ids, ' +
      'largest JSON body and Binary, raw Binary, presigned URLs, If-Match, Task permissions, paging, clock skew), each with the setting to change when it ' +
      'fails, canWork, and suggested settings. Answered 200 even when canWork is false. The same as `npm run doctor -- <id> --json`.',
    pathParams: { id: idParam('A destination id.', 63) },
    params: [
      {
        name: 'quick',
        in: 'query',
        schema: { type: 'boolean', default: false },
        description: 'true (or 1): smaller size probes (JSON bodies up to 4 MiB, raw Binary 1 MiB).',
      },
    ],
    responses: {
      200: answer("The doctor's report.", doctorReportSchema),
      401: 'AdminUnauthorized',
      403: 'AdminDisabled',
      404: outcome('404: no destination with that id.'),
      500: 'InternalError',
    },
  },
];

// ---- the sandbox (a FHIR server: its own error bodies and statuses) ----

/** SANDBOX_PATH of src/sandbox, which src/api may not import; the tests find every path the app mounts documented. */
const SANDBOX_PATH = '/sandbox/fhir/R4';

const SANDBOX_NOTE =
  'Only served when no destination is configured (no DESTINATIONS_FILE entries, no FHIR_BASE_URL); refused with NODE_ENV=production. In-memory; data is lost ' +
  'on restart. No authentication.';
const RAW_BINARY_NOTE =
  'Raw Binary upload (every sandbox profile). GET /sandbox/fhir/R4/Binary/{id} with an Accept that is not FHIR JSON answers the raw bytes. Only served ' +
  'with the built-in sandbox.';

/** The sandbox's path parameters. */
export const SANDBOX_PARAMS: Record<string, Spec> = {
  type: { description: 'A FHIR R4 resource type.', schema: { type: 'string', examples: ['Task'] } },
  resourceId: { description: 'The logical id of the resource.', schema: { type: 'string' } },
  vid: { schema: { type: 'string' } },
};

const fhirJson = (schema: Schema): Spec => ({ 'application/fhir+json': { schema } });
const fhir = (description: string): Spec => ({ description, content: fhirJson(fhirResourceSchema) });
const fhirError = (description: string): Spec => ({ description, content: fhirJson(operationOutcomeSchema) });
const FHIR_ERROR = fhirError('A FHIR error (400 bad request, 404 unknown type or id, 405, 409/412 version conflict, 415, 422 invalid resource).');
const BINARY_ERROR = fhirError('A FHIR error (400 invalid id or body, 404 unknown id where update-as-create is off, 409/412 version conflict, 415).');
const RESOURCE = fhir('The resource or Bundle.');
const resourceBody = (description: string): Spec => ({
  description,
  content: { ...fhirJson(fhirResourceSchema), 'application/json': { schema: fhirResourceSchema } },
});
const RESOURCE_BODY = resourceBody('The resource.');
const PATCH_BODY: Spec = { content: { 'application/json-patch+json': { schema: { type: 'array' } } } };
const RAW_BINARY_BODY: Spec = {
  description:
    "The document's bytes, with their own Content-Type (application/pdf, application/dicom, application/octet-stream...): a raw Binary, as Medplum and HAPI " +
    'take it. A FHIR JSON body is a Binary resource as usual.',
  content: { 'application/octet-stream': { schema: { type: 'string', format: 'binary' } }, ...fhirJson(fhirResourceSchema) },
};
const BINARY_CREATED = fhir('Created: Location Binary/<id>/_history/<vid>; the Binary (without its data).');
const RAW_BINARY = { description: RAW_BINARY_NOTE, body: RAW_BINARY_BODY, error: BINARY_ERROR };
const ifMatch = (description?: string): Spec => ({ name: 'If-Match', in: 'header', schema: { type: 'string' }, ...(description ? { description } : {}) });

/** A sandbox route: its answers, then the FHIR error as `default`. */
function sandbox(
  method: Route['method'],
  sub: string,
  operationId: string,
  summary: string,
  answers: Record<string, Spec>,
  { error = FHIR_ERROR, ...more }: Partial<Route> & { error?: Spec } = {}
): Route {
  return {
    method,
    path: `${SANDBOX_PATH}${sub}`,
    operationId,
    tag: 'sandbox',
    summary,
    description: SANDBOX_NOTE,
    ...more,
    responses: { ...answers, default: error },
  };
}

const SEARCHSET = { 200: fhir('A searchset Bundle.') };

const sandboxRoutes: Route[] = [
  sandbox(
    'post',
    '',
    'sandboxBundle',
    'Process a transaction or batch Bundle',
    { 200: RESOURCE },
    { body: resourceBody('A Bundle of type transaction or batch.') }
  ),
  sandbox('get', '/metadata', 'sandboxCapabilities', 'CapabilityStatement', { 200: RESOURCE }),
  sandbox('get', '/{type}', 'sandboxSearch', 'Search a resource type (FHIR search parameters in the query)', SEARCHSET),
  sandbox(
    'post',
    '/{type}',
    'sandboxCreate',
    'Create (honours If-None-Exist)',
    { 200: fhir('Matched an existing resource (conditional create).'), 201: fhir('Created.') },
    { params: [{ name: 'If-None-Exist', in: 'header', schema: { type: 'string' } }], body: RESOURCE_BODY }
  ),
  sandbox('put', '/{type}', 'sandboxConditionalUpdate', 'Conditional update (search parameters in the query)', { 200: RESOURCE }, { body: RESOURCE_BODY }),
  sandbox('patch', '/{type}', 'sandboxConditionalPatch', 'Conditional patch (search parameters in the query)', { 200: RESOURCE }, { body: PATCH_BODY }),
  sandbox('delete', '/{type}', 'sandboxConditionalDelete', 'Conditional delete (search parameters in the query)', { 200: RESOURCE }),
  sandbox('post', '/{type}/_search', 'sandboxSearchPost', 'Search with parameters in a form body', SEARCHSET, {
    body: { required: false, content: { 'application/x-www-form-urlencoded': { schema: { type: 'object', additionalProperties: { type: 'string' } } } } },
  }),
  sandbox('get', '/{type}/{resourceId}', 'sandboxRead', 'Read', { 200: RESOURCE }),
  sandbox(
    'put',
    '/{type}/{resourceId}',
    'sandboxUpdate',
    'Update (honours If-Match)',
    { 200: RESOURCE },
    { params: [ifMatch('W/"<versionId>"')], body: RESOURCE_BODY }
  ),
  sandbox('patch', '/{type}/{resourceId}', 'sandboxPatch', 'JSON Patch', { 200: RESOURCE }, { params: [ifMatch()], body: PATCH_BODY }),
  sandbox('delete', '/{type}/{resourceId}', 'sandboxDelete', 'Delete', { 200: RESOURCE }),
  sandbox('get', '/{type}/{resourceId}/_history', 'sandboxHistory', 'Instance history', { 200: fhir('A history Bundle.') }),
  sandbox('get', '/{type}/{resourceId}/_history/{vid}', 'sandboxVread', 'Read a version', { 200: RESOURCE }),
  sandbox('post', '/Binary', 'sandboxBinaryCreate', 'Create a Binary from raw bytes', { 201: BINARY_CREATED }, RAW_BINARY),
  sandbox(
    'put',
    '/Binary/{resourceId}',
    'sandboxBinaryUpdate',
    'Create or replace a Binary with a client-assigned id from raw bytes',
    { 200: fhir('Updated.'), 201: BINARY_CREATED },
    RAW_BINARY
  ),
];

/** Every route, in the document's order. */
export const routes: Route[] = [...gateway, ...sandboxRoutes];

// ---- the webhook the gateway sends ----

export const webhooks: Record<string, { post: Spec }> = {
  'referral.status-changed': {
    post: {
      summary: 'A referral changed status',
      description:
        "POSTed to the referral's callbackUrl on every status change, signed per Standard Webhooks (secret from WEBHOOK_SECRET; a secret not starting with " +
        'whsec_ is used as UTF-8 bytes, so receivers verify with "whsec_" + base64(secret)). Retried with full-jitter exponential backoff (Retry-After ' +
        'honoured on 429/503) for up to 10 attempts or 24 h, surviving restarts; redirects are not followed. Delivery is at least once: de-duplicate on ' +
        'webhook-id. Events of one referral are sent in order, but an operator replay of a dead-lettered event may arrive after newer ones: order by `at`.',
      security: [],
      parameters: [
        {
          name: 'webhook-id',
          in: 'header',
          required: true,
          schema: { type: 'string', examples: ['wh_01JD3QW7Z8K2M4N6P8R0S2T4V6'] },
          description: 'The event id; the same on every retry and replay.',
        },
        {
          name: 'webhook-timestamp',
          in: 'header',
          required: true,
          schema: { type: 'string', pattern: '^\\d+$' },
          description: 'Time of this attempt, Unix seconds.',
        },
        {
          name: 'webhook-signature',
          in: 'header',
          required: false,
          schema: { type: 'string', pattern: '^v1,' },
          description: 'v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">. Absent only when no WEBHOOK_SECRET is set (development).',
        },
      ],
      requestBody: {
        required: true,
        ...jsonBody(statusChangedEventSchema, {
          example: {
            type: 'referral.status-changed',
            referralId: 'ref_01JD3QW7Z8K2M4N6P8R0S2T4V6',
            externalId: 'EHR-2026-000123',
            status: 'accepted',
            previousStatus: 'sent',
            at: '2026-09-12T10:15:00.000Z',
            reason: 'Reviewed by breast tumour board intake',
          },
        }),
      },
      responses: {
        '2XX': { description: 'Delivered. Any other status, a network error, a redirect or a timeout (10 s) counts as a failure and is retried.' },
      },
    },
  },
};
