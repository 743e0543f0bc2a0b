// The OpenAPI 3.1 document of the public interface, generated from the zod schemas (schemas.ts) and the route
// metadata (routes.ts). GET /openapi.json serves it; `npx tsx src/cli/openapi.ts` writes docs/openapi.json, which a
// test keeps equal to it.
import { z } from 'zod';
import { version } from '../../../package.json';
import { convertSchemas, SCHEMA_BASE, type JsonSchema } from './json-schema';
import { componentHeaders, componentParameters, componentResponses, routes, SANDBOX_PARAMS, type Route, type Spec, type Tag, webhooks } from './routes';
import { componentSchemas, requestNotes, useNotes } from './schemas';

const INFO = {
  title: 'referral-gateway',
  version,
  summary: 'Cancer second-opinion referrals from EHRs to cancer centres over FHIR R4',
  description: [
    'The public interface of referral-gateway (shared/api-contract.md). EHRs submit referrals as JSON; the gateway maps them to FHIR R4 (ServiceRequest, ' +
      "Task, DocumentReference, ...), delivers them to the cancer centre's FHIR server, tracks the centre's Task and reports status back by polling and " +
      'webhooks.',
    'Authentication: `Authorization: Bearer <api key>` (API_KEYS, clientId:key pairs) on /referrals; each client sees only its own referrals (another ' +
      "client's id answers 404). /admin needs the admin key (ADMIN_API_KEY). /healthz, /readyz, /metrics, /openapi.json and the sandbox need none.",
    'Errors: every error body is a FHIR OperationOutcome (application/fhir+json) whose issues name the offending field path in `expression`: 400 malformed ' +
      "JSON or bad query, 401 no or wrong key, 404 unknown (or another client's) referral, 409 conflict, 413 body over MAX_BODY_BYTES, 415 not JSON, 422 " +
      'valid JSON that breaks a rule. Request validation is strict: unknown fields are refused with 422 rather than silently dropped.',
    'Fields and endpoints that extend the contract carry `x-extension: true` and a description starting "Extension to the contract"; the top-level ' +
      '`x-extensions` lists them.',
  ].join('\n\n'),
  license: { name: 'Apache-2.0', identifier: 'Apache-2.0' },
};

const TAGS: Array<{ name: Tag; description: string }> = [
  { name: 'referrals', description: 'Submit and track referrals (API key).' },
  { name: 'admin', description: 'Operator endpoints (admin key, ADMIN_API_KEY).' },
  { name: 'operations', description: 'Health, readiness, metrics and this document (no authentication).' },
  {
    name: 'sandbox',
    description:
      'The built-in sandbox FHIR R4 server that plays the cancer centre. Only served when no destination is configured (no DESTINATIONS_FILE entries, no ' +
      'FHIR_BASE_URL); refused with NODE_ENV=production. In-memory; data is lost on restart. No authentication.',
  },
];

/** Each tag's security; undefined: the document's default (the API key). */
const SECURITY: Record<Tag, Spec[] | undefined> = { referrals: undefined, admin: [{ adminKey: [] }], operations: [], sandbox: [] };

const SECURITY_SCHEMES = {
  apiKey: {
    type: 'http',
    scheme: 'bearer',
    description: 'A client API key from API_KEYS (clientId:key pairs). Development without API_KEYS: the key dev-key (client dev).',
  },
  adminKey: { type: 'http', scheme: 'bearer', description: 'The admin key from ADMIN_API_KEY. Without it the admin endpoints answer 403.' },
};

/** What extends shared/api-contract.md, by JSON pointer (each must resolve). */
const EXTENSIONS: Array<{ target: string; note: string }> = [
  { target: '#/components/schemas/ReferralRequest/properties/diagnosis/properties/laterality', note: 'diagnosis.laterality: left | right | bilateral.' },
  {
    target: '#/components/schemas/ReferralRequest/properties/diagnosis/properties/clinicalStatus',
    note: 'diagnosis.clinicalStatus: active (default) | recurrence | remission.',
  },
  {
    target: '#/components/schemas/ReferralRequest/properties/diagnosis/properties/stage/properties/type',
    note: 'diagnosis.stage.type: clinical | pathologic.',
  },
  { target: '#/components/schemas/ReferralRequest/properties/reasonText', note: 'reasonText: free-text reason.' },
  { target: '#/components/schemas/Treatment/properties/code', note: 'treatmentHistory[].code: a Coding for the treatment.' },
  { target: '#/components/schemas/Treatment/properties/end', note: 'treatmentHistory[].end: end date.' },
  { target: '#/components/schemas/Document/properties/language', note: 'documents[].language: BCP 47 language tag.' },
  { target: '#/components/schemas/ReferralRequest', note: 'Strict validation: unknown fields anywhere are refused with 422 (not silently dropped).' },
  { target: '#/components/schemas/AddDocumentsRequest', note: 'POST /referrals/{id}/documents accepts a bare array as well as { "documents": [...] }.' },
  { target: '#/paths/~1admin~1deliveries/get', note: 'GET /admin/deliveries: list the delivery dead letter or queue.' },
  { target: '#/paths/~1admin~1deliveries~1{id}~1retry/post', note: '{id} may be an outbox entry id as well as a referral id.' },
  { target: '#/paths/~1admin~1webhooks/get', note: 'GET /admin/webhooks: list webhook events.' },
  { target: '#/paths/~1admin~1webhooks~1{id}~1retry/post', note: 'POST /admin/webhooks/{id}/retry: replay a dead-lettered webhook event.' },
  { target: '#/paths/~1admin~1hl7-status-messages/get', note: 'GET /admin/hl7-status-messages: list the status messages sent back to HL7 v2 senders.' },
  {
    target: '#/paths/~1admin~1hl7-status-messages~1{id}~1retry/post',
    note: 'POST /admin/hl7-status-messages/{id}/retry: re-queue a dead-lettered HL7 v2 status message.',
  },
  { target: '#/paths/~1openapi.json/get', note: 'GET /openapi.json: this document.' },
  { target: '#/components/responses/AdminDisabled', note: '403 when ADMIN_API_KEY is not set.' },
  { target: '#/paths/~1referrals~1{id}~1report~1content/get/responses/502', note: "502 when the centre's server does not return the report." },
  { target: '#/paths/~1readyz/get/responses/503', note: '503 when not ready or shutting down.' },
  { target: '#/components/parameters/X-Request-Id', note: 'X-Request-Id correlation id, echoed on every response.' },
];

/** The node at a JSON pointer (`#/a/b`), or undefined. */
function at(root: unknown, pointer: string): unknown {
  let node = root;
  for (const raw of pointer.replace(/^#\//, '').split('/')) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (typeof node !== 'object' || node === null || !(key in node)) return undefined;
    node = (node as Record<string, unknown>)[key];
  }
  return node;
}

/** One route as an OpenAPI operation; its schemas are still zod. */
function operation(route: Route): Spec {
  const where = `${route.method.toUpperCase()} ${route.path}`;
  const pathParams = [...route.path.matchAll(/\{([^}]+)\}/g)].map(([, name]) => {
    const p = route.pathParams?.[name] ?? (route.tag === 'sandbox' ? SANDBOX_PARAMS[name] : undefined);
    if (!p) throw new Error(`openapi: ${where} does not declare its path parameter {${name}}`);
    return { name, in: 'path', required: true, schema: p.schema, ...(p.description ? { description: p.description } : {}) };
  });
  const shape: Record<string, z.ZodType> = route.query?.shape ?? {};
  const unknown = Object.keys(route.queryNotes ?? {}).filter((name) => !(name in shape));
  if (unknown.length > 0) throw new Error(`openapi: ${where} describes unknown query parameters: ${unknown.join(', ')}`);
  const query = Object.entries(shape).map(([name, schema]) => {
    const note = route.queryNotes?.[name];
    return { name, in: 'query', ...(schema.isOptional() ? {} : { required: true }), schema, ...(note ? { description: note } : {}) };
  });
  const requestId = route.tag === 'referrals' || route.tag === 'admin' ? [{ $ref: '#/components/parameters/X-Request-Id' }] : [];
  const parameters = [...pathParams, ...requestId, ...(route.params ?? []), ...query];
  const security = SECURITY[route.tag];
  const responses = Object.fromEntries(
    Object.entries(route.responses).map(([status, reply]) => [status, typeof reply === 'string' ? { $ref: `#/components/responses/${reply}` } : reply])
  );
  return {
    ...(route.extension ? { 'x-extension': true } : {}),
    tags: [route.tag],
    operationId: route.operationId,
    summary: route.summary,
    ...(route.description ? { description: route.description } : {}),
    ...(security ? { security } : {}),
    ...(parameters.length > 0 ? { parameters } : {}),
    ...(route.body ? { requestBody: { required: true, ...route.body } } : {}),
    responses,
  };
}

/** Every zod schema in `node` (schemas sit in the route data where OpenAPI wants a schema). */
function zodSchemas(node: unknown, found: Set<z.ZodType> = new Set()): Set<z.ZodType> {
  if (node instanceof z.ZodType) found.add(node);
  else if (Array.isArray(node)) for (const v of node) zodSchemas(v, found);
  else if (typeof node === 'object' && node !== null) for (const v of Object.values(node)) zodSchemas(v, found);
  return found;
}

/** `node` with each zod schema replaced by its JSON Schema. */
function withJsonSchemas(node: unknown, json: (schema: z.ZodType) => JsonSchema): unknown {
  if (node instanceof z.ZodType) return json(node);
  if (Array.isArray(node)) return node.map((v) => withJsonSchemas(v, json));
  if (typeof node === 'object' && node !== null) return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, withJsonSchemas(v, json)]));
  return node;
}

/** Builds the document (about 20 ms); use openApiDocument() for the cached one. */
export function buildOpenApiDocument(): Spec {
  const paths: Record<string, Record<string, Spec>> = {};
  for (const route of routes) {
    const item = (paths[route.path] ??= {});
    if (item[route.method]) throw new Error(`openapi: ${route.method.toUpperCase()} ${route.path} is declared twice`);
    item[route.method] = operation(route);
  }
  const draft = {
    openapi: '3.1.0',
    jsonSchemaDialect: 'https://spec.openapis.org/oas/3.1/dialect/base',
    info: INFO,
    servers: [{ url: '/', description: 'This gateway' }],
    security: [{ apiKey: [] }],
    tags: TAGS,
    paths,
    webhooks,
    components: {
      securitySchemes: SECURITY_SCHEMES,
      headers: componentHeaders,
      parameters: componentParameters,
      responses: componentResponses,
      schemas: {},
    },
    'x-extensions': EXTENSIONS,
  };

  const named = new Map(Object.entries(componentSchemas).map(([name, schema]) => [schema, name]));
  const inline = [...zodSchemas(draft)].filter((s) => !named.has(s));
  const converted = convertSchemas(componentSchemas, inline, requestNotes);
  const doc = withJsonSchemas(draft, (schema) => {
    const name = named.get(schema);
    return name ? { $ref: `${SCHEMA_BASE}${name}` } : structuredClone(converted.inline.get(schema) as JsonSchema);
  }) as Spec & { components: { schemas: Record<string, JsonSchema> } };
  doc.components.schemas = converted.components;
  for (const [pointer, meta] of useNotes) {
    const node = at(doc.components.schemas, pointer);
    if (typeof node !== 'object' || node === null) throw new Error(`openapi: no schema at ${pointer}`);
    Object.assign(node, meta);
  }
  const missing = EXTENSIONS.filter(({ target }) => at(doc, target) === undefined).map(({ target }) => target);
  if (missing.length > 0) throw new Error(`openapi: x-extensions names what is not in the document: ${missing.join(', ')}`);
  return doc;
}

let cachedDoc: Spec | undefined;
let cachedText: string | undefined;

/** The document, built once per process (shared: do not change it). */
export const openApiDocument = (): Spec => (cachedDoc ??= buildOpenApiDocument());

/** The document as docs/openapi.json holds it: two-space indents, a trailing newline. */
export const openApiText = (): string => (cachedText ??= `${JSON.stringify(openApiDocument(), null, 2)}\n`);
