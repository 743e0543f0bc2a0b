import type { Bundle, BundleEntry, OperationOutcome, Patient, Resource, Task } from '@medplum/fhirtypes';
import { randomUUID } from 'node:crypto';
import express from 'express';
import request from 'supertest';
import { createSandboxRouter, startSandboxServer } from '../../src/sandbox/server';
import type { SandboxServer } from '../../src/sandbox/server';

const SYS = 'https://ehr.example.org/ids';
const FHIR_JSON = 'application/fhir+json';

let server: SandboxServer;

interface FhirReply<T = Resource> {
  status: number;
  headers: Headers;
  body: T;
}

/** A request body as sent: text as it is, anything else as JSON. */
function requestBody(body: unknown): string | undefined {
  if (body === undefined) return undefined;
  return typeof body === 'string' ? body : JSON.stringify(body);
}

async function fhir<T = Resource>(method: string, pathOrUrl: string, body?: unknown, headers: Record<string, string> = {}): Promise<FhirReply<T>> {
  const url = pathOrUrl.startsWith('http') ? pathOrUrl : `${server.url}/${pathOrUrl}`;
  const res = await fetch(url, {
    method,
    headers: { accept: FHIR_JSON, ...(body !== undefined ? { 'content-type': FHIR_JSON } : {}), ...headers },
    body: requestBody(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: (text ? JSON.parse(text) : undefined) as T };
}

async function searchAll<T extends Resource>(query: string): Promise<{ pages: number; resources: T[]; totals: number[] }> {
  let next: string | undefined = `${server.url}/${query}`;
  const resources: T[] = [];
  const totals: number[] = [];
  let pages = 0;
  while (next) {
    const page: FhirReply<Bundle<T>> = await fhir<Bundle<T>>('GET', next);
    expect(page.status).toBe(200);
    pages++;
    totals.push(page.body.total ?? -1);
    resources.push(...(page.body.entry ?? []).map((e) => e.resource as T));
    next = page.body.link?.find((l) => l.relation === 'next')?.url;
    expect(pages).toBeLessThan(20); // guards against a paging loop
  }
  return { pages, resources, totals };
}

async function total(query: string): Promise<number> {
  const res = await fhir<Bundle>('GET', `${query}${query.includes('?') ? '&' : '?'}_summary=count`);
  expect(res.status).toBe(200);
  return res.body.total as number;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A referral-shaped transaction: 15 entries, every one a conditional create (ifNoneExist on its
 * identifier), cross-referencing each other via urn:uuid fullUrls — including forward references
 * (Task comes first) and upper-case uuids in some fullUrls and references.
 */
function referralTransaction(key: string): { bundle: Bundle; urns: Record<string, string> } {
  const u = (upper = false): string => {
    const id = `urn:uuid:${randomUUID()}`;
    return upper ? id.toUpperCase().replace('URN:UUID:', 'urn:uuid:') : id;
  };
  const urns = {
    task: u(),
    serviceRequest: u(true),
    patient: u(true),
    practitioner: u(),
    role: u(),
    requesterOrg: u(),
    centreOrg: u(),
    condition: u(),
    obsStage: u(),
    obsEcog: u(),
    obsHer2: u(),
    report: u(),
    document: u(),
    encounter: u(),
    procedure: u(),
  };
  const ident = (name: string) => [{ system: SYS, value: `${key}-${name}` }];
  const ref = (urn: string) => ({ reference: urn.toLowerCase() === urn ? urn : urn.toUpperCase() });
  const code = (c: string) => ({ coding: [{ system: 'http://loinc.org', code: c }] });
  const resources: [string, Resource][] = [
    [
      urns.task,
      {
        resourceType: 'Task',
        identifier: ident('task'),
        status: 'requested',
        intent: 'order',
        focus: ref(urns.serviceRequest),
        for: ref(urns.patient),
        requester: ref(urns.requesterOrg),
        owner: ref(urns.centreOrg),
      },
    ],
    [
      urns.serviceRequest,
      {
        resourceType: 'ServiceRequest',
        identifier: ident('sr'),
        status: 'active',
        intent: 'order',
        subject: ref(urns.patient),
        requester: ref(urns.role),
        performer: [ref(urns.centreOrg)],
        reasonReference: [ref(urns.condition)],
        supportingInfo: [ref(urns.obsStage), ref(urns.obsEcog), ref(urns.obsHer2), ref(urns.report), ref(urns.document)],
      },
    ],
    [urns.patient, { resourceType: 'Patient', identifier: ident('patient'), name: [{ family: 'Test', given: ['Ada'] }] }],
    [urns.practitioner, { resourceType: 'Practitioner', identifier: ident('practitioner'), name: [{ family: 'Gp' }] }],
    [
      urns.role,
      {
        resourceType: 'PractitionerRole',
        identifier: ident('role'),
        practitioner: ref(urns.practitioner),
        organization: ref(urns.requesterOrg),
      },
    ],
    [urns.requesterOrg, { resourceType: 'Organization', identifier: ident('org-ehr'), name: 'Referring practice' }],
    [urns.centreOrg, { resourceType: 'Organization', identifier: ident('org-centre'), name: 'Cancer centre' }],
    [urns.condition, { resourceType: 'Condition', identifier: ident('condition'), subject: ref(urns.patient), code: code('C50.9') }],
    ...(['obsStage', 'obsEcog', 'obsHer2'] as const).map((name): [string, Resource] => [
      urns[name],
      {
        resourceType: 'Observation',
        identifier: ident(name),
        status: 'final',
        code: code(name),
        subject: ref(urns.patient),
        focus: [ref(urns.condition)],
      },
    ]),
    [
      urns.report,
      {
        resourceType: 'DiagnosticReport',
        identifier: ident('report'),
        status: 'final',
        code: code('report'),
        subject: ref(urns.patient),
        result: [ref(urns.obsHer2)],
      },
    ],
    [
      urns.document,
      {
        resourceType: 'DocumentReference',
        identifier: ident('document'),
        status: 'current',
        subject: ref(urns.patient),
        content: [{ attachment: { contentType: 'application/pdf', title: 'Letter', url: 'https://ehr.example.org/doc/1' } }],
      },
    ],
    [
      urns.encounter,
      {
        resourceType: 'Encounter',
        identifier: ident('encounter'),
        status: 'finished',
        class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB' },
        subject: ref(urns.patient),
      },
    ],
    [
      urns.procedure,
      {
        resourceType: 'Procedure',
        identifier: ident('procedure'),
        status: 'completed',
        subject: ref(urns.patient),
        encounter: ref(urns.encounter),
      },
    ],
  ];
  const entry: BundleEntry[] = resources.map(([fullUrl, resource]) => ({
    fullUrl,
    resource,
    request: { method: 'POST', url: resource.resourceType, ifNoneExist: `identifier=${encodeURIComponent(identifierOf(resource))}` },
  }));
  return { bundle: { resourceType: 'Bundle', type: 'transaction', entry }, urns };
}

function identifierOf(resource: Resource | undefined): string {
  const id = (resource as { identifier?: { system: string; value: string }[] } | undefined)?.identifier?.[0];
  return `${id?.system}|${id?.value}`;
}

const LOCATION = /^([A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})\/_history\/([A-Za-z0-9\-.]{1,64})$/;

beforeAll(async () => {
  server = await startSandboxServer(0);
});

afterAll(async () => {
  await server?.close();
});

describe('transactions', () => {
  const key = `ref-${randomUUID()}`;
  let first: Bundle;

  test('15 conditional entries with cross references are created and references rewritten', async () => {
    const { bundle } = referralTransaction(key);
    expect(bundle.entry).toHaveLength(15);
    const res = await fhir<Bundle>('POST', '', bundle);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/fhir\+json/);
    first = res.body;
    expect(first.type).toBe('transaction-response');
    expect(first.entry).toHaveLength(15);
    for (const [i, e] of (first.entry ?? []).entries()) {
      expect(e.response?.status).toBe('201 Created');
      const m = LOCATION.exec(e.response?.location ?? '');
      expect(m).not.toBeNull();
      expect(m?.[1]).toBe(bundle.entry?.[i].resource?.resourceType);
      expect(e.resource?.meta?.versionId).toBe(m?.[3]);
      expect(e.resource?.meta?.lastUpdated).toEqual(expect.any(String));
    }

    const idOf = (i: number): string => (first.entry?.[i].resource as Resource).id as string;
    const task = (await fhir<Task>('GET', `Task/${idOf(0)}`)).body;
    expect(task.focus?.reference).toBe(`ServiceRequest/${idOf(1)}`); // forward ref, upper-case urn
    expect(task.for?.reference).toBe(`Patient/${idOf(2)}`);
    expect(task.owner?.reference).toBe(`Organization/${idOf(6)}`);
    const sr = (await fhir('GET', `ServiceRequest/${idOf(1)}`)).body as Resource & {
      subject: { reference: string };
      supportingInfo: { reference: string }[];
    };
    expect(sr.subject.reference).toBe(`Patient/${idOf(2)}`);
    expect(sr.supportingInfo.map((r) => r.reference)).toEqual([
      `Observation/${idOf(8)}`,
      `Observation/${idOf(9)}`,
      `Observation/${idOf(10)}`,
      `DiagnosticReport/${idOf(11)}`,
      `DocumentReference/${idOf(12)}`,
    ]);
    // no placeholder survives anywhere in what was stored
    for (const e of first.entry ?? []) {
      const stored = await fhir('GET', (e.response?.location ?? '').replace(/\/_history\/.*$/, ''));
      expect(JSON.stringify(stored.body)).not.toMatch(/urn:uuid/i);
    }
  });

  test('re-sending the same transaction creates nothing: 200 OK with the same ids', async () => {
    const { bundle } = referralTransaction(key); // fresh urn:uuids, same identifiers
    const before = await total('Observation?identifier=' + encodeURIComponent(`${SYS}|${key}-obsStage`));
    expect(before).toBe(1);

    const res = await fhir<Bundle>('POST', '', bundle);
    expect(res.status).toBe(200);
    expect(res.body.entry).toHaveLength(15);
    res.body.entry?.forEach((e, i) => {
      expect(e.response?.status).toBe('200 OK');
      expect(e.response?.location).toBe(first.entry?.[i].response?.location); // same id and version
    });
    // exactly one resource per identifier, i.e. nothing was duplicated
    for (const e of bundle.entry ?? []) {
      const type = e.resource?.resourceType as string;
      expect(await total(`${type}?identifier=${encodeURIComponent(identifierOf(e.resource))}`)).toBe(1);
    }
  });

  test('a failing entry rolls back the whole transaction', async () => {
    const patient = (await fhir<Patient>('POST', 'Patient', { resourceType: 'Patient', name: [{ family: 'Rollback' }] })).body;
    const marker = `rollback-${randomUUID()}`;
    const bundle: Bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: `urn:uuid:${randomUUID()}`,
          resource: { resourceType: 'Task', status: 'requested', intent: 'order', identifier: [{ system: SYS, value: marker }] },
          request: { method: 'POST', url: 'Task', ifNoneExist: `identifier=${SYS}|${marker}` },
        },
        {
          // executed after the create (PUT phase) and fails on the stale version
          resource: { ...patient, name: [{ family: 'Changed' }] },
          request: { method: 'PUT', url: `Patient/${patient.id}`, ifMatch: 'W/"not-the-version"' },
        },
      ],
    };
    const res = await fhir<OperationOutcome>('POST', '', bundle);
    expect(res.status).toBe(412);
    expect(res.body.resourceType).toBe('OperationOutcome');
    expect(res.body.issue[0].details?.text).toMatch(/^Bundle\.entry\[1\]/);
    expect(await total(`Task?identifier=${encodeURIComponent(`${SYS}|${marker}`)}`)).toBe(0);
    const unchanged = (await fhir('GET', `Patient/${patient.id}`)).body;
    expect(unchanged.meta?.versionId).toBe(patient.meta?.versionId);
  });

  test('unresolvable urn:uuid reference is a 400 and nothing is written', async () => {
    const marker = `dangling-${randomUUID()}`;
    const res = await fhir<OperationOutcome>('POST', '', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          resource: {
            resourceType: 'Task',
            status: 'requested',
            intent: 'order',
            identifier: [{ system: SYS, value: marker }],
            for: { reference: `urn:uuid:${randomUUID()}` },
          },
          request: { method: 'POST', url: 'Task' },
        },
      ],
    });
    expect(res.status).toBe(400);
    expect(res.body.issue[0].details?.text).toMatch(/Unresolved bundle-local reference/);
    expect(await total(`Task?identifier=${encodeURIComponent(`${SYS}|${marker}`)}`)).toBe(0);
  });

  test('batch entries succeed or fail independently', async () => {
    const res = await fhir<Bundle>('POST', '', {
      resourceType: 'Bundle',
      type: 'batch',
      entry: [
        { resource: { resourceType: 'Patient', name: [{ family: 'Batch' }] }, request: { method: 'POST', url: 'Patient' } },
        { request: { method: 'GET', url: 'Patient/does-not-exist' } },
        { resource: { resourceType: 'Patient', bogus: true }, request: { method: 'POST', url: 'Patient' } },
      ],
    });
    expect(res.status).toBe(200);
    expect(res.body.type).toBe('batch-response');
    expect(res.body.entry?.map((e) => e.response?.status)).toEqual(['201 Created', '404 Not Found', '400 Bad Request']);
    expect(res.body.entry?.[2].response?.outcome?.resourceType).toBe('OperationOutcome');
  });
});

describe('read / update / delete', () => {
  test('read returns ETag; update honours If-Match (match -> 200, stale -> 412)', async () => {
    const created = await fhir('POST', 'Patient', { resourceType: 'Patient', name: [{ family: 'Etag' }] });
    expect(created.status).toBe(201);
    const id = created.body.id as string;
    const v1 = created.body.meta?.versionId as string;
    expect(created.headers.get('location')).toBe(`${server.url}/Patient/${id}/_history/${v1}`);

    const read = await fhir('GET', `Patient/${id}`);
    expect(read.status).toBe(200);
    expect(read.headers.get('etag')).toBe(`W/"${v1}"`);
    expect(read.body.meta?.lastUpdated).toEqual(expect.any(String));

    const updated = await fhir('PUT', `Patient/${id}`, { ...read.body, gender: 'female' }, { 'if-match': `W/"${v1}"` });
    expect(updated.status).toBe(200);
    const v2 = updated.body.meta?.versionId as string;
    expect(v2).not.toBe(v1);
    expect(updated.headers.get('etag')).toBe(`W/"${v2}"`);
    expect((updated.body as { gender?: string }).gender).toBe('female');

    const stale = await fhir<OperationOutcome>('PUT', `Patient/${id}`, { ...read.body, gender: 'male' }, { 'if-match': `W/"${v1}"` });
    expect(stale.status).toBe(412);
    expect(stale.body.resourceType).toBe('OperationOutcome');
    expect(((await fhir('GET', `Patient/${id}`)).body as { gender?: string }).gender).toBe('female');

    const vread = await fhir('GET', `Patient/${id}/_history/${v1}`);
    expect(vread.status).toBe(200);
    expect((vread.body as { gender?: string }).gender).toBeUndefined();
  });

  test('PUT with an id mismatch is 400; PUT to a new id creates (201)', async () => {
    const mismatch = await fhir<OperationOutcome>('PUT', 'Patient/abc', { resourceType: 'Patient', id: 'xyz' });
    expect(mismatch.status).toBe(400);
    const newId = `p-${randomUUID()}`;
    const created = await fhir('PUT', `Patient/${newId}`, { resourceType: 'Patient', id: newId });
    expect(created.status).toBe(201);
    expect(created.body.id).toBe(newId);
  });

  test('unknown id is a 404 OperationOutcome; deleted is 410', async () => {
    const missing = await fhir<OperationOutcome>('GET', `Task/${randomUUID()}`);
    expect(missing.status).toBe(404);
    expect(missing.headers.get('content-type')).toMatch(/^application\/fhir\+json/);
    expect(missing.body.resourceType).toBe('OperationOutcome');
    expect(missing.body.issue[0].code).toBe('not-found');

    const unknownType = await fhir<OperationOutcome>('GET', 'NotAType/1');
    expect(unknownType.status).toBe(404);

    const created = await fhir('POST', 'Patient', { resourceType: 'Patient' });
    const del = await fhir('DELETE', `Patient/${created.body.id}`);
    expect(del.status).toBe(200);
    const gone = await fhir<OperationOutcome>('GET', `Patient/${created.body.id}`);
    expect(gone.status).toBe(410);
    expect(gone.body.issue[0].code).toBe('deleted');
  });

  test('malformed JSON, wrong type and invalid resources are 400 OperationOutcomes', async () => {
    const malformed = await fhir<OperationOutcome>('POST', 'Patient', '{"resourceType": "Patient", ');
    expect(malformed.status).toBe(400);
    expect(malformed.body.resourceType).toBe('OperationOutcome');
    expect(malformed.body.issue[0].details?.text).toMatch(/Malformed JSON/);

    const wrongType = await fhir<OperationOutcome>('POST', 'Patient', { resourceType: 'Task' });
    expect(wrongType.status).toBe(400);

    const invalid = await fhir<OperationOutcome>('POST', 'Task', { resourceType: 'Task', intent: 'order' });
    expect(invalid.status).toBe(400);
    expect(JSON.stringify(invalid.body)).toMatch(/Task\.status/);
  });

  test('conditional create via If-None-Exist header', async () => {
    const value = `hdr-${randomUUID()}`;
    const body = { resourceType: 'Patient', identifier: [{ system: SYS, value }] };
    const a = await fhir('POST', 'Patient', body, { 'if-none-exist': `identifier=${SYS}|${value}` });
    const b = await fhir('POST', 'Patient', body, { 'if-none-exist': `identifier=${SYS}|${value}` });
    expect([a.status, b.status]).toEqual([201, 200]);
    expect(b.body.id).toBe(a.body.id);

    // after a delete the criteria no longer match: a new resource is created
    expect((await fhir('DELETE', `Patient/${a.body.id}`)).status).toBe(200);
    const c = await fhir('POST', 'Patient', body, { 'if-none-exist': `identifier=${SYS}|${value}` });
    expect(c.status).toBe(201);
    expect(c.body.id).not.toBe(a.body.id);
  });

  test('conditional create sees resources seeded directly through repo', async () => {
    const value = `seed-${randomUUID()}`;
    const seeded = await server.repo.createResource({ resourceType: 'Organization', identifier: [{ system: SYS, value }] });
    const res = await fhir<Bundle>('POST', '', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          resource: { resourceType: 'Organization', identifier: [{ system: SYS, value }], name: 'ignored' },
          request: { method: 'POST', url: 'Organization', ifNoneExist: `identifier=${SYS}|${value}` },
        },
      ],
    });
    expect(res.body.entry?.[0].response?.status).toBe('200 OK');
    expect(res.body.entry?.[0].resource?.id).toBe(seeded.id);
    // 2 matches -> 412, nothing created
    await server.repo.createResource({ resourceType: 'Organization', identifier: [{ system: SYS, value }] });
    const dup = await fhir('POST', 'Organization', { resourceType: 'Organization' }, { 'if-none-exist': `identifier=${SYS}|${value}` });
    expect(dup.status).toBe(412);
    expect(await total(`Organization?identifier=${encodeURIComponent(`${SYS}|${value}`)}`)).toBe(2);
  });
});

describe('search', () => {
  const tag = `poll-${randomUUID()}`;
  let since: string;
  let tasks: Task[];

  beforeAll(async () => {
    const old = await fhir<Task>('POST', 'Task', {
      resourceType: 'Task',
      status: 'requested',
      intent: 'order',
      meta: { tag: [{ system: SYS, code: tag }] },
    });
    since = old.body.meta?.lastUpdated as string;
    await sleep(5);
    tasks = [];
    for (let i = 0; i < 25; i++) {
      const res = await fhir<Task>('POST', 'Task', {
        resourceType: 'Task',
        status: i % 2 ? 'in-progress' : 'accepted',
        intent: 'order',
        meta: { tag: [{ system: SYS, code: tag }] },
        identifier: [{ system: SYS, value: `${tag}-${i}` }],
      });
      expect(res.status).toBe(201);
      tasks.push(res.body);
    }
  });

  test('_lastUpdated=gt with _sort and _count pages through every result via next links', async () => {
    const searchesBefore = server.stats.searches.Task ?? 0;
    const query = `Task?_lastUpdated=gt${encodeURIComponent(since)}&_sort=_lastUpdated&_count=10&_tag=${encodeURIComponent(`${SYS}|${tag}`)}`;
    const first = await fhir<Bundle<Task>>('GET', query);
    const next = first.body.link?.find((l) => l.relation === 'next')?.url ?? '';
    expect(next.startsWith(`${server.url}/Task?`)).toBe(true);
    expect(new URL(next).searchParams.get('_offset')).toBe('10');

    const { pages, resources, totals } = await searchAll<Task>(query);
    expect(pages).toBe(3);
    expect(totals).toEqual([25, 25, 25]);
    expect(resources.map((t) => t.id).sort()).toEqual(tasks.map((t) => t.id).sort());
    const stamps = resources.map((t) => t.meta?.lastUpdated as string);
    expect([...stamps].sort()).toEqual(stamps); // ascending
    expect(stamps.every((s) => s > since)).toBe(true);
    expect(server.stats.searches.Task - searchesBefore).toBe(4); // 1 + 3 pages
  });

  test('_sort=-_lastUpdated returns newest first and no next link on the last page', async () => {
    const res = await fhir<Bundle<Task>>('GET', `Task?_tag=${encodeURIComponent(`${SYS}|${tag}`)}&_sort=-_lastUpdated&_count=30`);
    expect(res.body.total).toBe(26);
    const stamps = (res.body.entry ?? []).map((e) => e.resource?.meta?.lastUpdated as string);
    expect([...stamps].sort().reverse()).toEqual(stamps);
    expect(res.body.link?.some((l) => l.relation === 'next')).toBe(false);
  });

  test('_id=a,b,c returns exactly those resources', async () => {
    const ids = [tasks[3].id, tasks[11].id, tasks[20].id] as string[];
    const res = await fhir<Bundle<Task>>('GET', `Task?_id=${ids.join(',')}`);
    expect(res.body.total).toBe(3);
    expect((res.body.entry ?? []).map((e) => e.resource?.id).sort()).toEqual([...ids].sort());
  });

  test('_tag and identifier token searches', async () => {
    expect(await total(`Task?_tag=${encodeURIComponent(`${SYS}|${tag}`)}`)).toBe(26);
    expect(await total(`Task?_tag=${encodeURIComponent(`https://other.example|${tag}`)}`)).toBe(0);
    expect(await total(`Task?_tag=${encodeURIComponent(`${SYS}|${tag}`)}&status=accepted`)).toBe(13);
    const byIdentifier = await fhir<Bundle<Task>>('GET', `Task?identifier=${encodeURIComponent(`${SYS}|${tag}-7`)}`);
    expect(byIdentifier.body.total).toBe(1);
    expect(byIdentifier.body.entry?.[0].resource?.id).toBe(tasks[7].id);
  });

  test('searches without _count are paged at 20', async () => {
    const res = await fhir<Bundle<Task>>('GET', `Task?_tag=${encodeURIComponent(`${SYS}|${tag}`)}`);
    expect(res.body.entry).toHaveLength(20);
    expect(res.body.link?.find((l) => l.relation === 'next')?.url).toContain('_offset=20');
  });

  test('unknown search parameters and bad _count are rejected with 400', async () => {
    const unknown = await fhir<OperationOutcome>('GET', 'Task?staus=accepted');
    expect(unknown.status).toBe(400);
    expect(unknown.body.issue[0].details?.text).toMatch(/Unknown search parameter "staus"/);
    expect((await fhir('GET', 'Task?_count=ten')).status).toBe(400);
  });
});

describe('metadata and mounting', () => {
  test('GET /metadata returns an R4 CapabilityStatement', async () => {
    const res = await fhir<{
      resourceType: string;
      fhirVersion: string;
      rest: { resource: { type: string; interaction: { code: string }[] }[]; interaction: { code: string }[] }[];
    }>('GET', 'metadata');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^application\/fhir\+json/);
    expect(res.body.resourceType).toBe('CapabilityStatement');
    expect(res.body.fhirVersion).toBe('4.0.1');
    const task = res.body.rest[0].resource.find((r) => r.type === 'Task');
    expect(task?.interaction.map((i) => i.code)).toEqual(expect.arrayContaining(['read', 'create', 'update', 'search-type']));
    expect(res.body.rest[0].interaction.map((i) => i.code)).toContain('transaction');
  });

  test('the standalone server serves the same store at /sandbox/fhir/R4', async () => {
    const created = await fhir('POST', 'Patient', { resourceType: 'Patient' });
    const alt = server.url.replace('/fhir/R4', '/sandbox/fhir/R4');
    const read = await fhir('GET', `${alt}/Patient/${created.body.id}`);
    expect(read.status).toBe(200);
    expect(read.body.id).toBe(created.body.id);
  });

  test('createSandboxRouter works mounted under a prefix in another app (links use the prefix)', async () => {
    const sandbox = createSandboxRouter();
    const app = express();
    app.use('/sandbox/fhir/R4', sandbox.router);
    for (let i = 0; i < 3; i++) {
      await request(app)
        .post('/sandbox/fhir/R4/Organization')
        .set('content-type', FHIR_JSON)
        .send(JSON.stringify({ resourceType: 'Organization', name: `Org ${i}` }))
        .expect(201);
    }
    const res = await request(app).get('/sandbox/fhir/R4/Organization?_count=2').expect(200);
    expect(res.headers['content-type']).toMatch(/^application\/fhir\+json/);
    const body = JSON.parse(res.text) as Bundle;
    expect(body.total).toBe(3);
    expect(body.link?.find((l) => l.relation === 'next')?.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/sandbox\/fhir\/R4\/Organization\?_count=2&_offset=2$/);
    expect(sandbox.stats.searches.Organization).toBe(1);
    expect(sandbox.stats.requests).toBe(4);
    expect(sandbox.repo).not.toBe(server.repo); // independent stores
  });
});
