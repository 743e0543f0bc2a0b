import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import express from 'express';
import request from 'supertest';
import { z } from 'zod';
import { openApiText } from '../../src/api/openapi';
import { openapiRouter } from '../../src/api/openapi-router';
import type { Gateway } from '../../src/gateway';
import { documentKinds, documentSchema, priorities, reasonCodes, referralKinds, referralSchema, treatmentTypes, referralStatuses } from '../../src/model';
import { ADMIN_KEY, eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

type Json = any;

// The document the generator makes (src/api/openapi): what GET /openapi.json serves, and what docs/openapi.json
// must hold (the first test).
const DOC_FILE = path.resolve(__dirname, '../../docs/openapi.json');
const docText = openApiText();
const doc: Json = JSON.parse(docText);
const METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'] as const;

const fixtureDir = path.resolve(__dirname, '../../fixtures/referrals');
const fixtures: Array<[string, Json]> = readdirSync(fixtureDir)
  .filter((f) => f.endsWith('.json'))
  .sort()
  .map((f) => [f, JSON.parse(readFileSync(path.join(fixtureDir, f), 'utf8'))]);

const clone = <T>(v: T): T => structuredClone(v);

// ---------------------------------------------------------------------------------------------
// A small JSON Schema (2020-12 subset) validator for the keywords this document uses. It refuses
// keywords it does not know, so a schema change cannot slip through unchecked.
// ---------------------------------------------------------------------------------------------

const ANNOTATIONS = new Set(['description', 'default', 'examples', 'example', 'title', 'x-extension', 'contentEncoding', 'summary']);
const ASSERTIONS = new Set([
  '$ref',
  'type',
  'enum',
  'const',
  'properties',
  'required',
  'additionalProperties',
  'items',
  'minItems',
  'maxItems',
  'minLength',
  'maxLength',
  'pattern',
  'minimum',
  'maximum',
  'format',
  'anyOf',
  'oneOf',
  'allOf',
  'not',
]);

function pointer(ref: string): Json {
  if (!ref.startsWith('#/')) throw new Error(`external $ref ${ref}`);
  let node: Json = doc;
  for (const raw of ref.slice(2).split('/')) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (node === undefined || !(key in node)) throw new Error(`unresolvable $ref ${ref}`);
    node = node[key];
  }
  return node;
}

const isRealDate = (s: string): boolean => {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(s)) return false;
  const d = new Date(`${s}T00:00:00Z`);
  return !Number.isNaN(d.getTime()) && d.toISOString().slice(0, 10) === s;
};

const formats: Record<string, (s: string) => boolean> = {
  date: isRealDate,
  'date-time': (s) => /^\d{4}-\d{2}-\d{2}T/.test(s) && !Number.isNaN(Date.parse(s)),
  uri: (s) => URL.canParse(s),
  email: (s) => /^[^\s@]+@[^\s@]+\.[^\s@]+$/.test(s),
  binary: () => true,
};

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function validate(schema: Json, value: unknown, at = '$', errors: string[] = []): string[] {
  if (schema === true) return errors;
  if (schema === false) {
    errors.push(`${at}: not allowed`);
    return errors;
  }
  for (const k of Object.keys(schema)) {
    if (!ASSERTIONS.has(k) && !ANNOTATIONS.has(k)) throw new Error(`validator does not know keyword ${k} (at ${at})`);
  }
  if (schema.$ref) validate(pointer(schema.$ref), value, at, errors);
  if (schema.type !== undefined) {
    const types: string[] = Array.isArray(schema.type) ? schema.type : [schema.type];
    const t = typeOf(value);
    if (!types.includes(t) && !(t === 'integer' && types.includes('number'))) {
      errors.push(`${at}: expected ${types.join('|')}, got ${t}`);
      return errors;
    }
  }
  if (schema.enum && !schema.enum.some((e: unknown) => JSON.stringify(e) === JSON.stringify(value))) errors.push(`${at}: not one of ${schema.enum.join(', ')}`);
  if ('const' in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) errors.push(`${at}: must be ${JSON.stringify(schema.const)}`);
  if (typeof value === 'string') {
    if (schema.minLength !== undefined && [...value].length < schema.minLength) errors.push(`${at}: shorter than ${schema.minLength}`);
    if (schema.maxLength !== undefined && [...value].length > schema.maxLength) errors.push(`${at}: longer than ${schema.maxLength}`);
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, 'u').test(value)) errors.push(`${at}: does not match ${schema.pattern}`);
    if (schema.format !== undefined) {
      const check = formats[schema.format];
      if (!check) throw new Error(`validator does not know format ${schema.format}`);
      if (!check(value)) errors.push(`${at}: not a valid ${schema.format}`);
    }
  }
  if (typeof value === 'number') {
    if (schema.minimum !== undefined && value < schema.minimum) errors.push(`${at}: below ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) errors.push(`${at}: above ${schema.maximum}`);
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined && value.length < schema.minItems) errors.push(`${at}: fewer than ${schema.minItems} items`);
    if (schema.maxItems !== undefined && value.length > schema.maxItems) errors.push(`${at}: more than ${schema.maxItems} items`);
    if (schema.items !== undefined) value.forEach((v, i) => validate(schema.items, v, `${at}[${i}]`, errors));
  }
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const obj = value as Record<string, unknown>;
    for (const req of schema.required ?? []) if (!(req in obj)) errors.push(`${at}.${req}: required`);
    const props = schema.properties ?? {};
    for (const [k, v] of Object.entries(obj)) {
      if (k in props) validate(props[k], v, `${at}.${k}`, errors);
      else if (schema.additionalProperties === false) errors.push(`${at}.${k}: unknown field`);
      else if (schema.additionalProperties !== undefined) validate(schema.additionalProperties, v, `${at}.${k}`, errors);
    }
  }
  if (schema.allOf) for (const s of schema.allOf) validate(s, value, at, errors);
  if (schema.anyOf && !schema.anyOf.some((s: Json) => validate(s, value, at).length === 0)) errors.push(`${at}: matches none of anyOf`);
  if (schema.oneOf) {
    const n = schema.oneOf.filter((s: Json) => validate(s, value, at).length === 0).length;
    if (n !== 1) errors.push(`${at}: matches ${n} of oneOf (exactly one required)`);
  }
  if (schema.not && validate(schema.not, value, at).length === 0) errors.push(`${at}: matches a schema it must not`);
  return errors;
}

const requestSchema: Json = { $ref: '#/components/schemas/ReferralRequest' };
const docAccepts = (body: unknown): boolean => validate(requestSchema, body).length === 0;
const zodAccepts = (body: unknown): boolean => referralSchema.safeParse(body).success;

/** Follows $ref (sibling keywords merged, the referring node's winning). */
function deref(schema: Json): Json {
  let s = schema;
  while (s && s.$ref) {
    const { $ref, ...rest } = s;
    s = { ...pointer($ref), ...rest };
  }
  return s;
}

/**
 * Each object's property names, required names and strictness, and each enum, keyed by path: the
 * structure the document and zod's own JSON Schema export must agree on.
 */
function outline(schema: Json, resolve: (s: Json) => Json, at = '$', out: Record<string, unknown> = {}): Record<string, unknown> {
  const s = resolve(schema);
  if (s.enum) out[`${at} enum`] = [...s.enum];
  if (s.const !== undefined) out[`${at} const`] = s.const;
  if (s.properties) {
    out[`${at} properties`] = Object.keys(s.properties).sort();
    out[`${at} required`] = [...(s.required ?? [])].sort();
    out[`${at} additionalProperties`] = s.additionalProperties === false ? false : 'open';
    for (const [k, v] of Object.entries(s.properties)) outline(v, resolve, `${at}.${k}`, out);
  }
  if (s.items) outline(s.items, resolve, `${at}[]`, out);
  return out;
}

// ---------------------------------------------------------------------------------------------

describe('OpenAPI document (generated by src/api/openapi, committed as docs/openapi.json)', () => {
  test('docs/openapi.json is current (what the generator makes, byte for byte)', () => {
    const committed = readFileSync(DOC_FILE, 'utf8');
    expect(committed === docText ? 'current' : 'docs/openapi.json differs from the generated document: run npx tsx src/cli/openapi.ts').toBe('current');
  });

  test('is valid JSON with openapi 3.1.x, info and paths', () => {
    expect(doc.openapi).toMatch(/^3\.1\.\d+$/);
    expect(typeof doc.info?.title).toBe('string');
    expect(typeof doc.info?.version).toBe('string');
    expect(Object.keys(doc.paths ?? {}).length).toBeGreaterThan(0);
    expect(doc.webhooks?.['referral.status-changed']?.post).toBeDefined();
  });

  test('every $ref resolves, operation ids are unique, path parameters are declared', () => {
    const refs: string[] = [];
    const walk = (n: Json): void => {
      if (Array.isArray(n)) n.forEach(walk);
      else if (n && typeof n === 'object') {
        if (typeof n.$ref === 'string') refs.push(n.$ref);
        Object.values(n).forEach(walk);
      }
    };
    walk(doc);
    expect(refs.length).toBeGreaterThan(0);
    for (const r of refs) expect(() => pointer(r)).not.toThrow();

    const ids = new Set<string>();
    for (const [p, item] of Object.entries<Json>(doc.paths)) {
      const templateParams = [...p.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]).sort();
      for (const m of METHODS) {
        const op = item[m];
        if (!op) continue;
        expect(ids.has(op.operationId)).toBe(false);
        ids.add(op.operationId);
        expect(Object.keys(op.responses ?? {}).length).toBeGreaterThan(0);
        const declared = [...(item.parameters ?? []), ...(op.parameters ?? [])].map((x: Json) => deref(x)).filter((x: Json) => x.in === 'path');
        expect([`${m} ${p}`, declared.map((x: Json) => x.name).sort()]).toEqual([`${m} ${p}`, templateParams]);
      }
    }
  });

  test('security: bearer API key by default, the admin key on /admin, none on health, metrics, docs and the sandbox', () => {
    expect(doc.components.securitySchemes.apiKey).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(doc.components.securitySchemes.adminKey).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(doc.security).toEqual([{ apiKey: [] }]);
    for (const [p, item] of Object.entries<Json>(doc.paths)) {
      for (const m of METHODS) {
        const op = item[m];
        if (!op) continue;
        const security = op.security ?? doc.security;
        if (p.startsWith('/admin')) expect([p, security]).toEqual([p, [{ adminKey: [] }]]);
        else if (/^\/(referrals|hl7|fhir)\b/.test(p)) expect([p, security]).toEqual([p, [{ apiKey: [] }]]);
        else expect([p, security]).toEqual([p, []]);
      }
    }
  });

  test('every gateway error response is an OperationOutcome, and the contract statuses all appear', () => {
    const seen = new Set<string>();
    for (const [p, item] of Object.entries<Json>(doc.paths)) {
      if (p.startsWith('/sandbox')) continue;
      for (const m of METHODS) {
        const op = item[m];
        if (!op) continue;
        for (const [status, r] of Object.entries<Json>(op.responses)) {
          if (!/^[45]\d\d$/.test(status) || (p === '/readyz' && status === '503')) continue;
          // HL7 v2 answers in its own terms: a refusal for load is an AR acknowledgement, not an OperationOutcome.
          if (deref(r).content?.['x-application/hl7-v2+er7']) continue;
          seen.add(status);
          const schema = deref(r).content?.['application/fhir+json']?.schema;
          expect([`${m} ${p} ${status}`, schema?.$ref]).toEqual([`${m} ${p} ${status}`, '#/components/schemas/OperationOutcome']);
        }
      }
    }
    for (const s of ['400', '401', '404', '409', '413', '415', '422']) expect(seen).toContain(s);
    const post = doc.paths['/referrals'].post.responses;
    for (const s of ['200', '202', '400', '401', '409', '413', '415', '422']) expect(Object.keys(post)).toContain(s);
  });

  test('the webhook documents the event and the Standard Webhooks headers', () => {
    const hook = doc.webhooks['referral.status-changed'].post;
    expect(hook.parameters.map((x: Json) => `${x.in}:${x.name}`).sort()).toEqual(['header:webhook-id', 'header:webhook-signature', 'header:webhook-timestamp']);
    const event = deref(hook.requestBody.content['application/json'].schema);
    expect(event.properties.type.const).toBe('referral.status-changed');
    expect([...event.required].sort()).toEqual(['at', 'externalId', 'previousStatus', 'referralId', 'status', 'type']);
    expect(validate(hook.requestBody.content['application/json'].schema, hook.requestBody.content['application/json'].example)).toEqual([]);
  });

  test('extensions to the contract are marked', () => {
    const targets = (doc['x-extensions'] as Json[]).map((e) => e.target as string);
    for (const t of targets) {
      const node = pointer(t);
      expect(node).toBeDefined();
    }
    const rr = doc.components.schemas.ReferralRequest.properties;
    for (const node of [
      rr.reasonText,
      rr.diagnosis.properties.laterality,
      rr.diagnosis.properties.clinicalStatus,
      rr.diagnosis.properties.stage.properties.type,
      doc.components.schemas.Treatment.properties.code,
      doc.components.schemas.Treatment.properties.end,
      doc.components.schemas.Document.properties.language,
    ]) {
      expect(node['x-extension']).toBe(true);
      expect(node.description).toMatch(/^Extension to the contract/);
    }
  });
});

describe('the documented request schema matches the zod schema (src/model/schema.ts)', () => {
  test('enums equal the zod enum values', () => {
    const s = doc.components.schemas;
    expect(s.ReferralRequest.properties.kind.enum).toEqual([...referralKinds]);
    expect(s.ReferralRequest.properties.priority.enum).toEqual([...priorities]);
    expect(s.ReferralRequest.properties.reasons.items.enum).toEqual([...reasonCodes]);
    expect(s.Document.properties.kind.enum).toEqual([...documentKinds]);
    expect(s.Treatment.properties.type.enum).toEqual([...treatmentTypes]);
    expect(s.ReferralStatus.enum).toEqual([...referralStatuses]);
  });

  test("objects, required lists, strictness and enums agree with zod's JSON Schema at every level", () => {
    const fromZod: Json = z.toJSONSchema(referralSchema, { io: 'input', unrepresentable: 'any' });
    const mine = outline(requestSchema, deref);
    const theirs = outline(fromZod, (x) => x);
    expect(mine).toEqual(theirs);
  });

  test.each(fixtures)('accepts fixtures/referrals/%s (and so does zod)', (_name, body) => {
    expect(validate(requestSchema, body)).toEqual([]);
    expect(referralSchema.safeParse(body).error?.issues ?? []).toEqual([]);
  });

  test('the example request body is valid', () => {
    const examples = doc.paths['/referrals'].post.requestBody.content['application/json'].examples;
    for (const ex of Object.values<Json>(examples)) {
      expect(validate(requestSchema, ex.value)).toEqual([]);
      expect(zodAccepts(ex.value)).toBe(true);
    }
    const add = doc.paths['/referrals/{id}/documents'].post.requestBody.content['application/json'];
    expect(validate(add.schema, add.example)).toEqual([]);
    for (const d of add.example.documents) expect(documentSchema.safeParse(d).success).toBe(true);
  });

  test('removing a documented-required field makes zod refuse; the document and zod agree on every removal', () => {
    let requiredChecked = 0;
    let removals = 0;
    const requiredSeen = new Set<string>();
    for (const [name, fixture] of fixtures) {
      // Walk the fixture alongside the documented schema; try deleting every property it holds.
      const visit = (schema: Json, value: Json, pathKeys: Array<string | number>, label: string): void => {
        const s = deref(schema);
        if (Array.isArray(value)) {
          if (s.items && value.length > 0) visit(s.items, value[0], [...pathKeys, 0], `${label}[]`);
          return;
        }
        if (!value || typeof value !== 'object' || !s.properties) return;
        for (const key of Object.keys(value)) {
          const body = clone(fixture);
          let parent: Json = body;
          for (const k of pathKeys) parent = parent[k];
          Reflect.deleteProperty(parent, key);
          const fieldLabel = label ? `${label}.${key}` : key;
          const required = (s.required ?? []).includes(key);
          const zodOk = zodAccepts(body);
          if (required) {
            requiredChecked++;
            requiredSeen.add(fieldLabel);
            expect([name, fieldLabel, 'zod accepts without it', zodOk]).toEqual([name, fieldLabel, 'zod accepts without it', false]);
          }
          expect([name, fieldLabel, 'document and zod agree', docAccepts(body)]).toEqual([name, fieldLabel, 'document and zod agree', zodOk]);
          removals++;
          if (key in s.properties) visit(s.properties[key], value[key], [...pathKeys, key], fieldLabel);
        }
      };
      expect(zodAccepts(fixture)).toBe(true);
      visit(requestSchema, fixture, [], '');
    }
    expect(requiredChecked).toBeGreaterThan(20);
    expect(removals).toBeGreaterThan(requiredChecked);
    for (const f of [
      'externalId',
      'kind',
      'patient',
      'patient.identifiers',
      'patient.name',
      'patient.birthDate',
      'patient.gender',
      'referrer',
      'diagnosis',
      'diagnosis.code',
      'consent',
    ]) {
      expect(requiredSeen).toContain(f);
    }
  });

  test('both refuse unknown fields, bad enum values, consent not given and a document with both data and url', () => {
    const base = fixtures[0][1];
    const cases: Array<[string, (b: Json) => void]> = [
      ['unknown top-level field', (b) => (b.nickname = 'x')],
      ['unknown nested field', (b) => (b.diagnosis.code.version = '2026')],
      ['unknown document field', (b) => (b.documents[0].pages = 3)],
      ['bad kind', (b) => (b.kind = 'gossip')],
      ['bad priority', (b) => (b.priority = 'whenever')],
      ['bad reason', (b) => (b.reasons = ['curiosity'])],
      ['bad document kind', (b) => (b.documents[0].kind = 'selfie')],
      ['consent not given', (b) => (b.consent.patientAgreed = false)],
      ['data and url', (b) => (b.documents[0].url = 'https://ehr.example.org/docs/1')],
      ['neither data nor url', (b) => delete b.documents[1].url],
      ['impossible date', (b) => (b.patient.birthDate = '1968-02-30')],
      ['bad externalId', (b) => (b.externalId = 'has spaces')],
      ['no identifiers', (b) => (b.patient.identifiers = [])],
    ];
    for (const [label, change] of cases) {
      const body = clone(base);
      change(body);
      expect([label, docAccepts(body), zodAccepts(body)]).toEqual([label, false, false]);
    }
  });
});

describe('GET /openapi.json (src/api/openapi-router.ts)', () => {
  test('serves the document as application/json without authentication', async () => {
    const app = express();
    app.use(openapiRouter());
    const res = await request(app).get('/openapi.json');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    expect(res.body).toEqual(doc);
  });
});

describe('the document and the running gateway agree', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  const DUMMY: Record<string, string> = { id: 'ref_00000000000000000000000000', type: 'Patient', resourceId: 'openapi-probe', vid: '1' };
  const fill = (p: string): string => p.replace(/\{([^}]+)\}/g, (_m, name: string) => encodeURIComponent(DUMMY[name] ?? 'x'));
  const documented = (): Array<{ method: string; path: string; op: Json }> =>
    Object.entries<Json>(doc.paths).flatMap(([p, item]) => METHODS.filter((m) => item[m]).map((m) => ({ method: m, path: p, op: item[m] })));
  const keyFor = (op: Json): string | undefined => {
    const security: Json[] = op.security ?? doc.security;
    if (security.some((s) => 'adminKey' in s)) return ADMIN_KEY;
    if (security.some((s) => 'apiKey' in s)) return KEY_A;
    return undefined;
  };
  const call = async (method: string, p: string, key: string | undefined): Promise<{ status: number; text: string }> => {
    const withBody = ['post', 'put', 'patch'].includes(method);
    const res = await fetch(`${gw.url}${fill(p)}`, {
      method: method.toUpperCase(),
      headers: { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...(withBody ? { 'Content-Type': 'application/json' } : {}) },
      body: withBody ? '{}' : undefined,
    });
    return { status: res.status, text: await res.text() };
  };
  const isFallback = (r: { status: number; text: string }): boolean => r.status === 404 && r.text.includes('no such endpoint');

  test('the gateway serves GET /openapi.json (needs the router mounted in src/app.ts)', async () => {
    const res = await fetch(`${gw.url}/openapi.json`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/json/);
    expect(await res.json()).toEqual(doc);
  });

  test('the fallback answers "no such endpoint" for an undocumented path (the probe can tell)', async () => {
    expect(isFallback(await call('get', '/no-such-thing', undefined))).toBe(true);
    expect(isFallback(await call('get', '/admin/nothing-here', ADMIN_KEY))).toBe(true);
  });

  test('every documented operation is served (probed with a dummy id)', async () => {
    const missing: string[] = [];
    const crashed: string[] = [];
    for (const { method, path: p, op } of documented()) {
      const r = await call(method, p, keyFor(op));
      if (isFallback(r)) missing.push(`${method.toUpperCase()} ${p}`);
      if (r.status >= 500) crashed.push(`${method.toUpperCase()} ${p} -> ${r.status}`);
    }
    expect(missing).toEqual([]);
    expect(crashed).toEqual([]);
  });

  test('documented security holds: authenticated operations answer 401 without a key, open ones do not', async () => {
    for (const { method, path: p, op } of documented()) {
      const r = await call(method, p, undefined);
      const open = (op.security ?? doc.security).length === 0;
      expect([`${method.toUpperCase()} ${p}`, r.status === 401]).toEqual([`${method.toUpperCase()} ${p}`, !open]);
    }
  });

  test('answers match their documented schemas (the referral view, lists, admin entries, retention, errors)', async () => {
    const schemaOf = (method: string, p: string, status: number): Json => {
      const content = deref(doc.paths[p][method].responses[String(status)]).content;
      return (content['application/json'] ?? content['application/fhir+json']).schema;
    };
    const answer = async (method: string, p: string, url: string, status: number, key?: string, body?: unknown): Promise<Json> => {
      const res = await fetch(`${gw.url}${url}`, {
        method: method.toUpperCase(),
        headers: { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...(body === undefined ? {} : { 'Content-Type': 'application/json' }) },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const json = await res.json();
      expect([`${method.toUpperCase()} ${url}`, res.status]).toEqual([`${method.toUpperCase()} ${url}`, status]);
      expect([`${method.toUpperCase()} ${url}`, validate(schemaOf(method, p, status), json)]).toEqual([`${method.toUpperCase()} ${url}`, []]);
      return json;
    };
    const submitted = await answer('post', '/referrals', '/referrals', 202, KEY_A, { ...fixture(), externalId: 'openapi-answers-1' });
    await answer('post', '/referrals', '/referrals', 200, KEY_A, { ...fixture(), externalId: 'openapi-answers-1' });
    const id: string = submitted.id;
    await eventually(async () => (await answer('get', '/referrals/{id}', `/referrals/${id}`, 200, KEY_A)).fhir);
    await answer('get', '/referrals', '/referrals?limit=5', 200, KEY_A);
    await answer('post', '/referrals', '/referrals', 422, KEY_A, {});
    await answer('get', '/referrals/{id}', '/referrals/ref_nothing', 404, KEY_A);
    await answer('get', '/referrals/{id}', `/referrals/${id}`, 401);
    await answer('get', '/admin/deliveries', '/admin/deliveries?state=done', 200, ADMIN_KEY);
    await eventually(async () => (await answer('get', '/admin/webhooks', '/admin/webhooks?state=delivered', 200, ADMIN_KEY)).items.length > 0);
    await answer('get', '/admin/hl7-status-messages', '/admin/hl7-status-messages?state=acknowledged', 200, ADMIN_KEY);
    await answer('post', '/admin/retention/run', '/admin/retention/run', 200, ADMIN_KEY);
    await answer('get', '/healthz', '/healthz', 200);
    await answer('get', '/readyz', '/readyz', 200);
  });

  test('every route the app serves is documented', () => {
    // The Express app is the server's request listener; walk its router for explicit routes.
    const app = gw.server?.listeners('request')[0] as Json;
    const routes: string[] = [];
    const mounts: string[] = [];
    const join = (a: string, b: string): string => `${a}/${b}`.replace(/\/+/g, '/').replace(/(.)\/$/, '$1');
    const walk = (stack: Json[], prefix: string): void => {
      for (const layer of stack) {
        const raw = typeof layer.rawPath === 'string' ? layer.rawPath : '/';
        if (layer.route) {
          for (const m of Object.keys(layer.route.methods)) if (m !== '_all') routes.push(`${m} ${join(prefix, layer.route.path)}`);
        } else if (Array.isArray(layer.handle?.stack)) {
          if (raw !== '/') mounts.push(join(prefix, raw));
          walk(layer.handle.stack, join(prefix, raw));
        }
      }
    };
    walk(app.router.stack, '');
    expect(routes.length).toBeGreaterThan(5);
    // The browser console's HTML pages (docs/console.md) are a user interface, not part of the API contract.
    const api = (r: string): boolean => !/^(\w+ )?\/console(\/|$)/.test(r);
    expect(routes.filter((r) => !api(r)).length).toBeGreaterThan(10);
    routes.splice(0, routes.length, ...routes.filter(api));
    mounts.splice(0, mounts.length, ...mounts.filter(api));
    const norm = (p: string): string => p.replace(/\{[^}]+\}/g, '{}').replace(/:[A-Za-z_]\w*/g, '{}');
    const docs = new Set(documented().map(({ method, path: p }) => `${method} ${norm(p)}`));
    const undocumented = routes.map((r) => norm(r)).filter((r) => !docs.has(r));
    expect(undocumented).toEqual([]);
    // Mounted routers that answer through middleware (the sandbox FHIR server) have documented paths.
    for (const m of mounts) expect([m, Object.keys(doc.paths).some((p) => p === m || p.startsWith(`${m}/`))]).toEqual([m, true]);
  });
});
