import type { Bundle } from '@medplum/fhirtypes';
import nock from 'nock';
import { createFhirClient, jsonRequestBody } from '../../src/destinations/fhir/client';
import type { Destination } from '../../src/config/destinations';

const ORIGIN = 'https://centre.example.org';
const big = Buffer.alloc(3 * 1024 * 1024 + 17, 0x41).toString('base64'); // ~4 MB of base64

async function drain(body: ReturnType<typeof jsonRequestBody>): Promise<{ text: string; chunks: number[] }> {
  const made = typeof body === 'function' ? body() : body;
  if (typeof made === 'string') return { text: made, chunks: [made.length] };
  const chunks: number[] = [];
  const parts: Buffer[] = [];
  for await (const c of made as ReadableStream<Uint8Array>) {
    chunks.push(c.length);
    parts.push(Buffer.from(c));
  }
  return { text: Buffer.concat(parts).toString('utf8'), chunks };
}

function bundleWith(data: string): Bundle {
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:6f1c1a8e-0d1e-4b55-9d7c-000000000001',
        resource: { resourceType: 'Patient', name: [{ family: 'Ünïcødé "quoted" \\ name' }] },
        request: { method: 'POST', url: 'Patient' },
      },
      { resource: { resourceType: 'Binary', id: 'rg-1', contentType: 'application/pdf', data }, request: { method: 'PUT', url: 'Binary/rg-1' } },
    ],
  };
}

describe('jsonRequestBody', () => {
  it('a value without long strings is one JSON string', async () => {
    const v = bundleWith('AAAA');
    expect(jsonRequestBody(v)).toBe(JSON.stringify(v));
  });

  it('streams long base64 in slices of at most 1 MiB; the bytes are exactly JSON.stringify of the value', async () => {
    const v = bundleWith(big);
    const body = jsonRequestBody(v);
    expect(typeof body).toBe('function');
    const { text, chunks } = await drain(body);
    expect(text).toBe(JSON.stringify(v));
    expect(Math.max(...chunks)).toBeLessThanOrEqual(1024 * 1024);
    expect(chunks.length).toBeGreaterThan(4);
    // Each call gives a fresh, complete stream (a resend after a 401 needs one).
    expect((await drain(body)).text).toBe(text);
  });

  it('long strings that JSON must escape are escaped as JSON.stringify does', async () => {
    const odd = `"quote" \\ back\nline \u2028 ${'é'.repeat(70_000)}`;
    const v = { a: odd, b: [big, odd], c: { d: big } };
    expect((await drain(jsonRequestBody(v))).text).toBe(JSON.stringify(v));
  });
});

describe('transaction() with a large Binary', () => {
  const destination: Destination = {
    id: 'centre',
    name: 'Centre',
    organization: { system: 'https://example.org/org', value: 'centre' },
    baseUrl: `${ORIGIN}/fhir/R4`,
    auth: { type: 'client-credentials', tokenUrl: `${ORIGIN}/token`, clientIdEnv: 'CID', clientSecretEnv: 'CS' },
    timeoutMs: 5_000,
    maxInlineBytes: 1024,
  };

  beforeAll(() => nock.disableNetConnect());
  afterAll(() => {
    nock.cleanAll();
    nock.enableNetConnect();
    nock.restore();
  });

  it('sends the whole streamed body again after a 401 and one re-authentication, asking for return=minimal', async () => {
    const received: string[] = [];
    nock(ORIGIN)
      .post('/token')
      .times(2)
      .reply(200, () => ({ access_token: `tok-${received.length}`, token_type: 'Bearer', expires_in: 600 }));
    const scope = nock(ORIGIN)
      .post('/fhir/R4', (b: unknown) => {
        received.push(typeof b === 'string' ? b : JSON.stringify(b));
        return true;
      })
      .matchHeader('prefer', 'return=minimal')
      .matchHeader('content-type', 'application/fhir+json')
      .reply(401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'expired' }] })
      .post('/fhir/R4', (b: unknown) => {
        received.push(typeof b === 'string' ? b : JSON.stringify(b));
        return true;
      })
      .reply(200, {
        resourceType: 'Bundle',
        type: 'transaction-response',
        entry: [
          { response: { status: '201 Created', location: 'Patient/p1/_history/1' } },
          { response: { status: '201 Created', location: 'Binary/rg-1/_history/1' } },
        ],
      });
    const client = createFhirClient(destination, { env: { CID: 'gw', CS: 'secret' }, logger: { debug: () => undefined, warn: () => undefined } });
    const v = bundleWith(big);
    const answer = await client.transaction(v, { preferMinimal: true });
    expect(answer?.type).toBe('transaction-response');
    expect(scope.isDone()).toBe(true);
    expect(received).toHaveLength(2);
    for (const r of received) expect(JSON.parse(r)).toEqual(v);
  });
});
