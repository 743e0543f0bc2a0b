// The sandbox's search index (src/sandbox/search-index.ts) must give exactly what
// MemoryRepository's scan gives: same matches, order, totals and pages. Every comparison below runs
// the same SearchRequest through IndexedMemoryRepository.search (index) and .scanSearch (scan).
import { Operator, parseSearchRequest } from '@medplum/core';
import type { SearchRequest } from '@medplum/core';
import type { Bundle, Coding, Identifier, OperationOutcome, Resource, Task } from '@medplum/fhirtypes';
import { startSandboxServer } from '../../src/sandbox/server';
import type { SandboxServer } from '../../src/sandbox/server';
import { loadFhirDefinitions } from '../../src/sandbox/defs';
import { IndexedMemoryRepository } from '../../src/sandbox/repo';
import { prng } from '../helpers/prng';

const GW = 'https://referral-gateway.dev/fhir/CodeSystem/tags';
const SYS = 'https://referral-gateway.dev/fhir/sid/referral';
const FHIR_JSON = 'application/fhir+json';

const T0 = Date.parse('2025-03-01T10:00:00.000Z');
const at = (ms: number): string => new Date(T0 + ms).toISOString();

const TAGS: Coding[][] = [
  [{ system: GW, code: 'referral-gateway', display: 'Sent by referral-gateway' }],
  [{ system: GW, code: 'referral-gateway' }],
  [{ system: GW, code: 'Referral-Gateway' }],
  [
    { system: 'https://Other.example/tags', code: 'x' },
    { system: GW, code: 'referral-gateway' },
  ],
  [{ code: 'nosys' }],
  [{ system: 'https://other.example/tags', code: 'referral-gateway' }],
  [],
];
const STATUSES: Task['status'][] = ['requested', 'accepted', 'in-progress', 'completed', 'rejected'];

function identifiers(i: number, rnd: () => number): Identifier[] | undefined {
  switch (Math.floor(rnd() * 6)) {
    case 0:
      return undefined;
    case 1:
      return [{ system: SYS, value: `ref_${i % 40}` }];
    case 2:
      return [{ system: SYS, value: `REF_${i % 40}`, type: { text: 'Placer' } }];
    case 3:
      return [{ value: `ref_${i % 40}` }];
    case 4:
      return [
        { system: 'https://other.example/ids', value: `ref_${i % 40}` },
        { system: SYS, value: `x-${i}` },
      ];
    default:
      return [{ system: SYS, value: `ref_${i % 40}`, type: { text: 'Placer', coding: [{ code: 'PLAC' }] } }];
  }
}

function task(i: number, rnd: () => number): Task {
  const tag = TAGS[Math.floor(rnd() * TAGS.length)];
  const security = rnd() < 0.2 ? [{ system: 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality', code: 'R' }] : undefined;
  return {
    resourceType: 'Task',
    status: STATUSES[Math.floor(rnd() * STATUSES.length)],
    intent: 'order',
    meta: { ...(tag.length ? { tag } : {}), ...(security ? { security } : {}) },
    identifier: identifiers(i, rnd),
  };
}

/**
 * A store with ties (many resources per millisecond), resources created by the repository's clock
 * and by seeding with chosen timestamps (including older than existing ones), updates (which move
 * a resource in _lastUpdated order but not in store order), deletes, re-creates of deleted ids
 * (which move it to the end of store order) and ids that differ only in case.
 */
async function mixedStore(repo: IndexedMemoryRepository): Promise<string[]> {
  const rnd = prng(42);
  const ids: string[] = [];
  await repo.withSeeding(async () => {
    for (let i = 0; i < 300; i++) {
      const ms = Math.floor(rnd() * 60); // ~5 resources per millisecond
      const created = await repo.createResource({ ...task(i, rnd), meta: { ...task(i, rnd).meta, lastUpdated: at(ms), versionId: '1' } });
      ids.push(created.id);
    }
    for (const id of ['Mixed-1', 'mixed-1', 'MIXED-2', 'mixed-3']) {
      await repo.updateResource({ ...task(ids.length, rnd), id, meta: { ...task(0, rnd).meta, lastUpdated: at(30), versionId: '1' } });
      ids.push(id);
    }
  });
  for (let i = 0; i < 60; i++) {
    await repo.createResource({ ...task(1000 + i, rnd), meta: { ...task(i, rnd).meta } }); // clock timestamps (now)
  }
  for (let i = 0; i < 40; i++) {
    const id = ids[Math.floor(rnd() * ids.length)];
    const current = await repo.readResource<Task>('Task', id).catch(() => undefined);
    if (!current) {
      continue;
    }
    if (i % 3 === 0) {
      // seeded update into the past: moves the resource backwards in _lastUpdated order
      await repo.withSeeding(() =>
        repo.updateResource({ ...current, status: 'accepted', meta: { ...current.meta, lastUpdated: at(Math.floor(rnd() * 60)), versionId: `u${i}` } })
      );
    } else {
      await repo.updateResource({ ...current, status: 'in-progress' });
    }
  }
  for (let i = 0; i < 15; i++) {
    await repo.deleteResource('Task', ids[i * 13]).catch(() => undefined);
  }
  await repo.updateResource({ ...task(7, rnd), id: ids[13] }); // re-created after its delete
  for (let i = 0; i < 30; i++) {
    await repo.createResource({
      resourceType: 'ServiceRequest',
      status: 'active',
      intent: 'order',
      subject: { reference: 'Patient/p' },
      meta: { tag: TAGS[i % TAGS.length] },
      identifier: [{ system: SYS, value: `ref_${i}` }],
    });
  }
  for (let i = 0; i < 20; i++) {
    await repo.createResource({
      resourceType: 'DocumentReference',
      status: 'current',
      content: [{ attachment: { url: 'x' } }],
      ...(i % 2 ? { masterIdentifier: { system: SYS, value: `ref_${i % 7}`, ...(i % 3 ? {} : { type: { text: 'Master' } }) } } : {}),
      ...(i % 3 ? { identifier: [{ system: 'https://other.example/docs', value: `REF_${i % 5}` }] } : {}),
    });
  }
  return ids;
}

type Query = Record<string, string | string[]>;

function queries(ids: string[]): Query[] {
  const tag = `${GW}|referral-gateway`;
  return [
    {},
    { _count: '7' },
    { _count: '7', _offset: '14' },
    { _count: '0' },
    { _offset: '1000' },
    { _sort: '_lastUpdated' },
    { _sort: '-_lastUpdated', _count: '50', _offset: '10' },
    { _tag: tag },
    { _tag: tag, _sort: '_lastUpdated', _count: '25', _offset: '25' },
    { _tag: tag, _sort: '-_lastUpdated' },
    { _tag: 'referral-gateway' },
    { _tag: 'REFERRAL-GATEWAY', _sort: '_lastUpdated' },
    { _tag: `${GW.toUpperCase()}|Referral-Gateway` },
    { _tag: '|nosys' },
    { _tag: 'Sent by referral-gateway' },
    { _tag: `${GW}|` },
    { _tag: '|' },
    { _tag: `https://other.example/tags|x,${GW}|referral-gateway` },
    { '_tag:not': tag },
    { '_tag:missing': 'true' },
    { _security: 'R' },
    { '_security:not': 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R', _sort: '_lastUpdated' },
    { _lastUpdated: `gt${at(30)}` },
    { _lastUpdated: `gt${at(30)}`, _sort: '_lastUpdated', _count: '10' },
    { _lastUpdated: `ge${at(30)}`, _sort: '-_lastUpdated' },
    { _lastUpdated: `lt${at(30)}`, _sort: '_lastUpdated' },
    { _lastUpdated: `le${at(30)}` },
    { _lastUpdated: `eq${at(30)}` },
    { _lastUpdated: at(30).slice(0, 19) + 'Z' }, // second precision: the whole second
    { _lastUpdated: 'ne2025-03-01' },
    { _lastUpdated: 'sa2025-03-01T10:00:00.020Z' },
    { _lastUpdated: 'eb2025-03-01T10:00:00.020Z' },
    { _lastUpdated: 'ap2025-03-01' },
    { _lastUpdated: 'gt2025-03-01T11:00:00.030+01:00', _sort: '_lastUpdated' }, // offset = 10:00:00.030Z
    { _lastUpdated: ['ge2025-03-01T10:00:00.010Z', 'lt2025-03-01T10:00:00.040Z'], _sort: '-_lastUpdated' },
    { _lastUpdated: 'gt2000-01-01', _tag: tag, _sort: '_lastUpdated', _count: '20', _offset: '40' },
    { _lastUpdated: 'gt2100-01-01' },
    { _id: [ids[3], ids[50], ids[299], 'does-not-exist'].join(',') },
    { _id: [ids[3], ids[50], ids[299]].join(','), _sort: '-_lastUpdated' },
    { _id: 'mixed-1' },
    { _id: 'MIXED-2,Mixed-3', _sort: '_lastUpdated' },
    { _id: `|${ids[5]}` },
    { _id: `sys|${ids[5]}` },
    { _id: ids[0] }, // deleted
    { '_id:not': ids[6], _count: '5' },
    { identifier: `${SYS}|ref_3` },
    { identifier: 'ref_3', _sort: '_lastUpdated' },
    { identifier: 'REF_3' },
    { identifier: '|ref_4' },
    { identifier: `${SYS}|` },
    { identifier: 'Placer', _count: '3' },
    { identifier: `${SYS}|ref_1,${SYS}|ref_2,x-100` },
    { 'identifier:not': `${SYS}|ref_3`, _tag: tag },
    { identifier: `${SYS}|ref_3`, _lastUpdated: 'gt2000-01-01', _tag: 'referral-gateway' },
    { status: 'accepted' },
    { status: 'accepted', _tag: tag, _sort: '_lastUpdated' },
    { 'status:not': 'accepted', _lastUpdated: `gt${at(20)}`, _sort: '-_lastUpdated', _count: '15' },
  ];
}

const json = (bundle: Bundle): string => JSON.stringify(bundle);

beforeAll(() => {
  loadFhirDefinitions();
});

describe('index answers exactly like the scan', () => {
  let repo: IndexedMemoryRepository;
  let ids: string[];

  beforeAll(async () => {
    repo = new IndexedMemoryRepository();
    expect(repo.indexed).toBe(true);
    ids = await mixedStore(repo);
  });

  test('a fixed set of poll-style and edge-case searches over Task', async () => {
    for (const query of queries(ids)) {
      const request = parseSearchRequest('Task', query);
      const before = repo.searchCounts.indexed;
      const indexed = await repo.search(request);
      expect(repo.searchCounts.indexed).toBe(before + 1); // answered by the index, not the scan
      expect({ query, result: json(indexed) }).toEqual({ query, result: json(await repo.scanSearch(request)) });
    }
  });

  test('date filters with several values (built directly: the URL parser refuses them)', async () => {
    for (const operator of [Operator.EQUALS, Operator.GREATER_THAN, Operator.NOT_EQUALS]) {
      const request: SearchRequest = {
        resourceType: 'Task',
        filters: [{ code: '_lastUpdated', operator, value: `${at(10)},${at(50)}` }],
        sortRules: [{ code: '_lastUpdated', descending: operator === Operator.GREATER_THAN }],
      };
      expect(json(await repo.search(request))).toBe(json(await repo.scanSearch(request)));
    }
  });

  test('other resource types, and parameters the index evaluates with FHIRPath', async () => {
    const cases: [string, Query][] = [
      ['ServiceRequest', { _tag: `${GW}|referral-gateway`, _sort: '_lastUpdated' }],
      ['ServiceRequest', { identifier: `${SYS}|ref_3` }],
      ['ServiceRequest', { status: 'active', _count: '4' }],
      ['DocumentReference', { identifier: `${SYS}|ref_1` }], // masterIdentifier | identifier
      ['DocumentReference', { identifier: 'ref_3', _sort: '-_lastUpdated' }],
      ['DocumentReference', { identifier: 'master,https://other.example/docs|ref_4' }],
      ['DocumentReference', { 'identifier:not': 'ref_1' }],
      ['Patient', { _lastUpdated: 'gt2000-01-01' }], // no Patients at all
    ];
    for (const [type, query] of cases) {
      const request = parseSearchRequest(type, query);
      expect({ type, query, result: json(await repo.search(request)) }).toEqual({ type, query, result: json(await repo.scanSearch(request)) });
    }
  });

  test('random searches (filters, prefixes, sort direction, offset and count)', async () => {
    const rnd = prng(7);
    const pick = <T>(list: T[]): T => list[Math.floor(rnd() * list.length)];
    const stamps = [at(0), at(17), at(30), at(59), '2025-03-01', '2025-03-01T10:00:00Z', new Date().toISOString()];
    let nonEmpty = 0;
    for (let n = 0; n < 300; n++) {
      const query: Query = {};
      if (rnd() < 0.5) {
        query[pick(['_lastUpdated', '_lastUpdated', '_lastUpdated'])] = pick(['gt', 'ge', 'lt', 'le', 'eq', 'ne', 'sa', 'eb', 'ap', '']) + pick(stamps);
      }
      if (rnd() < 0.5) {
        query[pick(['_tag', '_tag', '_tag:not'])] = pick([`${GW}|referral-gateway`, 'referral-gateway', '|nosys', `${GW}|`, 'x,nosys']);
      }
      if (rnd() < 0.2) {
        query._id = [pick(ids), pick(ids), pick(['mixed-1', 'MIXED-2', 'nope'])].join(',');
      }
      if (rnd() < 0.2) {
        query.identifier = pick([`${SYS}|ref_${Math.floor(rnd() * 40)}`, `ref_${Math.floor(rnd() * 40)}`, 'Placer', `${SYS}|`]);
      }
      if (rnd() < 0.15) {
        query.status = pick(STATUSES) as string;
      }
      if (rnd() < 0.6) {
        query._sort = pick(['_lastUpdated', '-_lastUpdated']);
      }
      query._count = String(Math.floor(rnd() * 60));
      if (rnd() < 0.5) {
        query._offset = String(Math.floor(rnd() * 120));
      }
      const request = parseSearchRequest('Task', query);
      const indexed = await repo.search(request);
      expect({ query, result: json(indexed) }).toEqual({ query, result: json(await repo.scanSearch(request)) });
      nonEmpty += indexed.entry?.length ? 1 : 0;
    }
    expect(nonEmpty).toBeGreaterThan(100); // the comparisons are not vacuous
  });

  test('searches the index does not model go to the scan', async () => {
    const before = { ...repo.searchCounts };
    for (const request of [
      parseSearchRequest('Task', { _sort: 'status' }),
      parseSearchRequest('Task', { _sort: '_lastUpdated,status' }),
      parseSearchRequest('Task', { _tag: `${GW}|referral-gateway`, _include: 'Task:focus' }),
      parseSearchRequest('Task', { 'owner:Organization.name': 'x' }),
    ] as SearchRequest[]) {
      await repo.search(request);
    }
    expect(repo.searchCounts.scanned - before.scanned).toBe(4);
    expect(repo.searchCounts.indexed).toBe(before.indexed);
  });

  test('a store with a non-canonical meta.lastUpdated: _lastUpdated searches scan, others still use the index', async () => {
    const odd = new IndexedMemoryRepository();
    await mixedStore(odd);
    await odd.withSeeding(() =>
      odd.createResource<Task>({
        resourceType: 'Task',
        status: 'requested',
        intent: 'order',
        meta: { lastUpdated: '2025-03-01T11:00:00+01:00', versionId: '1' },
      })
    );
    const counts = { ...odd.searchCounts };
    for (const query of [{ _lastUpdated: 'gt2025-03-01T10:00:00.010Z' }, { _sort: '-_lastUpdated' }, { _tag: `${GW}|referral-gateway` }] as Query[]) {
      const request = parseSearchRequest('Task', query);
      expect({ query, result: json(await odd.search(request)) }).toEqual({ query, result: json(await odd.scanSearch(request)) });
    }
    expect(odd.searchCounts.scanned - counts.scanned).toBe(2);
    expect(odd.searchCounts.indexed - counts.indexed).toBe(1);
  });

  test("index: 'conditional' answers only conditional matching from the index", async () => {
    const conditional = new IndexedMemoryRepository({ index: 'conditional' });
    await conditional.createResource<Task>({ resourceType: 'Task', status: 'requested', intent: 'order', identifier: [{ system: SYS, value: 'c-1' }] });
    const request = parseSearchRequest('Task', { identifier: `${SYS}|c-1` });
    expect((await conditional.search(request)).total).toBe(1);
    expect(conditional.searchCounts).toEqual({ indexed: 0, scanned: 1 });
    expect((await conditional.searchMatches(request)).total).toBe(1);
    expect(conditional.searchCounts).toEqual({ indexed: 1, scanned: 1 });
  });

  test('clear() empties the index with the store', async () => {
    const other = new IndexedMemoryRepository();
    await other.createResource<Task>({ resourceType: 'Task', status: 'requested', intent: 'order' });
    other.clear();
    expect((await other.search(parseSearchRequest('Task', {}))).total).toBe(0);
    await other.createResource<Task>({ resourceType: 'Task', status: 'requested', intent: 'order' });
    const request = parseSearchRequest('Task', { _sort: '_lastUpdated' });
    expect(json(await other.search(request))).toBe(json(await other.scanSearch(request)));
    expect((await other.search(request)).total).toBe(1);
  });
});

describe('over HTTP', () => {
  let server: SandboxServer;
  let repo: IndexedMemoryRepository;
  const tagQuery = `_tag=${encodeURIComponent(`${GW}|referral-gateway`)}`;

  async function fhir<T = Resource>(method: string, pathOrUrl: string, body?: unknown): Promise<{ status: number; body: T }> {
    const url = pathOrUrl.startsWith('http') ? pathOrUrl : `${server.url}/${pathOrUrl}`;
    const res = await fetch(url, {
      method,
      headers: { accept: FHIR_JSON, ...(body !== undefined ? { 'content-type': FHIR_JSON } : {}) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: (text ? JSON.parse(text) : undefined) as T };
  }

  /** Follows next links; returns every page's resources and totals. */
  async function walk(query: string): Promise<{ pages: number; tasks: Task[]; totals: number[] }> {
    let next: string | undefined = `${server.url}/${query}`;
    const tasks: Task[] = [];
    const totals: number[] = [];
    let pages = 0;
    while (next) {
      const page: { status: number; body: Bundle<Task> } = await fhir<Bundle<Task>>('GET', next);
      expect(page.status).toBe(200);
      pages++;
      totals.push(page.body.total ?? -1);
      tasks.push(...(page.body.entry ?? []).map((e) => e.resource as Task));
      next = page.body.link?.find((l) => l.relation === 'next')?.url;
      expect(pages).toBeLessThan(50);
    }
    return { pages, tasks, totals };
  }

  const stamp = (t: Task): string => t.meta?.lastUpdated as string;

  beforeAll(async () => {
    repo = new IndexedMemoryRepository();
    server = await startSandboxServer(0, { repo });
    const entry = Array.from({ length: 230 }, (_, i) => ({
      resource: {
        resourceType: 'Task',
        status: 'requested',
        intent: 'order',
        meta: { tag: [{ system: GW, code: i % 10 === 9 ? 'someone-else' : 'referral-gateway' }] },
        identifier: [{ system: SYS, value: `ref_http_${i}` }],
      },
      request: { method: 'POST', url: 'Task' },
    }));
    const res = await fhir<Bundle>('POST', '', { resourceType: 'Bundle', type: 'transaction', entry }); // many share a millisecond
    expect(res.status).toBe(200);
  });

  afterAll(async () => {
    await server?.close();
  });

  test('paging with next links: every match exactly once, in order, same as one big page', async () => {
    const all = await fhir<Bundle<Task>>('GET', `Task?${tagQuery}&_sort=_lastUpdated&_count=1000`);
    expect(all.body.total).toBe(207);
    const { pages, tasks, totals } = await walk(`Task?${tagQuery}&_sort=_lastUpdated&_count=40`);
    expect(pages).toBe(6);
    expect(totals).toEqual(new Array(6).fill(207));
    expect(tasks.map((t) => t.id)).toEqual((all.body.entry ?? []).map((e) => e.resource?.id));
    expect(new Set(tasks.map((t) => t.id)).size).toBe(207);
    const stamps = tasks.map(stamp);
    expect([...stamps].sort()).toEqual(stamps);

    const desc = await walk(`Task?${tagQuery}&_sort=-_lastUpdated&_count=33`);
    expect(desc.pages).toBe(7);
    expect(new Set(desc.tasks.map((t) => t.id)).size).toBe(207);
    expect(desc.tasks.map(stamp)).toEqual([...stamps].sort().reverse());
  });

  test('an update moves the Task to the end of _lastUpdated order and into the delta; a delete removes it', async () => {
    const before = (await walk(`Task?${tagQuery}&_sort=_lastUpdated&_count=100`)).tasks;
    const mark = stamp(before[before.length - 1]);
    const moved = before[10];
    await new Promise((resolve) => setTimeout(resolve, 3)); // a later millisecond than every Task so far
    const put = await fhir<Task>('PUT', `Task/${moved.id}`, { ...moved, status: 'accepted' });
    expect(put.status).toBe(200);

    const after = (await walk(`Task?${tagQuery}&_sort=_lastUpdated&_count=100`)).tasks;
    expect(after).toHaveLength(before.length);
    expect(after[after.length - 1].id).toBe(moved.id);
    expect(after[after.length - 1].status).toBe('accepted');
    expect(after.slice(0, -1).map((t) => t.id)).toEqual(before.filter((t) => t.id !== moved.id).map((t) => t.id));

    const delta = await fhir<Bundle<Task>>('GET', `Task?${tagQuery}&_lastUpdated=gt${encodeURIComponent(mark)}&_sort=_lastUpdated`);
    expect(delta.body.total).toBe(1);
    expect(delta.body.entry?.[0].resource?.id).toBe(moved.id);

    expect((await fhir('DELETE', `Task/${moved.id}`)).status).toBe(200);
    const gone = await fhir<Bundle<Task>>('GET', `Task?${tagQuery}&_lastUpdated=gt${encodeURIComponent(mark)}`);
    expect(gone.body.total).toBe(0);
    expect((await fhir<Bundle>('GET', `Task?_id=${moved.id}`)).body.total).toBe(0);
  });

  test('a rolled-back transaction leaves the index as it was', async () => {
    const tasks = (await walk(`Task?${tagQuery}&_sort=_lastUpdated&_count=100`)).tasks;
    const [a, b] = [tasks[0], tasks[1]];
    const res = await fhir<OperationOutcome>('POST', '', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        { resource: { ...a, status: 'accepted', meta: { tag: [{ system: GW, code: 'referral-gateway' }] } }, request: { method: 'PUT', url: `Task/${a.id}` } },
        { resource: { ...b, status: 'accepted' }, request: { method: 'PUT', url: `Task/${b.id}`, ifMatch: 'W/"stale"' } },
        {
          resource: { resourceType: 'Task', status: 'requested', intent: 'order', meta: { tag: [{ system: GW, code: 'referral-gateway' }] } },
          request: { method: 'POST', url: 'Task' },
        },
      ],
    });
    expect(res.status).toBe(412);
    const again = (await walk(`Task?${tagQuery}&_sort=_lastUpdated&_count=100`)).tasks;
    expect(again.map((t) => [t.id, t.meta?.versionId])).toEqual(tasks.map((t) => [t.id, t.meta?.versionId]));
    for (const query of [
      { _tag: `${GW}|referral-gateway`, _sort: '_lastUpdated' },
      { _sort: '-_lastUpdated' },
      { identifier: `${SYS}|ref_http_0` },
    ] as Query[]) {
      const request = parseSearchRequest('Task', query);
      expect(json(await repo.search(request))).toBe(json(await repo.scanSearch(request)));
    }
  });

  test('identifier and _id=a,b,c searches are answered from the index', async () => {
    const before = repo.searchCounts.indexed;
    const one = await fhir<Bundle<Task>>('GET', `Task?identifier=${encodeURIComponent(`${SYS}|ref_http_42`)}`);
    expect(one.body.total).toBe(1);
    const ids = (await fhir<Bundle<Task>>('GET', `Task?${tagQuery}&_count=5`)).body.entry?.map((e) => e.resource?.id) ?? [];
    const batch = await fhir<Bundle<Task>>('GET', `Task?_id=${ids.join(',')}&_count=5`);
    expect(batch.body.entry?.map((e) => e.resource?.id)).toEqual(ids);
    expect(repo.searchCounts.indexed - before).toBe(3);
  });
});
