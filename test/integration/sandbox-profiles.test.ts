// Server profiles of the FHIR sandbox (src/sandbox/profiles.ts, docs/sandbox-profiles.md): each
// trait's behaviour when on, and the default behaviour when it is switched off by an override.
import type { Bundle, BundleEntry, DocumentReference, OperationOutcome, Patient, Resource, Task } from '@medplum/fhirtypes';
import { randomBytes, randomUUID } from 'node:crypto';
import http from 'node:http';
import { createSandboxRouter, startSandboxServer } from '../../src/sandbox/server';
import type { SandboxServer } from '../../src/sandbox/server';
import { SANDBOX_PROFILES, parseSandboxTraitOverrides, resolveSandboxTraits } from '../../src/sandbox/profiles';
import { spawnTs } from '../helpers/processes';

const SYS = 'https://ehr.example.org/ids';
const FHIR_JSON = 'application/fhir+json';

interface Reply<T = Resource> {
  status: number;
  headers: Headers;
  text: string;
  body: T;
}

const servers = new Map<string, SandboxServer>();

/** One server per profile + overrides, shared by the tests that need the same one. */
async function sandbox(profile: string, traits?: string): Promise<SandboxServer> {
  const key = `${profile}|${traits ?? ''}`;
  let server = servers.get(key);
  if (!server) {
    server = await startSandboxServer(0, { profile, traits });
    servers.set(key, server);
  }
  return server;
}

afterAll(async () => {
  await Promise.all([...servers.values()].map((s) => s.close()));
});

/** A request body as sent: text and bytes as they are, anything else as JSON. */
function requestBody(body: unknown): string | Buffer | undefined {
  if (body === undefined) return undefined;
  return typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
}

async function call<T = Resource>(
  server: SandboxServer,
  method: string,
  pathOrUrl: string,
  body?: unknown,
  headers: Record<string, string> = {}
): Promise<Reply<T>> {
  const url = pathOrUrl.startsWith('http') ? pathOrUrl : `${server.url}/${pathOrUrl}`;
  const res = await fetch(url, {
    method,
    headers: { accept: FHIR_JSON, ...(body !== undefined ? { 'content-type': FHIR_JSON } : {}), ...headers },
    body: requestBody(body),
  });
  const text = await res.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  return { status: res.status, headers: res.headers, text, body: parsed as T };
}

function issueText(body: unknown): string {
  return ((body as OperationOutcome | undefined)?.issue ?? []).map((i) => i.details?.text ?? i.diagnostics ?? '').join(' | ');
}

const urn = (): string => `urn:uuid:${randomUUID()}`;

function transaction(entry: BundleEntry[]): Bundle {
  return { resourceType: 'Bundle', type: 'transaction', entry };
}

/** Patient + ServiceRequest + Task, cross-referenced by urn:uuid (a referral in miniature). */
function referral(key: string): Bundle {
  const [p, sr, t] = [urn(), urn(), urn()];
  return transaction([
    {
      fullUrl: p,
      resource: { resourceType: 'Patient', identifier: [{ system: SYS, value: `p-${key}` }] },
      request: { method: 'POST', url: 'Patient' },
    },
    {
      fullUrl: sr,
      resource: {
        resourceType: 'ServiceRequest',
        status: 'active',
        intent: 'order',
        identifier: [{ system: SYS, value: `sr-${key}` }],
        subject: { reference: p },
      },
      request: { method: 'POST', url: 'ServiceRequest' },
    },
    {
      fullUrl: t,
      resource: {
        resourceType: 'Task',
        status: 'requested',
        intent: 'order',
        identifier: [{ system: SYS, value: `t-${key}` }],
        focus: { reference: sr },
        for: { reference: p },
      },
      request: { method: 'POST', url: 'Task' },
    },
  ]);
}

function conditionalPatients(n: number, conditional: boolean): Bundle {
  const tag = randomUUID();
  return transaction(
    Array.from({ length: n }, (_, i) => ({
      fullUrl: urn(),
      resource: { resourceType: 'Patient', identifier: [{ system: SYS, value: `${tag}-${i}` }] } as Patient,
      request: { method: 'POST', url: 'Patient', ...(conditional ? { ifNoneExist: `identifier=${SYS}|${tag}-${i}` } : {}) },
    }))
  );
}

/** GET with exactly the given Accept (fetch would add `Accept: *\/*` when there is none). */
function getWithoutDefaults(url: string, accept: string | undefined): Promise<{ status: number; contentType: string; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: accept ? { accept } : {} }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, contentType: res.headers['content-type'] ?? '', body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

const status = (entry: BundleEntry | undefined): string => entry?.response?.status ?? '';
const idOf = (location: string | undefined): string => (location ?? '').split('/')[1];

// ---------------------------------------------------------------------------------------------

describe('resolveSandboxTraits', () => {
  test('profiles', () => {
    const def = resolveSandboxTraits();
    expect(def.profile).toBe('default');
    expect(Object.entries(def).filter(([k, v]) => k !== 'profile' && v !== false && v !== undefined)).toEqual([]);
    expect(resolveSandboxTraits('medplum')).toEqual({
      profile: 'medplum',
      maxJsonBytes: 1_048_576,
      emptyMinimal: true,
      nonAtomic: true,
      strictIsolationMaxEntries: undefined,
      concurrentConflict: true,
      uuidIdsOnly: true,
      noUpdateAsCreate: true,
      noBinarySearch: true,
      presignedBinaryUrls: true,
      refuseNumericClientIds: false,
      opaquePagingLinks: false,
      versionConflictAs409: false,
    });
    const hapi = resolveSandboxTraits(' HAPI ');
    expect(hapi.profile).toBe('hapi');
    expect([hapi.refuseNumericClientIds, hapi.opaquePagingLinks, hapi.versionConflictAs409, hapi.nonAtomic, hapi.maxJsonBytes]).toEqual([
      true,
      true,
      true,
      false,
      undefined,
    ]);
    const strict = resolveSandboxTraits('strict');
    expect(strict).toMatchObject({
      ...SANDBOX_PROFILES.medplum,
      nonAtomic: false,
      strictIsolationMaxEntries: 8,
      refuseNumericClientIds: true,
      opaquePagingLinks: true,
      versionConflictAs409: true,
    });
  });

  test('override strings and objects', () => {
    const t = resolveSandboxTraits(
      'medplum',
      'nonAtomic=false,strictIsolationMaxEntries=8,-emptyMinimal,+noBinarySearch,maxJsonBytes=2000000,opaquePagingLinks'
    );
    expect(t).toMatchObject({
      nonAtomic: false,
      strictIsolationMaxEntries: 8,
      emptyMinimal: false,
      noBinarySearch: true,
      maxJsonBytes: 2_000_000,
      opaquePagingLinks: true,
    });
    expect(resolveSandboxTraits('medplum', 'maxJsonBytes=1mb,-presignedBinaryUrls').maxJsonBytes).toBe(1_048_576);
    expect(resolveSandboxTraits('medplum', 'maxJsonBytes=none').maxJsonBytes).toBeUndefined();
    expect(resolveSandboxTraits('medplum', ' NONATOMIC = off , ').nonAtomic).toBe(false);
    expect(resolveSandboxTraits('hapi', { versionConflictAs409: false, maxJsonBytes: 5000 })).toMatchObject({
      versionConflictAs409: false,
      maxJsonBytes: 5000,
    });
    expect(parseSandboxTraitOverrides('')).toEqual({});
  });

  test('errors name what is wrong', () => {
    expect(() => resolveSandboxTraits('bogus')).toThrow('Unknown sandbox profile "bogus" (known: default, medplum, hapi, strict)');
    expect(() => resolveSandboxTraits('medplum', 'nonAtomc=false')).toThrow(/Unknown sandbox trait "nonAtomc"/);
    expect(() => resolveSandboxTraits('medplum', 'nonAtomic=maybe')).toThrow(/Invalid value "maybe" for sandbox trait nonAtomic/);
    expect(() => resolveSandboxTraits('medplum', 'maxJsonBytes=lots')).toThrow(/Invalid value "lots" for sandbox trait maxJsonBytes/);
    expect(() => resolveSandboxTraits('medplum', 'strictIsolationMaxEntries=8mb')).toThrow(/strictIsolationMaxEntries/);
    expect(() => resolveSandboxTraits('medplum', '+maxJsonBytes')).toThrow(/needs a value/);
    expect(() => resolveSandboxTraits('medplum', { nonAtomic: 'no' as unknown as boolean })).toThrow(/expected true or false/);
  });
});

describe('maxJsonBytes', () => {
  const bigTransaction = (): Bundle =>
    transaction([
      {
        fullUrl: urn(),
        resource: { resourceType: 'Binary', contentType: 'application/pdf', data: randomBytes(900_000).toString('base64') },
        request: { method: 'POST', url: 'Binary' },
      },
    ]);

  test('medplum refuses a 1.2 MB transaction with 400 "File too large"; default and maxJsonBytes=2mb accept it', async () => {
    const body = JSON.stringify(bigTransaction());
    expect(body.length).toBeGreaterThan(1_150_000);
    const refused = await call(await sandbox('medplum'), 'POST', '', body);
    expect(refused.status).toBe(400);
    expect((refused.body as unknown as OperationOutcome).issue?.[0]).toMatchObject({ code: 'invalid', details: { text: 'File too large' } });
    for (const server of [await sandbox('default'), await sandbox('medplum', 'maxJsonBytes=2mb')]) {
      const accepted = await call<Bundle>(server, 'POST', '', body);
      expect(accepted.status).toBe(200);
      expect(status(accepted.body.entry?.[0])).toBe('201 Created');
    }
  });

  test('the cap does not apply to raw Binary bodies', async () => {
    const res = await call(await sandbox('medplum'), 'POST', 'Binary', randomBytes(2_500_000), { 'content-type': 'application/pdf' });
    expect(res.status).toBe(201);
  });
});

describe('emptyMinimal', () => {
  test('medplum answers Prefer: return=minimal with an empty 200 (transaction) / 201 (create); -emptyMinimal answers a Bundle', async () => {
    const prefer = { prefer: 'return=minimal' };
    const server = await sandbox('medplum');
    const tx = await call(server, 'POST', '', referral(randomUUID()), prefer);
    expect(tx.status).toBe(200);
    expect(tx.text).toBe('');
    const batch = await call(server, 'POST', '', { ...conditionalPatients(2, false), type: 'batch' }, prefer);
    expect([batch.status, batch.text]).toEqual([200, '']);
    const created = await call(server, 'POST', 'Patient', { resourceType: 'Patient' }, prefer);
    expect([created.status, created.text]).toEqual([201, '']);
    expect(created.headers.get('location')).toMatch(/\/Patient\/[0-9a-f-]{36}\/_history\//);

    const off = await call<Bundle>(await sandbox('medplum', '-emptyMinimal'), 'POST', '', referral(randomUUID()), prefer);
    expect(off.status).toBe(200);
    expect(off.body.type).toBe('transaction-response');
    expect(off.body.entry?.map((e) => [status(e), e.resource])).toEqual([
      ['201 Created', undefined],
      ['201 Created', undefined],
      ['201 Created', undefined],
    ]);
  });
});

describe('nonAtomic', () => {
  test('medplum: a failing ServiceRequest entry is answered in the 200 response; the Task is stored pointing at a ServiceRequest that 404s', async () => {
    const server = await sandbox('medplum');
    const fault = await fetch(server.url.replace('/fhir/R4', '/_sandbox/faults'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ failNextEntry: { resourceType: 'ServiceRequest', status: 409 } }),
    });
    expect(fault.status).toBe(204);
    expect(server.faults.pending()).toEqual([{ resourceType: 'ServiceRequest', status: 409, remaining: 1 }]);

    const res = await call<Bundle>(server, 'POST', '', referral(randomUUID()));
    expect(res.status).toBe(200);
    const [patient, sr, task] = res.body.entry ?? [];
    expect([status(patient), status(sr), status(task)]).toEqual(['201 Created', '409 Conflict', '201 Created']);
    expect(sr.resource).toBeUndefined();
    expect(sr.response?.outcome?.issue?.[0]?.severity).toBe('error');
    expect(server.faults.pending()).toEqual([]);

    const stored = await call<Task>(server, 'GET', `Task/${idOf(task.response?.location)}`);
    expect(stored.status).toBe(200);
    const focus = stored.body.focus?.reference ?? '';
    expect(focus).toMatch(/^ServiceRequest\/[0-9a-f-]{36}$/);
    expect((await call(server, 'GET', focus)).status).toBe(404);
    expect((await call(server, 'GET', `Patient/${idOf(patient.response?.location)}`)).status).toBe(200);
  });

  test('nonAtomic=false (and default): the same fault fails the whole transaction with 409 and nothing is written', async () => {
    for (const server of [await sandbox('medplum', 'nonAtomic=false'), await sandbox('default')]) {
      server.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 409 });
      const key = randomUUID();
      const res = await call(server, 'POST', '', referral(key));
      expect(res.status).toBe(409);
      expect(issueText(res.body)).toMatch(/Bundle\.entry\[1\]/);
      const tasks = await call<Bundle>(server, 'GET', `Task?identifier=${encodeURIComponent(`${SYS}|t-${key}`)}`);
      const patients = await call<Bundle>(server, 'GET', `Patient?identifier=${encodeURIComponent(`${SYS}|p-${key}`)}`);
      expect([tasks.body.total, patients.body.total]).toEqual([0, 0]);
    }
  });

  test('bad fault requests are refused', async () => {
    const server = await sandbox('default');
    const res = await fetch(server.url.replace('/fhir/R4', '/_sandbox/faults'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ failNextEntry: { resourceType: 'ServiceRequest', status: 200 } }),
    });
    expect(res.status).toBe(400);
    expect(() => server.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 409, count: 0 })).toThrow(/count/);
  });
});

describe('strictIsolationMaxEntries', () => {
  test('atomic Medplum: 9 conditional entries refused, 8 accepted, 9 non-conditional accepted; default has no limit', async () => {
    const atomic = await sandbox('medplum', 'nonAtomic=false,strictIsolationMaxEntries=8');
    const nine = await call(atomic, 'POST', '', conditionalPatients(9, true));
    expect(nine.status).toBe(400);
    expect(issueText(nine.body)).toBe('Transaction requires strict isolation but has too many entries');
    expect((await call(atomic, 'POST', '', conditionalPatients(8, true))).status).toBe(200);
    expect((await call(atomic, 'POST', '', conditionalPatients(9, false))).status).toBe(200);
    expect((await call(await sandbox('strict'), 'POST', '', conditionalPatients(9, true))).status).toBe(400);

    expect((await call(await sandbox('default'), 'POST', '', conditionalPatients(9, true))).status).toBe(200);
    expect((await call(await sandbox('medplum'), 'POST', '', conditionalPatients(9, true))).status).toBe(200); // non-atomic: no limit
  });
});

describe('concurrentConflict', () => {
  test('medplum: of 4 simultaneous transactions at least one gets a 409 on its ServiceRequest entry; the other entries are stored', async () => {
    const server = await sandbox('medplum');
    const replies = await Promise.all([0, 1, 2, 3].map(() => call<Bundle>(server, 'POST', '', referral(randomUUID()))));
    let conflicts = 0;
    for (const reply of replies) {
      expect(reply.status).toBe(200);
      const entries = reply.body.entry ?? [];
      for (const [i, entry] of entries.entries()) {
        if (status(entry).startsWith('409')) {
          conflicts++;
          expect(i).toBe(1); // the ServiceRequest
          expect(entry.response?.outcome?.issue?.[0]?.code).toBe('conflict');
        } else {
          expect(status(entry)).toBe('201 Created');
          const [type, id] = (entry.response?.location ?? '').split('/');
          expect((await call(server, 'GET', `${type}/${id}`)).status).toBe(200);
        }
      }
    }
    expect(conflicts).toBeGreaterThanOrEqual(1);
  });

  test('-concurrentConflict: simultaneous transactions all succeed', async () => {
    const server = await sandbox('medplum', '-concurrentConflict');
    const replies = await Promise.all([0, 1, 2, 3].map(() => call<Bundle>(server, 'POST', '', referral(randomUUID()))));
    expect(replies.flatMap((r) => (r.body.entry ?? []).map(status))).toEqual(Array(12).fill('201 Created'));
  });
});

describe('uuidIdsOnly and noUpdateAsCreate', () => {
  test('medplum: server ids are UUIDs, POST ignores the body id, non-UUID ids are 400, PUT to an unknown id is 404', async () => {
    const server = await sandbox('medplum');
    const created = await call<Patient>(server, 'POST', 'Patient', { resourceType: 'Patient', id: 'my-own-id' });
    expect(created.status).toBe(201);
    expect(created.body.id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);

    const invalid = await call(server, 'PUT', 'Patient/p-1', { resourceType: 'Patient', id: 'p-1' });
    expect([invalid.status, issueText(invalid.body)]).toEqual([400, 'Invalid id']);
    const id = randomUUID();
    expect((await call(server, 'PUT', `Patient/${id}`, { resourceType: 'Patient', id })).status).toBe(404);
    const existing = created.body.id as string;
    expect((await call(server, 'PUT', `Patient/${existing}`, { resourceType: 'Patient', id: existing, active: true })).status).toBe(200);

    // inside a (non-atomic) transaction: the PUT entry fails alone
    const tx = await call<Bundle>(
      server,
      'POST',
      '',
      transaction([
        { resource: { resourceType: 'Binary', id: 'rg-doc-1', contentType: 'text/plain', data: 'aGk=' }, request: { method: 'PUT', url: 'Binary/rg-doc-1' } },
        { resource: { resourceType: 'Patient' }, request: { method: 'POST', url: 'Patient' } },
      ])
    );
    expect(tx.body.entry?.map(status)).toEqual(['400 Bad Request', '201 Created']);

    const metadata = await call<{ software: { name: string }; rest: { resource: { type: string; updateCreate: boolean }[] }[] }>(server, 'GET', 'metadata');
    expect(metadata.body.software.name).toMatch(/Medplum/);
    expect(metadata.body.rest[0].resource.find((r) => r.type === 'Patient')?.updateCreate).toBe(false);
  });

  test('switched off, PUT creates with a client id; noUpdateAsCreate alone refuses it even for a UUID', async () => {
    const off = await sandbox('medplum', '-uuidIdsOnly,-noUpdateAsCreate');
    expect((await call(off, 'PUT', 'Patient/p-1', { resourceType: 'Patient', id: 'p-1' })).status).toBe(201);
    const metadata = await call<{ rest: { resource: { updateCreate: boolean }[] }[] }>(off, 'GET', 'metadata');
    expect(metadata.body.rest[0].resource[0].updateCreate).toBe(true);

    const only = await sandbox('default', '+noUpdateAsCreate');
    const id = randomUUID();
    expect((await call(only, 'PUT', `Patient/${id}`, { resourceType: 'Patient', id })).status).toBe(404);
    expect((await call(only, 'PUT', 'Patient/p-2', { resourceType: 'Patient', id: 'p-2' })).status).toBe(404);
    // a conditional PUT that matches nothing may still create, without an id
    const conditional = await call(only, 'PUT', `Patient?identifier=${SYS}|${id}`, { resourceType: 'Patient', identifier: [{ system: SYS, value: id }] });
    expect(conditional.status).toBe(201);
    const withId = await call(only, 'PUT', `Patient?identifier=${SYS}|x-${id}`, {
      resourceType: 'Patient',
      id: 'x1',
      identifier: [{ system: SYS, value: `x-${id}` }],
    });
    expect([withId.status, issueText(withId.body)]).toEqual([400, 'Cannot provide ID for create by update']);
  });
});

describe('noBinarySearch', () => {
  const tagged = (): Bundle =>
    transaction([
      {
        fullUrl: urn(),
        resource: { resourceType: 'Binary', contentType: 'text/plain', data: 'aGk=', meta: { tag: [{ system: SYS, code: 'doc-1' }] } },
        request: { method: 'POST', url: 'Binary', ifNoneExist: `_tag=${SYS}|doc-1` },
      },
      { resource: { resourceType: 'Patient' }, request: { method: 'POST', url: 'Patient' } },
    ]);

  test('medplum: searches on Binary are 400, including ifNoneExist on a Binary entry', async () => {
    const server = await sandbox('medplum');
    const text = 'Cannot search on Binary resource type';
    const get = await call(server, 'GET', 'Binary?_id=x');
    expect([get.status, issueText(get.body)]).toEqual([400, text]);
    const post = await call(server, 'POST', 'Binary/_search', '_id=x', { 'content-type': 'application/x-www-form-urlencoded' });
    expect([post.status, issueText(post.body)]).toEqual([400, text]);
    const tx = await call<Bundle>(server, 'POST', '', tagged());
    expect(tx.body.entry?.map(status)).toEqual(['400 Bad Request', '201 Created']);
    expect(issueText(tx.body.entry?.[0].response?.outcome)).toBe(text);
    const atomic = await call(await sandbox('medplum', 'nonAtomic=false'), 'POST', '', tagged());
    expect(atomic.status).toBe(400);
    expect(issueText(atomic.body)).toContain(text);
  });

  test('default (and -noBinarySearch): Binary searches are not refused as such', async () => {
    // (the loaded R4 definitions give Binary no search parameters, so only parameterless searches work)
    for (const server of [await sandbox('default'), await sandbox('medplum', '-noBinarySearch')]) {
      const get = await call<Bundle>(server, 'GET', 'Binary?_count=1');
      expect([get.status, get.body.resourceType]).toEqual([200, 'Bundle']);
      const tx = await call<Bundle>(server, 'POST', '', tagged());
      expect(issueText(tx.status === 200 ? tx.body.entry?.[0].response?.outcome : tx.body)).toMatch(/Unknown search parameter "_tag" for Binary/);
    }
  });
});

describe('presignedBinaryUrls', () => {
  test('medplum: attachment Binary/<id> is read back as a presigned URL on another port that serves the bytes without credentials', async () => {
    const server = await sandbox('medplum');
    const bytes = randomBytes(300_000);
    const upload = await call<{ resourceType: string; id: string; contentType: string; url?: string }>(server, 'POST', 'Binary', bytes, {
      'content-type': 'application/pdf',
    });
    expect(upload.status).toBe(201);
    expect(upload.body).toMatchObject({ resourceType: 'Binary', contentType: 'application/pdf' });
    expect(upload.headers.get('location')).toMatch(new RegExp(`/Binary/${upload.body.id}/_history/[^/]+$`));
    expect(upload.body.url).toMatch(/\/storage\//);
    const binaryId = upload.body.id;

    const doc = await call<DocumentReference>(server, 'POST', 'DocumentReference', {
      resourceType: 'DocumentReference',
      status: 'current',
      content: [{ attachment: { contentType: 'application/pdf', url: `Binary/${binaryId}` } }, { attachment: { url: `${server.url}/Binary/${binaryId}` } }],
    });
    expect(doc.status).toBe(201);
    const read = await call<DocumentReference>(server, 'GET', `DocumentReference/${doc.body.id}`);
    const url = read.body.content[0].attachment.url ?? '';
    const parsed = new URL(url);
    expect(parsed.hostname).toBe('127.0.0.1');
    expect(Number(parsed.port)).not.toBe(server.port);
    expect(parsed.pathname).toMatch(new RegExp(`^/storage/${binaryId}/[^/]+$`));
    expect(parsed.searchParams.get('Expires')).toMatch(/^\d+$/);
    expect(parsed.searchParams.get('Signature')).toBeTruthy();
    expect(read.body.content[1].attachment.url).toMatch(/\/storage\//); // absolute under the base too
    expect(server.storageUrl).toBe(`${parsed.protocol}//${parsed.host}`);

    const got = await fetch(url);
    expect(got.status).toBe(200);
    expect(got.headers.get('content-type')).toBe('application/pdf');
    expect(Buffer.from(await got.arrayBuffer()).equals(bytes)).toBe(true);
    expect((await fetch(url, { headers: { authorization: 'Bearer secret' } })).status).toBe(400);
    const tampered = new URL(url);
    tampered.searchParams.set('Signature', 'x' + (tampered.searchParams.get('Signature') ?? '').slice(1));
    expect((await fetch(tampered)).status).toBe(403);
    const expired = new URL(url);
    expired.searchParams.set('Expires', '1000');
    expect((await fetch(expired)).status).toBe(403);

    // search results are rewritten too; the stored resource keeps Binary/<id>, also when written back
    const search = await call<Bundle<DocumentReference>>(server, 'GET', `DocumentReference?_id=${doc.body.id}`);
    expect(search.body.entry?.[0].resource?.content[0].attachment.url).toMatch(/\/storage\//);
    const stored = await server.repo.readResource<DocumentReference>('DocumentReference', doc.body.id as string);
    expect(stored.content[0].attachment.url).toBe(`Binary/${binaryId}`);
    const putBack = await call(server, 'PUT', `DocumentReference/${doc.body.id}`, { ...read.body, meta: undefined });
    expect(putBack.status).toBe(200);
    const storedAgain = await server.repo.readResource<DocumentReference>('DocumentReference', doc.body.id as string);
    expect(storedAgain.content[0].attachment.url).toBe(`Binary/${binaryId}`);
  });

  test('-presignedBinaryUrls: attachment URLs are returned as stored and there is no storage server', async () => {
    const server = await sandbox('medplum', '-presignedBinaryUrls');
    expect(server.storageUrl).toBeUndefined();
    const upload = await call<{ id: string }>(server, 'POST', 'Binary', Buffer.from('%PDF-1.4'), { 'content-type': 'application/pdf' });
    const doc = await call<DocumentReference>(server, 'POST', 'DocumentReference', {
      resourceType: 'DocumentReference',
      status: 'current',
      content: [{ attachment: { url: `Binary/${upload.body.id}` } }],
    });
    const read = await call<DocumentReference>(server, 'GET', `DocumentReference/${doc.body.id}`);
    expect(read.body.content[0].attachment.url).toBe(`Binary/${upload.body.id}`);
  });
});

describe('raw Binary (every profile)', () => {
  test('default: 64 MB raw round trip; Accept decides raw bytes or Binary JSON', async () => {
    const server = await sandbox('default');
    const big = randomBytes(64 * 1024 * 1024);
    const upload = await call<{ id: string; data?: string }>(server, 'POST', 'Binary', big, { 'content-type': 'application/dicom' });
    expect(upload.status).toBe(201);
    expect(upload.body.data).toBeUndefined(); // a write response does not echo the upload
    const raw = await fetch(`${server.url}/Binary/${upload.body.id}`, { headers: { accept: '*/*' } });
    expect(raw.status).toBe(200);
    expect(raw.headers.get('content-type')).toBe('application/dicom');
    expect(Buffer.from(await raw.arrayBuffer()).equals(big)).toBe(true);

    const small = Buffer.from('%PDF-1.4 small document');
    const put = await call<{ id: string }>(server, 'PUT', 'Binary/doc-1', small, { 'content-type': 'application/pdf' });
    expect(put.status).toBe(201);
    expect(put.headers.get('location')).toMatch(/\/Binary\/doc-1\/_history\/[^/]+$/);
    const pdf = await fetch(`${server.url}/Binary/doc-1`, { headers: { accept: 'application/pdf, application/fhir+json;q=0.1' } });
    expect(pdf.headers.get('content-type')).toBe('application/pdf');
    expect(Buffer.from(await pdf.arrayBuffer()).equals(small)).toBe(true);
    for (const accept of ['application/fhir+json', 'application/json', undefined]) {
      const json = await getWithoutDefaults(`${server.url}/Binary/doc-1`, accept);
      expect(json.contentType).toMatch(/^application\/fhir\+json/);
      const binary = JSON.parse(json.body.toString('utf8')) as { resourceType: string; contentType: string; data: string };
      expect(binary).toMatchObject({ resourceType: 'Binary', contentType: 'application/pdf' });
      expect(Buffer.from(binary.data, 'base64').equals(small)).toBe(true);
    }
    // a Binary created as JSON is served raw too
    const jsonBinary = await call<{ id: string }>(server, 'POST', 'Binary', {
      resourceType: 'Binary',
      contentType: 'text/plain',
      data: Buffer.from('hello').toString('base64'),
    });
    const text = await fetch(`${server.url}/Binary/${jsonBinary.body.id}`, { headers: { accept: 'text/plain' } });
    expect([text.headers.get('content-type'), await text.text()]).toEqual(['text/plain', 'hello']);
    const minimal = await call(server, 'POST', 'Binary', small, { 'content-type': 'application/octet-stream', prefer: 'return=minimal' });
    expect([minimal.status, minimal.text]).toEqual([201, '']);
  });

  test('hapi: raw PUT with a numeric id is refused, with a non-numeric id it creates', async () => {
    const server = await sandbox('hapi');
    const numeric = await call(server, 'PUT', 'Binary/123', Buffer.from('x'), { 'content-type': 'application/pdf' });
    expect(numeric.status).toBe(400);
    expect(issueText(numeric.body)).toMatch(/^HAPI-0960: Can not create resource with ID\[123\]/);
    expect((await call(server, 'PUT', 'Binary/doc-123', Buffer.from('x'), { 'content-type': 'application/pdf' })).status).toBe(201);
  });
});

describe('refuseNumericClientIds', () => {
  test('hapi: numeric client ids 400 (also in a transaction), non-numeric PUT creates; -refuseNumericClientIds accepts both', async () => {
    const server = await sandbox('hapi');
    const res = await call(server, 'PUT', 'Patient/123', { resourceType: 'Patient', id: '123' });
    expect(res.status).toBe(400);
    expect(issueText(res.body)).toBe(
      'HAPI-0960: Can not create resource with ID[123], no resource with this ID exists and clients may only assign IDs which contain at least one non-numeric character'
    );
    expect((await call(server, 'PUT', 'Patient/p123', { resourceType: 'Patient', id: 'p123' })).status).toBe(201);
    const tx = await call(
      server,
      'POST',
      '',
      transaction([{ resource: { resourceType: 'Patient', id: '456' }, request: { method: 'PUT', url: 'Patient/456' } }])
    );
    expect(tx.status).toBe(400);
    const off = await sandbox('hapi', '-refuseNumericClientIds');
    expect((await call(off, 'PUT', 'Patient/123', { resourceType: 'Patient', id: '123' })).status).toBe(201);
  });
});

describe('opaquePagingLinks', () => {
  async function seed(server: SandboxServer, tag: string): Promise<void> {
    const entry: BundleEntry[] = Array.from({ length: 25 }, () => ({
      resource: { resourceType: 'Patient', meta: { tag: [{ system: SYS, code: tag }] } } as Patient,
      request: { method: 'POST', url: 'Patient' },
    }));
    expect((await call(server, 'POST', '', transaction(entry))).status).toBe(200);
  }

  test('hapi: next links are <base>?_getpages=…; following them returns every result once', async () => {
    const server = await sandbox('hapi');
    const tag = randomUUID();
    await seed(server, tag);
    let next: string | undefined = `${server.url}/Patient?_tag=${encodeURIComponent(`${SYS}|${tag}`)}&_count=10`;
    const ids: string[] = [];
    const links: string[] = [];
    while (next) {
      const page: Reply<Bundle> = await call<Bundle>(server, 'GET', next);
      expect(page.status).toBe(200);
      ids.push(...(page.body.entry ?? []).map((e) => e.resource?.id as string));
      next = page.body.link?.find((l) => l.relation === 'next')?.url;
      if (next) {
        links.push(next);
      }
      expect(ids.length).toBeLessThanOrEqual(25);
    }
    expect(links).toHaveLength(2);
    for (const [i, link] of links.entries()) {
      expect(link.startsWith(`${server.url}?_getpages=`)).toBe(true);
      expect(link).toMatch(new RegExp(`^[^?]+\\?_getpages=[0-9a-f-]{36}&_getpagesoffset=${(i + 1) * 10}&_count=10&_bundletype=searchset$`));
    }
    expect(new Set(ids).size).toBe(25);
    expect((await call(server, 'GET', `${server.url}?_getpages=nope&_getpagesoffset=10&_count=10`)).status).toBe(410);
  });

  test('-opaquePagingLinks: next links are type searches with _offset', async () => {
    const server = await sandbox('hapi', '-opaquePagingLinks');
    const tag = randomUUID();
    await seed(server, tag);
    const page = await call<Bundle>(server, 'GET', `Patient?_tag=${encodeURIComponent(`${SYS}|${tag}`)}&_count=10`);
    expect(page.body.link?.find((l) => l.relation === 'next')?.url).toMatch(/\/Patient\?.*_offset=10/);
  });
});

describe('versionConflictAs409', () => {
  async function staleUpdate(server: SandboxServer): Promise<Reply> {
    const created = await call<Patient>(server, 'POST', 'Patient', { resourceType: 'Patient' });
    const etag = created.headers.get('etag') as string;
    const id = created.body.id as string;
    expect((await call(server, 'PUT', `Patient/${id}`, { resourceType: 'Patient', id, active: true }, { 'if-match': etag })).status).toBe(200);
    return call(server, 'PUT', `Patient/${id}`, { resourceType: 'Patient', id, active: false }, { 'if-match': etag });
  }

  test('hapi answers a stale If-Match with 409; default and -versionConflictAs409 with 412', async () => {
    const conflict = await staleUpdate(await sandbox('hapi'));
    expect(conflict.status).toBe(409);
    expect(issueText(conflict.body)).toMatch(/not the current version/);
    expect((await staleUpdate(await sandbox('default'))).status).toBe(412);
    expect((await staleUpdate(await sandbox('hapi', '-versionConflictAs409'))).status).toBe(412);
  });
});

describe('router API, stats and metadata', () => {
  test('createSandboxRouter: traits, ready, close; unknown profile throws', async () => {
    const medplum = createSandboxRouter({ profile: 'medplum', traits: { nonAtomic: false } });
    expect(medplum.traits).toMatchObject({ profile: 'medplum', nonAtomic: false, emptyMinimal: true });
    await medplum.ready;
    expect(medplum.storageUrl()).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    await medplum.close();
    const plain = createSandboxRouter();
    await plain.ready;
    expect(plain.traits.profile).toBe('default');
    expect(plain.storageUrl()).toBeUndefined();
    await plain.close();
    expect(() => createSandboxRouter({ profile: 'firely' })).toThrow(/Unknown sandbox profile "firely"/);
  });

  test('stats name the profile; metadata names the software', async () => {
    const hapi = await sandbox('hapi');
    const stats = (await (await fetch(hapi.url.replace('/fhir/R4', '/_sandbox/stats'))).json()) as { profile: string; requests: number };
    expect(stats.profile).toBe('hapi');
    expect(stats.requests).toBeGreaterThan(0);
    const metadata = await call<{ fhirVersion: string; software: { name: string }; implementation: { description: string } }>(hapi, 'GET', 'metadata');
    expect(metadata.body.fhirVersion).toBe('4.0.1');
    expect(metadata.body.software.name).toMatch(/HAPI/);
    expect(metadata.body.implementation.description).toBe('referral-gateway FHIR R4 sandbox (profile hapi)');
    const medplum = await call<{ software: { name: string } }>(await sandbox('medplum'), 'GET', 'metadata');
    expect(medplum.body.software.name).toMatch(/Medplum/);
  });
});

describe('CLI', () => {
  function run(env: Record<string, string>, untilLine?: RegExp): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawnTs('src/cli/sandbox.ts', { PORT: '0', HOST: '127.0.0.1', ...env });
      let stdout = '';
      let stderr = '';
      const timer = setTimeout(() => child.kill('SIGKILL'), 40_000);
      child.stdout?.on('data', (chunk: Buffer) => {
        stdout += chunk.toString();
        if (untilLine?.test(stdout)) {
          child.kill('SIGTERM');
        }
      });
      child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      child.on('error', reject);
      // 'close', not 'exit': exit can come before the last stdout chunk (the sandbox-stopped line) is read.
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, stdout, stderr });
      });
    });
  }

  test('SANDBOX_PROFILE=bogus exits 1 with a one-line error; medplum prints its profile', async () => {
    const [bogus, medplum] = await Promise.all([
      run({ SANDBOX_PROFILE: 'bogus' }),
      run({ SANDBOX_PROFILE: 'medplum', SANDBOX_TRAITS: 'nonAtomic=false' }, /sandbox-listening.*\n/),
    ]);
    expect(bogus.code).toBe(1);
    expect(bogus.stderr.trim().split('\n')).toHaveLength(1);
    expect(bogus.stderr).toMatch(/Unknown sandbox profile "bogus"/);
    const line = JSON.parse(medplum.stdout.split('\n')[0]) as { event: string; url: string; profile: string; traits?: string; storageUrl?: string };
    expect(line).toMatchObject({ event: 'sandbox-listening', profile: 'medplum', traits: 'nonAtomic=false' });
    expect(line.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/fhir\/R4$/);
    expect(line.storageUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(medplum.stdout).toContain('"event":"sandbox-stopped"');
    expect(medplum.code).toBe(0);
  }, 60_000);
});
