import { readFileSync } from 'node:fs';
import type { Bundle, OperationOutcome, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { listReferrals } from '../../src/store';
import { acceptAndComplete } from '../helpers/centre';
import { eventually, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { prng } from '../helpers/prng';

/**
 * FHIR-capable EHRs post a referral Bundle (BSeR / Gravity style) to /fhir/R4/Bundle or /fhir/R4 and follow the
 * referral as a Task: the same checks, idempotency, store, delivery and tracking as the JSON API.
 */
const bundle = (name: string): Bundle => JSON.parse(readFileSync(`fixtures/fhir-intake/${name}.json`, 'utf8')) as Bundle;

describe('FHIR referral bundles', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  const post = async (path: string, body: unknown, key = KEY_A): Promise<{ status: number; location: string | null; body: any }> => {
    const res = await fetch(`${gw.url}/fhir/R4${path}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify(body),
    });
    return { status: res.status, location: res.headers.get('location'), body: await res.json() };
  };
  const get = async (path: string, key = KEY_A): Promise<{ status: number; body: any }> => {
    const res = await fetch(`${gw.url}/fhir/R4${path}`, { headers: { Authorization: `Bearer ${key}` } });
    return { status: res.status, body: await res.json() };
  };

  test('a transaction bundle in: 201 with the Task, delivered, accepted and completed at the centre, the Task shows the report', async () => {
    const first = await post('/Bundle', bundle('breast-second-opinion.transaction'));
    expect(first.status).toBe(201);
    expect(first.location).toMatch(/^\/fhir\/R4\/Task\/ref_/);
    const task = first.body as Task;
    expect(task).toMatchObject({ resourceType: 'Task', status: 'requested', intent: 'order', businessStatus: { text: 'queued' } });
    const id = task.id as string;
    expect(first.location).toBe(`/fhir/R4/Task/${id}`);

    // The same bundle again (a retry): the original Task, nothing new.
    const again = await post('/Bundle', bundle('breast-second-opinion.transaction'));
    expect(again.status).toBe(200);
    expect(again.body.id).toBe(id);
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 50, externalId: task.identifier?.[0]?.value })).items).toHaveLength(1);

    await acceptAndComplete(gw, id, 'Board opinion: proceed with surgery.');
    const done = await get(`/Task/${id}`);
    expect(done.status).toBe(200);
    expect(done.body).toMatchObject({ status: 'completed', businessStatus: { text: 'completed' } });
    const url = done.body.output[0].valueAttachment.url as string;
    expect(url).toBe(`/referrals/${id}/report/content`);
    const content = await fetch(`${gw.url}${url}`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(await content.text()).toBe('Board opinion: proceed with surgery.');

    // Found by the identifier the EHR sent; another client sees nothing.
    const value = task.identifier?.[0]?.value as string;
    const found = await get(`/Task?identifier=${encodeURIComponent(`urn:any|${value}`)}`);
    expect(found.body).toMatchObject({ resourceType: 'Bundle', type: 'searchset', total: 1 });
    expect(found.body.entry[0].resource.id).toBe(id);
    expect((await get(`/Task/${id}`, KEY_B)).status).toBe(404);
    expect((await get(`/Task?identifier=${encodeURIComponent(value)}`, KEY_B)).body.total).toBe(0);
  });

  test('a message bundle to /fhir/R4 and a collection whose Consent has no date are taken too', async () => {
    const message = await post('', bundle('lung-expert-opinion.message'));
    expect(message.status).toBe(201);
    const collection = await post('/Bundle', bundle('colorectal-second-opinion.collection'));
    expect(collection.status).toBe(201);
    await eventually(async () => (await get(`/Task/${collection.body.id}`)).body.businessStatus.text === 'sent', 20_000);
  });

  test('a bad bundle is refused with an OperationOutcome pointing into it, and nothing is stored', async () => {
    const b = bundle('colorectal-second-opinion.collection');
    const entries = b.entry ?? [];
    const patientAt = entries.findIndex((e) => e.resource?.resourceType === 'Patient');
    const { birthDate: _gone, ...patient } = entries[patientAt].resource as { birthDate?: string };
    entries[patientAt] = { ...entries[patientAt], resource: patient as never };
    const sr = entries.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as { identifier: Array<{ value: string }> };
    sr.identifier = sr.identifier.map((i) => ({ ...i, value: `${i.value}-BAD` }));
    const refused = await post('/Bundle', b);
    expect(refused.status).toBe(422);
    const outcome = refused.body as OperationOutcome;
    expect(outcome.resourceType).toBe('OperationOutcome');
    expect(outcome.issue?.map((i) => i.expression?.[0])).toContain(`Bundle.entry[${patientAt}].resource.birthDate`);
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 10, externalId: sr.identifier[0].value })).items).toHaveLength(0);

    expect((await post('/Bundle', { resourceType: 'Patient' })).status).toBe(422);
    expect((await post('/Bundle', [1, 2])).status).toBe(422);
  });

  test('300 mutated bundles: each answered 201, 200 or 4xx with an OperationOutcome, never a 5xx; refused ones store nothing', async () => {
    const random = prng(20261206);
    const sources = ['breast-second-opinion.transaction', 'colorectal-second-opinion.collection', 'lung-expert-opinion.message'].map(bundle);
    const mutate = (b: Bundle, n: number): Bundle => {
      const copy = JSON.parse(JSON.stringify(b)) as Bundle & { entry: NonNullable<Bundle['entry']> };
      const sr = copy.entry.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as { identifier?: Array<{ value?: string }> } | undefined;
      if (sr?.identifier?.[0]) sr.identifier[0].value = `MUT-${n}`;
      const at = Math.floor(random() * copy.entry.length);
      const entry = copy.entry[at] as unknown as Record<string, any>;
      const keys = Object.keys(entry.resource ?? {});
      const key = keys[Math.floor(random() * keys.length)];
      switch (Math.floor(random() * 6)) {
        case 0:
          copy.entry.splice(at, 1);
          break;
        case 1:
          if (entry.resource && key !== 'resourceType') Reflect.deleteProperty(entry.resource, key);
          break;
        case 2:
          if (entry.resource) entry.resource[key] = ['x', 42, null, {}, [], 'Patient/none'][Math.floor(random() * 6)];
          break;
        case 3:
          copy.entry.push(JSON.parse(JSON.stringify(copy.entry[at])));
          break;
        case 4:
          entry.fullUrl = 'urn:uuid:00000000-0000-0000-0000-000000000000';
          break;
        default:
          entry.resource = { resourceType: 'Basic' };
      }
      return copy;
    };
    const before = (await listReferrals(gw.db, 'city-hospital', { limit: 1000 })).items.length;
    let created = 0;
    for (let n = 0; n < 300; n++) {
      const r = await post('/Bundle', mutate(sources[n % sources.length], n));
      expect([200, 201, 400, 409, 413, 422]).toContain(r.status);
      if (r.status === 201) created++;
      else if (r.status >= 400) expect(r.body.resourceType).toBe('OperationOutcome');
    }
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 1000 })).items.length).toBe(before + created);
  });
});
