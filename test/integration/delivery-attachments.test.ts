import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Binary, Bundle, DocumentReference, ServiceRequest, Task } from '@medplum/fhirtypes';
import nock from 'nock';
import { BINARY_DOCUMENT_TAG_SYSTEM } from '../../src/destinations/fhir/attachments';
import { startSandboxServer } from '../../src/sandbox/server';
import type { Gateway } from '../../src/gateway';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { eventually, fixture as sampleReferral, KEY_A, startGateway } from '../helpers/gateway';
import { writeDestinationsFile } from '../helpers/destinations';
import { allowAllNetwork, allowOnlyLoopback } from '../helpers/nock';
import { type LossyProxy, startLossyProxy } from '../helpers/lossy-proxy';

/** The sample referral without its callbackUrl: no status webhook may leave this machine during the test. */
function fixture(): Record<string, any> {
  const { callbackUrl: _none, ...body } = sampleReferral();
  return body;
}

/** A 300 kB "PDF": far above the destination's 4 kB inline limit, so it must travel as a Binary. */
const LARGE = Buffer.alloc(300_000);
for (let i = 0; i < LARGE.length; i++) LARGE[i] = (i * 7919) % 251;
const LARGE_B64 = LARGE.toString('base64');
const sha1 = (b: Buffer): string => createHash('sha1').update(b).digest('base64');

const api = async (gw: Gateway, path: string, init: RequestInit = {}): Promise<{ status: number; body: any }> => {
  const res = await fetch(`${gw.url}${path}`, { ...init, headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' } });
  return { status: res.status, body: await res.json() };
};

function writeDestinations(dir: string, destination: Record<string, unknown> & { baseUrl: string }): string {
  return writeDestinationsFile(dir, { maxInlineBytes: 4096, ...destination });
}

/**
 * The sandbox FHIR server behind a proxy that loses the answer to the first transaction (the server applied it;
 * the gateway never hears back), so the bundle with its Binary is sent twice.
 */
describe('large documents travel as Binary resources in the same transaction', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let proxy: LossyProxy;
  let gw: Gateway;
  let dir: string;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    proxy = await startLossyProxy(sandbox.url);
    dir = mkdtempSync(join(tmpdir(), 'rg-attach-'));
    gw = await startGateway({ DESTINATIONS_FILE: writeDestinations(dir, { baseUrl: proxy.base }), DELIVERY_BASE_DELAY_MS: '20' });
  });
  afterAll(async () => {
    await gw.stop();
    await proxy.close();
    await sandbox.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function search<T>(path: string): Promise<T[]> {
    const b = (await (await fetch(`${sandbox.url}/${path}`)).json()) as Bundle;
    return (b.entry ?? []).map((e) => e.resource as T);
  }

  test('a resend after a lost answer leaves one Binary; the DocumentReference points at it with size and SHA-1 hash', async () => {
    const body = fixture();
    body.externalId = 'EHR-LARGE-1';
    body.documents.push({ kind: 'pathology-report', title: 'Slide scan report', contentType: 'application/pdf', data: LARGE_B64 });
    const created = await api(gw, '/referrals', { method: 'POST', body: JSON.stringify(body) });
    expect(created.status).toBe(202);
    const id = created.body.id as string;
    const v = await eventually(async () => {
      const r = (await api(gw, `/referrals/${id}`)).body;
      return r.status === 'sent' ? r : undefined;
    });
    expect(proxy.dropped()).toBe(1);
    expect(v.delivery.attempts).toBe(2);

    // Both sends carried the Binary in the same transaction as the DocumentReference, as an idempotent PUT.
    const transactions = proxy.transactions;
    expect(transactions).toHaveLength(2);
    for (const t of transactions) {
      const binaries = (t.entry ?? []).filter((e) => e.resource?.resourceType === 'Binary');
      expect(binaries).toHaveLength(1);
      expect(binaries[0].request).toEqual({ method: 'PUT', url: expect.stringMatching(/^Binary\/rg-[0-9a-f-]{36}$/) });
      expect(binaries[0].resource?.meta?.tag).toContainEqual({ system: BINARY_DOCUMENT_TAG_SYSTEM, code: `${id}/document/3` });
      // The small PDF stays inline.
      const docs = (t.entry ?? []).filter((e) => e.resource?.resourceType === 'DocumentReference').map((e) => e.resource as DocumentReference);
      expect(docs[0].content[0].attachment.data).toBeDefined();
      expect(docs[2].content[0].attachment.data).toBeUndefined();
    }
    expect(JSON.stringify(transactions[0])).toBe(JSON.stringify(transactions[1])); // byte-identical resend

    const binaries = await search<Binary>('Binary');
    expect(binaries).toHaveLength(1);
    expect(binaries[0].data).toBe(LARGE_B64);
    expect(binaries[0].contentType).toBe('application/pdf');
    expect(v.fhir.documents).toHaveLength(3);
    const doc = (await (await fetch(`${sandbox.url}/${v.fhir.documents[2]}`)).json()) as DocumentReference;
    const att = doc.content[0].attachment;
    expect(att.url).toBe(`Binary/${binaries[0].id}`);
    expect(att.data).toBeUndefined();
    expect(att.size).toBe(LARGE.length);
    expect(att.hash).toBe(sha1(LARGE));
    const q = encodeURIComponent(`${REFERRAL_IDENTIFIER_SYSTEM}|${id}`);
    expect(await search(`Task?identifier=${q}`)).toHaveLength(1);
    expect(await search('DocumentReference')).toHaveLength(3);
  });

  test('a large document added later also goes as a Binary; the ServiceRequest lists the new DocumentReference', async () => {
    const body = fixture();
    body.externalId = 'EHR-LARGE-2';
    const created = await api(gw, '/referrals', { method: 'POST', body: JSON.stringify(body) });
    const id = created.body.id as string;
    const sent = await eventually(async () => {
      const r = (await api(gw, `/referrals/${id}`)).body;
      return r.status === 'sent' ? r : undefined;
    });
    const before = (await search<Binary>('Binary')).length;
    const added = await api(gw, `/referrals/${id}/documents`, {
      method: 'POST',
      body: JSON.stringify({ documents: [{ kind: 'imaging-report', title: 'PET-CT report', contentType: 'application/pdf', data: LARGE_B64 }] }),
    });
    expect(added.status).toBe(202);
    const v = await eventually(async () => {
      const r = (await api(gw, `/referrals/${id}`)).body;
      return r.fhir.documents.length === 3 ? r : undefined;
    });
    const binaries = await search<Binary>('Binary');
    expect(binaries).toHaveLength(before + 1);
    const doc = (await (await fetch(`${sandbox.url}/${v.fhir.documents[2]}`)).json()) as DocumentReference;
    expect(doc.content[0].attachment).toMatchObject({ size: LARGE.length, hash: sha1(LARGE), url: expect.stringMatching(/^Binary\/rg-/) });
    expect(doc.context?.related?.[0]?.reference).toBe(sent.fhir.serviceRequest);
    const sr = (await (await fetch(`${sandbox.url}/${sent.fhir.serviceRequest}`)).json()) as ServiceRequest;
    expect(sr.supportingInfo?.map((r) => r.reference)).toContain(v.fhir.documents[2]);
    expect(sr.supportingInfo?.filter((r) => r.reference === v.fhir.documents[2])).toHaveLength(1);
    const task = (await (await fetch(`${sandbox.url}/${sent.fhir.task}`)).json()) as Task;
    expect((task.input ?? []).filter((i) => i.valueReference?.reference === v.fhir.documents[2])).toHaveLength(1);
  });
});

describe("binaryMode 'conditional-create' (servers without client-assigned ids)", () => {
  let gw: Gateway;
  let dir: string;
  const CENTRE = 'https://hapi.example.org';

  beforeAll(async () => {
    allowOnlyLoopback();
    dir = mkdtempSync(join(tmpdir(), 'rg-attach-cc-'));
    gw = await startGateway({ DESTINATIONS_FILE: writeDestinations(dir, { baseUrl: `${CENTRE}/fhir`, binaryMode: 'conditional-create' }) });
  });
  afterAll(async () => {
    await gw.stop();
    allowAllNetwork();
    rmSync(dir, { recursive: true, force: true });
  });

  test('the Binary is a conditional create on its tag and the attachment points at its urn:uuid', async () => {
    let sent: Bundle | undefined;
    // The patient check's search before the transaction (src/delivery/patient-match.ts): no Patient there yet.
    nock(CENTRE)
      .get(/^\/fhir\/Patient\?/)
      .reply(200, { resourceType: 'Bundle', type: 'searchset', total: 0, entry: [] });
    const scope = nock(CENTRE)
      .post('/fhir', (b: Bundle) => {
        sent = b;
        return true;
      })
      .matchHeader('prefer', 'return=minimal')
      .reply(200, (_uri: string, raw: nock.Body) => {
        const b = (typeof raw === 'string' ? JSON.parse(raw) : raw) as Bundle;
        return {
          resourceType: 'Bundle',
          type: 'transaction-response',
          entry: (b.entry ?? []).map((e, i) => ({ response: { status: '201 Created', location: `${e.resource?.resourceType}/${i + 1}/_history/1` } })),
        };
      });
    const body = fixture();
    body.externalId = 'EHR-LARGE-CC';
    body.documents.push({ kind: 'pathology-report', title: 'Slide scan report', contentType: 'application/pdf', data: LARGE_B64 });
    const { body: created } = await api(gw, '/referrals', { method: 'POST', body: JSON.stringify(body) });
    await eventually(async () => (await api(gw, `/referrals/${created.id}`)).body.status === 'sent');
    expect(scope.isDone()).toBe(true);
    const binary = sent?.entry?.find((e) => e.resource?.resourceType === 'Binary');
    expect(binary?.request).toEqual({
      method: 'POST',
      url: 'Binary',
      ifNoneExist: `_tag=${encodeURIComponent(BINARY_DOCUMENT_TAG_SYSTEM)}|${encodeURIComponent(`${created.id}/document/3`)}`,
    });
    const doc = sent?.entry?.filter((e) => e.resource?.resourceType === 'DocumentReference')[2]?.resource as DocumentReference;
    expect(doc.content[0].attachment.url).toBe(binary?.fullUrl);
    expect(binary?.fullUrl).toMatch(/^urn:uuid:[0-9a-f-]{36}$/);
  });
});

// nock patches Node's HTTP client for the whole jest worker: undo it for the test files that run after this one.
afterAll(() => {
  nock.restore();
});
