import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Bundle, DocumentReference, ServiceRequest, Task } from '@medplum/fhirtypes';
import { startSandboxServer } from '../../src/sandbox/server';
import type { SandboxServer } from '../../src/sandbox/server';
import type { Gateway } from '../../src/gateway';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { writeDestinationsFile } from '../helpers/destinations';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * The gateway against the sandbox in the profiles of the servers centres run (src/sandbox/profiles.ts):
 * for each server trait, what it does to a referral when the destination's settings ignore it (stuck,
 * failed, half-written or broken at the centre), and the referral reaching `sent`, whole, with the settings
 * of its profile.
 */

const PDF_HEADER = Buffer.from('%PDF-1.4\n');
/** The sample referral's own documents. */
const DOCS = fixture().documents.length as number;

function pdf(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  PDF_HEADER.copy(b);
  for (let i = PDF_HEADER.length; i < bytes; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}

interface Env {
  gw: Gateway;
  sandbox: SandboxServer;
  dir: string;
}

async function setUp(sandboxOpts: { profile?: string; traits?: string }, destination: Record<string, unknown>, env: Record<string, string> = {}): Promise<Env> {
  const sandbox = await startSandboxServer(0, sandboxOpts);
  const dir = mkdtempSync(join(tmpdir(), 'rg-servers-'));
  const file = writeDestinationsFile(dir, { baseUrl: sandbox.url, ...destination });
  const gw = await startGateway({ DESTINATIONS_FILE: file, DELIVERY_BASE_DELAY_MS: '30', DELIVERY_MAX_DELAY_MS: '200', DELIVERY_MAX_ATTEMPTS: '8', ...env });
  return { gw, sandbox, dir };
}

async function tearDown(e: Env | undefined): Promise<void> {
  if (!e) return;
  await e.gw.stop();
  await e.sandbox.close();
  rmSync(e.dir, { recursive: true, force: true });
}

async function submit(gw: Gateway, body: Record<string, any>): Promise<string> {
  const res = await fetch(`${gw.url}/referrals`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { id: string }).id;
}

async function view(gw: Gateway, id: string): Promise<any> {
  return (await fetch(`${gw.url}/referrals/${id}`, { headers: { Authorization: `Bearer ${KEY_A}` } })).json();
}

async function settled(gw: Gateway, id: string, timeoutMs = 20_000): Promise<any> {
  return eventually(async () => {
    const r = await view(gw, id);
    return r.status === 'sent' || r.status === 'delivery-failed' ? r : undefined;
  }, timeoutMs);
}

async function fhir<T>(base: string, path: string, init: RequestInit = {}): Promise<{ status: number; body: T }> {
  const res = await fetch(`${base}/${path}`, {
    ...init,
    headers: { 'Content-Type': 'application/fhir+json', Accept: 'application/fhir+json', ...(init.headers ?? {}) },
  });
  const text = await res.text();
  return { status: res.status, body: (text ? JSON.parse(text) : undefined) as T };
}

async function byIdentifier<T>(base: string, type: string, id: string): Promise<T[]> {
  const b = (await fhir<Bundle>(base, `${type}?identifier=${encodeURIComponent(`${REFERRAL_IDENTIFIER_SYSTEM}|${id}`)}`)).body;
  return (b.entry ?? []).map((e) => e.resource as T);
}

/** The referral as the centre holds it: one Task and one ServiceRequest, the Task pointing at it, every document with content. */
async function expectWholeAtCentre(
  base: string,
  referralId: string,
  documents: number
): Promise<{ task: Task; sr: ServiceRequest; docs: DocumentReference[] }> {
  const tasks = await byIdentifier<Task>(base, 'Task', referralId);
  const srs = await byIdentifier<ServiceRequest>(base, 'ServiceRequest', referralId);
  expect(tasks).toHaveLength(1);
  expect(srs).toHaveLength(1);
  const [task] = tasks;
  const [sr] = srs;
  expect(task.focus?.reference).toBe(`ServiceRequest/${sr.id}`);
  expect(task.basedOn?.map((r) => r.reference)).toEqual([`ServiceRequest/${sr.id}`]);
  const docs: DocumentReference[] = [];
  for (const ref of sr.supportingInfo ?? []) {
    if (!ref.reference?.startsWith('DocumentReference/')) continue;
    const got = await fhir<DocumentReference>(base, ref.reference);
    expect(got.status).toBe(200);
    const a = got.body.content[0].attachment;
    expect(a.data ?? a.url).toBeTruthy();
    expect(String(a.url ?? '')).not.toMatch(/^urn:/);
    docs.push(got.body);
  }
  expect(docs).toHaveLength(documents);
  return { task, sr, docs };
}

/** The bytes a DocumentReference's attachment resolves to at the centre (inline, Binary/<id>, or a presigned URL). */
async function attachmentBytes(base: string, doc: DocumentReference): Promise<Buffer> {
  const a = doc.content[0].attachment;
  if (a.data) return Buffer.from(a.data, 'base64');
  const url = String(a.url);
  const res = await fetch(/^https?:/.test(url) ? url : `${base}/${url}`, { headers: { Accept: '*/*' } });
  expect(res.status).toBe(200);
  return Buffer.from(await res.arrayBuffer());
}

function withDocument(externalId: string, bytes: Buffer): Record<string, any> {
  const body = fixture();
  body.externalId = externalId;
  body.documents.push({ kind: 'pathology-report', title: 'Whole-slide scan report', contentType: 'application/pdf', data: bytes.toString('base64') });
  return body;
}

describe('Medplum: JSON bodies capped at 1 MB, transactions included (maxJsonBytes, binaryMode raw)', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('ignored: a 2 MB document as a Binary in the transaction is refused with 400 and the referral fails', async () => {
    e = await setUp({ profile: 'default', traits: 'maxJsonBytes=1048576' }, { binaryMode: 'put' });
    const id = await submit(e.gw, withDocument('CAP-1', pdf(2_000_000, 1)));
    const r = await settled(e.gw, id);
    expect(r.status).toBe('delivery-failed');
    expect(await byIdentifier<Task>(e.sandbox.url, 'Task', id)).toHaveLength(0);
  });

  test('handled: maxJsonBytes moves documents out of the transaction as raw Binary uploads; the bytes arrive intact', async () => {
    e = await setUp({ profile: 'default', traits: 'maxJsonBytes=1048576' }, { binaryMode: 'put', maxJsonBytes: 1_000_000 });
    const bytes = pdf(2_000_000, 2);
    const id = await submit(e.gw, withDocument('CAP-2', bytes));
    expect((await settled(e.gw, id)).status).toBe('sent');
    const { docs } = await expectWholeAtCentre(e.sandbox.url, id, DOCS + 1);
    expect(docs[DOCS].content[0].attachment.url).toMatch(/^Binary\//);
    expect((await attachmentBytes(e.sandbox.url, docs[DOCS])).equals(bytes)).toBe(true);
  });
});

describe('Medplum: ids are server-assigned UUIDs, no update-as-create, no search on Binary', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('ignored (binaryMode put): PUT Binary/rg-… is refused and the referral fails, nothing half-written', async () => {
    e = await setUp({ profile: 'default', traits: 'uuidIdsOnly,noUpdateAsCreate' }, { binaryMode: 'put', maxInlineBytes: 100_000 });
    const id = await submit(e.gw, withDocument('IDS-1', pdf(300_000, 3)));
    expect((await settled(e.gw, id)).status).toBe('delivery-failed');
  });

  test('ignored (binaryMode conditional-create) on a non-atomic server: Binary search refused, the rest written: half a referral the gateway reports as failed', async () => {
    e = await setUp({ profile: 'default', traits: 'noBinarySearch,nonAtomic' }, { binaryMode: 'conditional-create', maxInlineBytes: 100_000 });
    const id = await submit(e.gw, withDocument('BINSEARCH-1', pdf(300_000, 4)));
    const r = await settled(e.gw, id);
    expect(r.status).toBe('delivery-failed');
    expect(r.statusReason ?? JSON.stringify(r.history)).toMatch(/400/);
    // The Task is there: the centre can see a referral the gateway never called sent.
    expect(await byIdentifier<Task>(e.sandbox.url, 'Task', id)).toHaveLength(1);
  });

  test('handled (binaryMode raw, no client ids): POST Binary with the bytes, its server id recorded, the DocumentReference points at it', async () => {
    e = await setUp(
      { profile: 'default', traits: 'uuidIdsOnly,noUpdateAsCreate,noBinarySearch,nonAtomic' },
      { binaryMode: 'raw', clientIds: false, maxInlineBytes: 100_000 }
    );
    const bytes = pdf(300_000, 5);
    const id = await submit(e.gw, withDocument('RAW-1', bytes));
    expect((await settled(e.gw, id)).status).toBe('sent');
    const { docs } = await expectWholeAtCentre(e.sandbox.url, id, DOCS + 1);
    expect(docs[DOCS].content[0].attachment.url).toMatch(/^Binary\/[0-9a-f-]{36}$/);
    expect((await attachmentBytes(e.sandbox.url, docs[DOCS])).equals(bytes)).toBe(true);
    const rows = await e.gw.db.kysely.selectFrom('binary_uploads').selectAll().where('referral_id', '=', id).execute();
    expect(rows).toEqual([
      expect.objectContaining({ document_n: DOCS + 1, state: 'done', lost_uploads: 0, binary_id: docs[DOCS].content[0].attachment.url?.split('/')[1] }),
    ]);
  });
});

describe('Medplum: Prefer: return=minimal answers 200 with an empty body', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('the empty answer is confirmed by searching every entry: sent once, with the ids the centre holds, no resend', async () => {
    e = await setUp({ profile: 'default', traits: 'emptyMinimal' }, { preferMinimal: true });
    const id = await submit(e.gw, { ...fixture(), externalId: 'MIN-1' });
    const r = await settled(e.gw, id);
    expect(r.status).toBe('sent');
    expect(r.delivery.attempts).toBe(1);
    const { task, sr } = await expectWholeAtCentre(e.sandbox.url, id, DOCS);
    expect(r.fhir.task).toBe(`Task/${task.id}`);
    expect(r.fhir.serviceRequest).toBe(`ServiceRequest/${sr.id}`);
    expect(e.sandbox.stats.interactions.transaction).toBe(1);
  });

  test('profile medplum does not ask for a minimal answer at all', async () => {
    e = await setUp({ profile: 'medplum' }, { profile: 'medplum' });
    const id = await submit(e.gw, { ...fixture(), externalId: 'MIN-2' });
    expect((await settled(e.gw, id)).status).toBe('sent');
    await expectWholeAtCentre(e.sandbox.url, id, DOCS);
  });
});

describe('Medplum projects with real transactions: conditional transactions of more than 8 entries are refused', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('ignored (transactionMode conditional): 400 "too many entries", nothing reaches the centre', async () => {
    e = await setUp({ profile: 'medplum', traits: 'nonAtomic=false,strictIsolationMaxEntries=8' }, { profile: 'medplum', transactionMode: 'conditional' });
    const id = await submit(e.gw, { ...fixture(), externalId: 'ATOMIC-1' });
    const r = await settled(e.gw, id);
    expect(r.status).toBe('delivery-failed');
    expect(await byIdentifier<Task>(e.sandbox.url, 'Task', id)).toHaveLength(0);
  });

  test('handled (resolve-first): identifiers searched first, plain creates, the referral goes through; a second referral for the same patient reuses the Patient', async () => {
    e = await setUp({ profile: 'medplum', traits: 'nonAtomic=false,strictIsolationMaxEntries=8' }, { profile: 'medplum' });
    const first = await submit(e.gw, { ...fixture(), externalId: 'ATOMIC-2' });
    expect((await settled(e.gw, first)).status).toBe('sent');
    const second = await submit(e.gw, { ...fixture(), externalId: 'ATOMIC-3' });
    expect((await settled(e.gw, second)).status).toBe('sent');
    const a = await expectWholeAtCentre(e.sandbox.url, first, DOCS);
    const b = await expectWholeAtCentre(e.sandbox.url, second, DOCS);
    expect(b.sr.subject?.reference).toBe(a.sr.subject?.reference);
    const patients = (await fhir<Bundle>(e.sandbox.url, 'Patient?_count=10')).body;
    expect(patients.entry).toHaveLength(1);
  });
});

describe('Medplum without real transactions: one entry fails (409), the others are kept', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('ignored (no verification): the resend creates a new ServiceRequest and the Task keeps pointing at one that was never stored', async () => {
    e = await setUp({ profile: 'medplum' }, { profile: 'medplum', verifyDelivery: false });
    e.sandbox.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 409 });
    const id = await submit(e.gw, { ...fixture(), externalId: 'PARTIAL-1' });
    expect((await settled(e.gw, id)).status).toBe('sent');
    const [task] = await byIdentifier<Task>(e.sandbox.url, 'Task', id);
    const focus = await fhir<ServiceRequest>(e.sandbox.url, String(task.focus?.reference));
    expect(focus.status).toBe(404);
  });

  test('handled: detected on retry, the Task repaired to the ServiceRequest it recorded, no duplicate, the repair in the history', async () => {
    e = await setUp({ profile: 'medplum' }, { profile: 'medplum' });
    e.sandbox.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 409 });
    const id = await submit(e.gw, { ...fixture(), externalId: 'PARTIAL-2' });
    const r = await settled(e.gw, id);
    expect(r.status).toBe('sent');
    expect(r.delivery.attempts).toBe(2);
    const { task, sr } = await expectWholeAtCentre(e.sandbox.url, id, DOCS);
    expect(r.fhir.task).toBe(`Task/${task.id}`);
    expect(r.fhir.serviceRequest).toBe(`ServiceRequest/${sr.id}`);
    expect(JSON.stringify(r.history)).toContain('Task.focus/basedOn');
  });

  test('concurrent deliveries (each racing transaction loses one entry): every referral ends sent and whole, none duplicated', async () => {
    e = await setUp({ profile: 'medplum' }, { profile: 'medplum' }, { DELIVERY_CONCURRENCY: '4' });
    const ids = await Promise.all([1, 2, 3, 4, 5, 6].map((n) => submit(e!.gw, { ...fixture(), externalId: `RACE-${n}` })));
    for (const id of ids) {
      const r = await settled(e.gw, id, 30_000);
      expect([r.status, r.statusReason]).toEqual(['sent', null]);
      await expectWholeAtCentre(e.sandbox.url, id, DOCS);
    }
  });
});

describe('a DocumentReference matched by a conditional create but without content is repaired, never reported sent broken', () => {
  let e: Env | undefined;
  afterEach(() => tearDown(e));

  test('a failed, half-written delivery left a DocumentReference whose url is a bundle placeholder: after the re-queue, verification writes its content', async () => {
    // A non-atomic server keeps the other entries when the Task entry is refused for good (400).
    e = await setUp({ profile: 'default', traits: 'nonAtomic' }, {});
    e.sandbox.faults.failNextEntry({ resourceType: 'Task', status: 400 });
    const id = await submit(e.gw, { ...fixture(), externalId: 'LOST-DOC-1' });
    expect((await settled(e.gw, id)).status).toBe('delivery-failed');
    // The centre holds the documents; break the first one as Medplum left it (the urn:uuid placeholder of a
    // Binary that was never written).
    const found = (
      await fhir<Bundle>(e.sandbox.url, `DocumentReference?identifier=${encodeURIComponent(`https://referral-gateway.dev/fhir/sid/document|${id}/document/1`)}`)
    ).body;
    const doc = found.entry?.[0]?.resource as DocumentReference;
    const broken = { ...doc, content: [{ attachment: { contentType: 'application/pdf', url: 'urn:uuid:0f7d1a52-1111-4000-8000-000000000000' } }] };
    expect((await fhir(e.sandbox.url, `DocumentReference/${doc.id}`, { method: 'PUT', body: JSON.stringify(broken) })).status).toBe(200);

    // An operator re-queues; the resend's conditional create matches the broken DocumentReference.
    const requeue = await fetch(`${e.gw.url}/admin/deliveries/${id}/retry`, {
      method: 'POST',
      headers: { Authorization: 'Bearer admin-key-0003', 'Content-Type': 'application/json' },
      body: '{}',
    });
    expect(requeue.status).toBe(202);
    const r = await settled(e.gw, id);
    expect(r.status).toBe('sent');
    const repaired = (await fhir<DocumentReference>(e.sandbox.url, `DocumentReference/${doc.id}`)).body;
    expect(repaired.content[0].attachment.data).toBeTruthy();
    expect(JSON.stringify(r.history)).toContain(`DocumentReference/${doc.id} content`);
    await expectWholeAtCentre(e.sandbox.url, id, DOCS);
  });
});

describe.each([
  ['default', 'generic'],
  ['medplum', 'medplum'],
  ['hapi', 'hapi'],
  ['strict', 'medplum'],
])('the whole loop on a %s sandbox with profile %s', (sandboxProfile, destinationProfile) => {
  let e: Env | undefined;
  afterAll(() => tearDown(e));

  test('submit with an 8 MB PDF, deliver, accept, complete with a report, read the report back; cancel another', async () => {
    e = await setUp({ profile: sandboxProfile }, { profile: destinationProfile });
    const { gw, sandbox } = e;
    const big = pdf(8 * 1024 * 1024, 9);
    const id = await submit(gw, withDocument(`LOOP-${sandboxProfile}`, big));
    const r = await settled(gw, id, 30_000);
    expect(r.status).toBe('sent');
    const { task, docs } = await expectWholeAtCentre(sandbox.url, id, DOCS + 1);
    expect((await attachmentBytes(sandbox.url, docs[DOCS])).equals(big)).toBe(true);

    // The centre accepts, then completes with its opinion as a Binary it uploads itself (as a Medplum app does).
    const accepted = await fhir<Task>(sandbox.url, `Task/${task.id}`, { method: 'PUT', body: JSON.stringify({ ...task, status: 'accepted' }) });
    expect(accepted.status).toBe(200);
    await gw.poller.pollOnce();
    expect((await view(gw, id)).status).toBe('accepted');

    const report = pdf(50_000, 10);
    const up = await fetch(`${sandbox.url}/Binary`, { method: 'POST', headers: { 'Content-Type': 'application/pdf' }, body: report });
    expect(up.status).toBe(201);
    const binaryId = ((await up.json()) as { id: string }).id;
    const opinion = await fhir<DocumentReference>(sandbox.url, 'DocumentReference', {
      method: 'POST',
      body: JSON.stringify({
        resourceType: 'DocumentReference',
        status: 'current',
        type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
        content: [{ attachment: { contentType: 'application/pdf', url: `Binary/${binaryId}` } }],
      }),
    });
    expect(opinion.status).toBe(201);
    const current = (await fhir<Task>(sandbox.url, `Task/${task.id}`)).body;
    const done = await fhir<Task>(sandbox.url, `Task/${task.id}`, {
      method: 'PUT',
      body: JSON.stringify({
        ...current,
        status: 'completed',
        output: [{ type: { text: 'opinion' }, valueReference: { reference: `DocumentReference/${opinion.body.id}` } }],
      }),
    });
    expect(done.status).toBe(200);
    await gw.poller.pollOnce();
    expect((await view(gw, id)).status).toBe('completed');
    const content = await fetch(`${gw.url}/referrals/${id}/report/content`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(content.status).toBe(200);
    expect(Buffer.from(await content.arrayBuffer()).equals(report)).toBe(true);

    // A second referral is withdrawn before the centre starts it.
    const other = await submit(gw, { ...fixture(), externalId: `LOOP-CANCEL-${sandboxProfile}` });
    expect((await settled(gw, other)).status).toBe('sent');
    const cancel = await fetch(`${gw.url}/referrals/${other}/cancel`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ reason: 'patient chose another centre' }),
    });
    expect(cancel.status).toBe(202);
    await eventually(async () => ((await view(gw, other)).status === 'cancelled' ? true : undefined));
    const [cancelled] = await byIdentifier<Task>(sandbox.url, 'Task', other);
    expect(cancelled.status).toBe('cancelled');
  }, 90_000);
});
