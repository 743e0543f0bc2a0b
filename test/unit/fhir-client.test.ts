import nock from 'nock';
import type { Bundle, OperationOutcome, Task } from '@medplum/fhirtypes';
import type { Destination, DestinationAuth } from '../../src/config/destinations';
import { createFhirClient, FhirRequestError } from '../../src/destinations/fhir/client';
import type { FhirClient, FhirClientOptions } from '../../src/destinations/fhir/client';
import { createAuthProvider } from '../../src/destinations/fhir/client/auth';
import { parseLocation, sendTransaction } from '../../src/destinations/fhir/client/transaction';

const ORIGIN = 'https://centre.example.org';
const BASE_PATH = '/fhir/R4';
const AUTH_ORIGIN = 'https://auth.example.org';
/** Appears in the request bundle and in a server diagnostic: it must never reach a message or a log line. */
const PATIENT_NAME = 'Zebedee-Quixote';

function destination(over: Partial<Destination> = {}): Destination {
  return {
    id: 'centre',
    name: 'Example Cancer Centre',
    organization: { system: 'https://example.org/org', value: 'centre' },
    baseUrl: `${ORIGIN}${BASE_PATH}`,
    auth: { type: 'none' },
    timeoutMs: 2_000,
    maxInlineBytes: 1_048_576,
    ...over,
  };
}

interface Captured {
  lines: string[];
  logger: NonNullable<FhirClientOptions['logger']>;
}

function captureLogger(): Captured {
  const lines: string[] = [];
  const push = (level: string) => (message: string, meta?: Record<string, unknown>) => {
    lines.push(`${level} ${message} ${JSON.stringify(meta ?? {})}`);
  };
  return { lines, logger: { debug: push('debug'), warn: push('warn') } };
}

let log: Captured;

function client(over: Partial<Destination> = {}, opts: FhirClientOptions = {}): FhirClient {
  return createFhirClient(destination(over), { logger: log.logger, env: {}, ...opts });
}

function requestBundle(): Bundle {
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:6f1c1a8e-0d1e-4b55-9d7c-000000000001',
        resource: { resourceType: 'Patient', name: [{ family: PATIENT_NAME }] },
        request: { method: 'POST', url: 'Patient', ifNoneExist: 'identifier=https://ehr.example.org/mrn|123' },
      },
      {
        fullUrl: 'urn:uuid:6f1c1a8e-0d1e-4b55-9d7c-000000000002',
        resource: {
          resourceType: 'ServiceRequest',
          status: 'active',
          intent: 'order',
          subject: { reference: 'urn:uuid:6f1c1a8e-0d1e-4b55-9d7c-000000000001' },
        },
        request: { method: 'POST', url: 'ServiceRequest' },
      },
      {
        fullUrl: 'urn:uuid:6f1c1a8e-0d1e-4b55-9d7c-000000000003',
        resource: { resourceType: 'Task', status: 'requested', intent: 'order' },
        request: { method: 'POST', url: 'Task' },
      },
    ],
  };
}

/** A good answer: a relative location, an absolute one, and one that only carries the resource. */
function okResponse(): Bundle {
  return {
    resourceType: 'Bundle',
    type: 'transaction-response',
    entry: [
      { response: { status: '201 Created', location: 'Patient/p1/_history/1' } },
      { response: { status: '201', location: `${ORIGIN}${BASE_PATH}/ServiceRequest/sr1/_history/2` } },
      {
        response: { status: '201 Created', etag: 'W/"3"' },
        resource: { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order', meta: { versionId: '3' } },
      },
    ],
  };
}

const EXPECTED_LOCATIONS = [
  { resourceType: 'Patient', id: 'p1', versionId: '1' },
  { resourceType: 'ServiceRequest', id: 'sr1', versionId: '2' },
  { resourceType: 'Task', id: 't1', versionId: '3' },
];

function expectNoPatientData(...texts: string[]): void {
  for (const t of [...texts, ...log.lines]) {
    expect(t).not.toContain(PATIENT_NAME);
  }
}

beforeAll(() => {
  nock.disableNetConnect();
});

beforeEach(() => {
  log = captureLogger();
});

afterEach(() => {
  nock.abortPendingRequests(); // a delayed reply (timeout test) must not land after its test
  nock.cleanAll();
  jest.restoreAllMocks();
});

afterAll(() => {
  nock.enableNetConnect();
  nock.restore();
});

describe('sendTransaction over MedplumClient', () => {
  it('intercepts with nock; a 503 is a retry and MedplumClient does not resend it; the next call is ok with ids', async () => {
    const seen: Bundle[] = [];
    const scope = nock(ORIGIN)
      .post(BASE_PATH, (body: Bundle) => {
        seen.push(body);
        return body.resourceType === 'Bundle' && body.type === 'transaction';
      })
      .matchHeader('content-type', /application\/fhir\+json/)
      .reply(503, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'transient' }] })
      .post(BASE_PATH)
      .reply(200, okResponse(), { 'Content-Type': 'application/fhir+json' });
    const c = client();

    const first = await sendTransaction(c, requestBundle());
    expect(first).toEqual({
      kind: 'retry',
      reason: expect.stringContaining('HTTP 503'),
      status: 503,
      retryAfterMs: undefined,
      // kept for the dead letter, should the retries run out
      outcome: { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'transient' }] },
    });
    // Only the 503 interceptor was used: MedplumClient made exactly one request (its retries are off).
    expect(scope.isDone()).toBe(false);
    expect(scope.pendingMocks()).toHaveLength(1);

    const second = await sendTransaction(c, requestBundle());
    expect(second).toEqual({ kind: 'ok', locations: EXPECTED_LOCATIONS });
    expect(scope.isDone()).toBe(true);
    expect(seen[0].entry).toHaveLength(3);
    expectNoPatientData(first.kind === 'retry' ? first.reason : '');
  });

  it('429 with Retry-After: 2 is a retry after 2000 ms', async () => {
    const scope = nock(ORIGIN).post(BASE_PATH).reply(429, 'slow down', { 'Retry-After': '2' });
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toMatchObject({ kind: 'retry', status: 429, retryAfterMs: 2000 });
    expect(scope.isDone()).toBe(true);
  });

  it('503 with an HTTP-date Retry-After is honoured', async () => {
    const at = new Date(Date.now() + 10_000);
    nock(ORIGIN).post(BASE_PATH).reply(503, '', { 'Retry-After': at.toUTCString() });
    const result = await sendTransaction(client(), requestBundle());
    expect(result.kind).toBe('retry');
    const ms = (result as { retryAfterMs?: number }).retryAfterMs ?? -1;
    // HTTP-dates have second precision.
    expect(ms).toBeGreaterThan(8_000);
    expect(ms).toBeLessThanOrEqual(10_000);
  });

  it('a connection reset is a retry naming the error code', async () => {
    const scope = nock(ORIGIN).post(BASE_PATH).replyWithError({ code: 'ECONNRESET', message: 'socket hang up' });
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toEqual({ kind: 'retry', reason: 'POST (base): network error (ECONNRESET)' });
    expect(scope.isDone()).toBe(true);
  });

  it('a response slower than timeoutMs is a timeout retry, cut off at the timeout', async () => {
    nock(ORIGIN).post(BASE_PATH).delay(2_000).reply(200, okResponse());
    const started = Date.now();
    const result = await sendTransaction(client({ timeoutMs: 200 }), requestBundle());
    const elapsed = Date.now() - started;
    expect(result).toEqual({ kind: 'retry', reason: 'POST (base): no complete response within 200 ms' });
    expect(elapsed).toBeGreaterThanOrEqual(190);
    expect(elapsed).toBeLessThan(1_000);
  });

  it('the timeout also covers a body that stalls after the headers', async () => {
    const stalled: typeof fetch = async () =>
      new Response(
        new ReadableStream({
          start(controller) {
            controller.enqueue(new TextEncoder().encode('{"resourceType":"Bundle",'));
            // never closed
          },
        }),
        { status: 200, headers: { 'Content-Type': 'application/fhir+json' } }
      );
    const started = Date.now();
    const result = await sendTransaction(client({ timeoutMs: 200 }, { fetchImpl: stalled }), requestBundle());
    expect(result).toEqual({ kind: 'retry', reason: 'POST (base): no complete response within 200 ms' });
    expect(Date.now() - started).toBeLessThan(700);
  });

  it('400 with an OperationOutcome fails and keeps the outcome, without its text in the reason', async () => {
    const outcome: OperationOutcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'invalid', diagnostics: `Patient.name ${PATIENT_NAME} is not allowed` }],
    };
    nock(ORIGIN).post(BASE_PATH).reply(400, outcome, { 'Content-Type': 'application/fhir+json' });
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toEqual({
      kind: 'fail',
      status: 400,
      outcome,
      reason: 'POST (base): HTTP 400 (OperationOutcome: invalid)',
    });
    expectNoPatientData((result as { reason: string }).reason);
  });

  it('a 4xx without an OperationOutcome fails with its status', async () => {
    nock(ORIGIN).post(BASE_PATH).reply(422, '<html>nope</html>', { 'Content-Type': 'text/html' });
    expect(await sendTransaction(client(), requestBundle())).toEqual({
      kind: 'fail',
      status: 422,
      outcome: undefined,
      reason: 'POST (base): HTTP 422',
    });
  });

  it('an HTML page with 200 is a retry, not ok', async () => {
    nock(ORIGIN).post(BASE_PATH).reply(200, `<html><body>Proxy login ${PATIENT_NAME}</body></html>`, { 'Content-Type': 'text/html' });
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toEqual({
      kind: 'retry',
      status: 200,
      reason: 'POST (base): HTTP 200 body is not a JSON object (text/html)',
    });
    expectNoPatientData((result as { reason: string }).reason);
  });

  it('truncated JSON is a retry, and nothing (MedplumClient included) logs the body', async () => {
    const consoleError = jest.spyOn(console, 'error').mockImplementation(() => undefined);
    const full = JSON.stringify({ ...okResponse(), note: PATIENT_NAME });
    nock(ORIGIN)
      .post(BASE_PATH)
      .reply(200, full.slice(0, full.length - 40), { 'Content-Type': 'application/fhir+json' });
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toMatchObject({ kind: 'retry', status: 200, reason: expect.stringContaining('not a JSON object') });
    expect(consoleError).not.toHaveBeenCalled();
    expectNoPatientData((result as { reason: string }).reason);
  });

  it('an answer with fewer entries than requests is a retry', async () => {
    const short = okResponse();
    short.entry = short.entry?.slice(0, 2);
    nock(ORIGIN).post(BASE_PATH).reply(200, short);
    expect(await sendTransaction(client(), requestBundle())).toEqual({
      kind: 'retry',
      reason: 'answer has 2 entries for 3 requests; the transaction outcome is unknown',
    });
  });

  it('a 200 whose entries carry no location or id is a retry, never ok', async () => {
    const noIds: Bundle = {
      resourceType: 'Bundle',
      type: 'transaction-response',
      entry: [{ response: { status: '201' } }, { response: { status: '201' } }, { response: { status: '201' } }],
    };
    nock(ORIGIN).post(BASE_PATH).reply(200, noIds);
    expect(await sendTransaction(client(), requestBundle())).toEqual({
      kind: 'retry',
      reason: 'entry 0 (Patient) answered 201 but names no resource id',
    });
  });

  it('a Bundle that is not a transaction-response is a retry', async () => {
    nock(ORIGIN)
      .post(BASE_PATH)
      .reply(200, { ...okResponse(), type: 'batch-response' });
    expect(await sendTransaction(client(), requestBundle())).toMatchObject({
      kind: 'retry',
      reason: 'answer is a Bundle of type batch-response, not transaction-response',
    });
  });

  it('a non-Bundle JSON 200 (e.g. an OperationOutcome) is a retry', async () => {
    nock(ORIGIN).post(BASE_PATH).reply(200, { resourceType: 'OperationOutcome', issue: [] });
    expect(await sendTransaction(client(), requestBundle())).toEqual({
      kind: 'retry',
      status: 200,
      reason: 'POST (base): HTTP 200 response is not a Bundle',
    });
  });

  it('decision: an entry answered 400 inside a 200 fails with that entry status and outcome', async () => {
    const entryOutcome: OperationOutcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'required', diagnostics: `missing field for ${PATIENT_NAME}` }],
    };
    const answer = okResponse();
    answer.entry![1] = { response: { status: '400 Bad Request', outcome: entryOutcome } };
    nock(ORIGIN).post(BASE_PATH).reply(200, answer);
    const result = await sendTransaction(client(), requestBundle());
    expect(result).toEqual({
      kind: 'fail',
      status: 400,
      outcome: entryOutcome,
      reason: 'entry 1 (ServiceRequest) answered 400 (OperationOutcome: required); other entries may have been applied by the server',
    });
    expectNoPatientData((result as { reason: string }).reason);
  });

  it('an entry answered 503 (or 429) inside a 200 is a retry', async () => {
    const answer = okResponse();
    answer.entry![2] = { response: { status: '503 Service Unavailable' } };
    nock(ORIGIN).post(BASE_PATH).reply(200, answer);
    expect(await sendTransaction(client(), requestBundle())).toEqual({
      kind: 'retry',
      status: 503,
      reason: 'entry 2 (Task) answered 503',
    });
  });

  it('a location of another resource type than the request is a retry', async () => {
    const answer = okResponse();
    answer.entry![0] = { response: { status: '201', location: 'Practitioner/x1' } };
    nock(ORIGIN).post(BASE_PATH).reply(200, answer);
    expect(await sendTransaction(client(), requestBundle())).toMatchObject({
      kind: 'retry',
      reason: 'entry 0 (Patient) answered with a Practitioner location',
    });
  });

  it('throws for a bundle that is not a transaction (programming error), without a request', async () => {
    await expect(sendTransaction(client(), { resourceType: 'Bundle', type: 'batch' })).rejects.toThrow('expected a Bundle of type "transaction"');
  });
});

describe('parseLocation', () => {
  it.each([
    ['Patient/123/_history/1', { resourceType: 'Patient', id: '123', versionId: '1' }],
    ['Patient/123', { resourceType: 'Patient', id: '123' }],
    [`${ORIGIN}${BASE_PATH}/Task/abc-1/_history/7`, { resourceType: 'Task', id: 'abc-1', versionId: '7' }],
    ['http://internal:8080/fhir/Patient/9?x=1', { resourceType: 'Patient', id: '9' }],
    ['not a location', undefined],
    ['Patient/bad id', undefined],
  ])('%s', (input, expected) => {
    expect(parseLocation(input)).toEqual(expected);
  });
});

describe('authentication', () => {
  const basic: DestinationAuth = { type: 'basic', usernameEnv: 'CENTRE_USER', passwordEnv: 'CENTRE_PASS' };
  const bearer: DestinationAuth = { type: 'bearer', tokenEnv: 'CENTRE_TOKEN' };
  const cc: DestinationAuth = {
    type: 'client-credentials',
    tokenUrl: `${AUTH_ORIGIN}/oauth2/token`,
    clientIdEnv: 'CENTRE_CLIENT_ID',
    clientSecretEnv: 'CENTRE_CLIENT_SECRET',
    scope: 'system/*.write',
  };
  const ccEnv = { CENTRE_CLIENT_ID: 'gateway', CENTRE_CLIENT_SECRET: 's3cret' };
  const ccBasic = 'Basic ' + Buffer.from('gateway:s3cret').toString('base64');

  function tokenEndpoint(token: string, expiresIn = 3600) {
    return nock(AUTH_ORIGIN)
      .post('/oauth2/token', (body: Record<string, string>) => {
        return body.grant_type === 'client_credentials' && body.scope === 'system/*.write' && !('client_secret' in body);
      })
      .matchHeader('authorization', ccBasic)
      .matchHeader('content-type', /application\/x-www-form-urlencoded/)
      .reply(200, { access_token: token, token_type: 'Bearer', expires_in: expiresIn });
  }

  it('sends Basic credentials from the named environment variables', async () => {
    const scope = nock(ORIGIN)
      .get(`${BASE_PATH}/Task/t1`)
      .matchHeader('authorization', 'Basic ' + Buffer.from('alice:pa:ss').toString('base64'))
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    const c = client({ auth: basic }, { env: { CENTRE_USER: 'alice', CENTRE_PASS: 'pa:ss' } });
    const task = await c.read<Task>('Task', 't1');
    expect(task.status).toBe('requested');
    expect(scope.isDone()).toBe(true);
  });

  it('sends a Bearer token from the named environment variable', async () => {
    const scope = nock(ORIGIN).post(BASE_PATH).matchHeader('authorization', 'Bearer static-token').reply(200, okResponse());
    const result = await sendTransaction(client({ auth: bearer }, { env: { CENTRE_TOKEN: 'static-token' } }), requestBundle());
    expect(result.kind).toBe('ok');
    expect(scope.isDone()).toBe(true);
  });

  it('sends no Authorization header with auth none', async () => {
    const scope = nock(ORIGIN, { badheaders: ['authorization'] })
      .get(`${BASE_PATH}/Task/t1`)
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    await client().read('Task', 't1');
    expect(scope.isDone()).toBe(true);
  });

  it('a missing environment variable is a clear error naming it', () => {
    expect(() => client({ auth: bearer }, { env: {} })).toThrow('environment variable CENTRE_TOKEN is not set');
    expect(() => createAuthProvider(basic, { CENTRE_USER: 'alice' })).toThrow('environment variable CENTRE_PASS is not set');
    expect(() => createAuthProvider(cc, { CENTRE_CLIENT_ID: 'x' })).toThrow('environment variable CENTRE_CLIENT_SECRET is not set');
  });

  it('client-credentials: one token for two requests, a new one after expiry', async () => {
    let now = 1_000_000;
    const token1 = tokenEndpoint('tok-1', 3600);
    const fhir = nock(ORIGIN)
      .get(`${BASE_PATH}/Task/t1`)
      .times(2)
      .matchHeader('authorization', 'Bearer tok-1')
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    const c = client({ auth: cc }, { env: ccEnv, now: () => now });

    await c.read('Task', 't1');
    await c.read('Task', 't1');
    expect(token1.isDone()).toBe(true);
    expect(fhir.isDone()).toBe(true);

    // Still cached 59 min 59 s minus the 60 s margin... then renewed 60 s before expiry.
    now += (3600 - 61) * 1000;
    nock(ORIGIN)
      .get(`${BASE_PATH}/Task/t1`)
      .matchHeader('authorization', 'Bearer tok-1')
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    await c.read('Task', 't1');

    now += 2_000;
    const token2 = tokenEndpoint('tok-2', 3600);
    const fhir2 = nock(ORIGIN)
      .get(`${BASE_PATH}/Task/t1`)
      .matchHeader('authorization', 'Bearer tok-2')
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    await c.read('Task', 't1');
    expect(token2.isDone()).toBe(true);
    expect(fhir2.isDone()).toBe(true);
    expect(nock.pendingMocks()).toEqual([]);
  });

  it('client-credentials: a 401 re-authenticates exactly once, then succeeds', async () => {
    const token1 = tokenEndpoint('tok-1');
    const token2 = tokenEndpoint('tok-2');
    const fhir = nock(ORIGIN)
      .post(BASE_PATH)
      .matchHeader('authorization', 'Bearer tok-1')
      .reply(401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] })
      .post(BASE_PATH)
      .matchHeader('authorization', 'Bearer tok-2')
      .reply(200, okResponse());
    const result = await sendTransaction(client({ auth: cc }, { env: ccEnv }), requestBundle());
    expect(result).toEqual({ kind: 'ok', locations: EXPECTED_LOCATIONS });
    expect(token1.isDone() && token2.isDone() && fhir.isDone()).toBe(true);
    expect(log.lines.filter((l) => l.includes('re-authenticating'))).toHaveLength(1);
  });

  it('client-credentials: a second 401 is a failure, not a loop', async () => {
    tokenEndpoint('tok-1');
    tokenEndpoint('tok-2');
    const fhir = nock(ORIGIN)
      .post(BASE_PATH)
      .times(2)
      .reply(401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] });
    const result = await sendTransaction(client({ auth: cc }, { env: ccEnv }), requestBundle());
    expect(result).toMatchObject({ kind: 'fail', status: 401, reason: 'POST (base): HTTP 401 (OperationOutcome: login)' });
    expect(fhir.isDone()).toBe(true);
    // Both tokens used, nothing else requested (a third token request would have hit disableNetConnect).
    expect(nock.pendingMocks()).toEqual([]);
  });

  it('static bearer: a 401 is not retried (nothing would change)', async () => {
    const fhir = nock(ORIGIN).post(BASE_PATH).reply(401, '');
    const result = await sendTransaction(client({ auth: bearer }, { env: { CENTRE_TOKEN: 'bad' } }), requestBundle());
    expect(result).toMatchObject({ kind: 'fail', status: 401 });
    expect(fhir.isDone()).toBe(true);
  });

  it('client-credentials: a token endpoint 503 is a retry; a 401 there is a fail; neither leaks the secret', async () => {
    nock(AUTH_ORIGIN).post('/oauth2/token').reply(503, 'down');
    const c = client({ auth: cc }, { env: ccEnv });
    const first = await sendTransaction(c, requestBundle());
    expect(first).toEqual({
      kind: 'retry',
      status: 503,
      retryAfterMs: undefined,
      reason: 'POST (base): token endpoint returned HTTP 503',
    });

    nock(AUTH_ORIGIN).post('/oauth2/token').reply(401, { error: 'invalid_client', error_description: 's3cret is wrong' });
    const second = await sendTransaction(c, requestBundle());
    expect(second).toMatchObject({ kind: 'fail', status: 401, reason: 'POST (base): token endpoint returned HTTP 401 (invalid_client)' });
    expect(JSON.stringify([first, second, log.lines])).not.toContain('s3cret');
  });

  it('client-credentials: concurrent requests share one token request', async () => {
    const token = tokenEndpoint('tok-1');
    nock(ORIGIN)
      .get(`${BASE_PATH}/Task/t1`)
      .times(3)
      .matchHeader('authorization', 'Bearer tok-1')
      .reply(200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order' });
    const c = client({ auth: cc }, { env: ccEnv });
    await Promise.all([c.read('Task', 't1'), c.read('Task', 't1'), c.read('Task', 't1')]);
    expect(token.isDone()).toBe(true);
    expect(nock.pendingMocks()).toEqual([]);
  });
});

describe('read, update, search, searchAll, readUrl', () => {
  const task = (id: string, extra: Partial<Task> = {}): Task => ({
    resourceType: 'Task',
    id,
    status: 'requested',
    intent: 'order',
    ...extra,
  });

  it('read keeps the real HTTP status of errors (MedplumClient alone would not)', async () => {
    nock(ORIGIN).get(`${BASE_PATH}/Task/t1`).reply(502, '<html>bad gateway</html>', { 'Content-Type': 'text/html' });
    const err = await client()
      .read('Task', 't1')
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FhirRequestError);
    expect(err).toMatchObject({ kind: 'http', status: 502, message: 'GET Task/…: HTTP 502', source: 'fhir-server' });
  });

  it('read of a missing resource is an http 404 with the outcome', async () => {
    const outcome = { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] };
    nock(ORIGIN).get(`${BASE_PATH}/Task/gone`).reply(404, outcome, { 'Content-Type': 'application/fhir+json' });
    await expect(client().read('Task', 'gone')).rejects.toMatchObject({ kind: 'http', status: 404, outcome });
  });

  it('read refuses an answer of another resource type', async () => {
    nock(ORIGIN).get(`${BASE_PATH}/Task/t1`).reply(200, { resourceType: 'Patient', id: 't1' });
    await expect(client().read('Task', 't1')).rejects.toMatchObject({ kind: 'invalid-response', status: 200 });
  });

  it('update sends If-Match and returns the server version; a 412 keeps its status', async () => {
    const scope = nock(ORIGIN)
      .put(`${BASE_PATH}/Task/t1`, (body: Task) => body.status === 'cancelled')
      .matchHeader('if-match', 'W/"3"')
      .reply(200, task('t1', { status: 'cancelled', meta: { versionId: '4' } }))
      .put(`${BASE_PATH}/Task/t1`)
      .matchHeader('if-match', 'W/"3"')
      .reply(412, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'conflict' }] });
    const c = client();
    const updated = await c.update(task('t1', { status: 'cancelled' }), '3');
    expect(updated.meta?.versionId).toBe('4');
    await expect(c.update(task('t1', { status: 'cancelled' }), '3')).rejects.toMatchObject({ kind: 'http', status: 412 });
    expect(scope.isDone()).toBe(true);
  });

  it('update with an empty 200 takes the version from the ETag', async () => {
    nock(ORIGIN).put(`${BASE_PATH}/Task/t1`).reply(200, '', { ETag: 'W/"9"', 'Content-Length': '0' });
    const updated = await client().update(task('t1'));
    expect(updated.meta?.versionId).toBe('9');
  });

  it('search passes parameters (repeated ones too) and returns the Bundle', async () => {
    const scope = nock(ORIGIN)
      .get(`${BASE_PATH}/Task`)
      .query((q) => {
        return (
          q._tag === 'https://gw.example/tag|referral' &&
          Array.isArray(q._lastUpdated) &&
          q._lastUpdated[0] === 'gt2026-01-01T00:00:00+01:00' &&
          q._lastUpdated[1] === 'lt2026-02-01T00:00:00Z'
        );
      })
      .reply(200, { resourceType: 'Bundle', type: 'searchset', entry: [{ resource: task('t1') }] });
    const bundle = await client().search<Task>('Task', {
      _tag: 'https://gw.example/tag|referral',
      _lastUpdated: ['gt2026-01-01T00:00:00+01:00', 'lt2026-02-01T00:00:00Z'],
    });
    expect(bundle.entry?.[0].resource?.id).toBe('t1');
    expect(scope.isDone()).toBe(true);
  });

  it('searchAll follows absolute and relative next links itself', async () => {
    const scope = nock(ORIGIN)
      .get(`${BASE_PATH}/Task`)
      .query({ _count: '1' })
      .reply(200, {
        resourceType: 'Bundle',
        type: 'searchset',
        link: [{ relation: 'next', url: `${ORIGIN}${BASE_PATH}?_getpages=abc&_getpagesoffset=1` }],
        entry: [{ resource: task('t1'), search: { mode: 'match' } }],
      })
      .get(BASE_PATH)
      .query({ _getpages: 'abc', _getpagesoffset: '1' })
      .reply(200, {
        resourceType: 'Bundle',
        type: 'searchset',
        link: [{ relation: 'next', url: 'Task?_page=3' }],
        entry: [
          { resource: task('t2'), search: { mode: 'match' } },
          { resource: { resourceType: 'ServiceRequest', id: 'sr1', status: 'active', intent: 'order' }, search: { mode: 'include' } },
        ],
      })
      .get(`${BASE_PATH}/Task`)
      .query({ _page: '3' })
      .reply(200, { resourceType: 'Bundle', type: 'searchset', entry: [{ resource: task('t3') }] });
    const result = await client().searchAll<Task>('Task', { _count: '1' });
    expect(result.resources.map((t) => t.id)).toEqual(['t1', 't2', 't3']);
    expect(result.included.map((r) => r.id)).toEqual(['sr1']);
    expect(result.requests).toBe(3);
    expect(result.truncated).toBe(false);
    expect(scope.isDone()).toBe(true);
  });

  it('searchAll stops at the page cap and says so', async () => {
    nock(ORIGIN)
      .get(`${BASE_PATH}/Task`)
      .times(2)
      .query(true)
      .reply(200, (uri: string) => ({
        resourceType: 'Bundle',
        type: 'searchset',
        link: [{ relation: 'next', url: `Task?_page=${uri.length}` }],
        entry: [{ resource: task(`t${uri.length}`) }],
      }));
    const result = await client().searchAll('Task', {}, { maxPages: 2 });
    expect(result).toMatchObject({ requests: 2, truncated: true });
    expect(result.resources).toHaveLength(2);
  });

  it('searchAll refuses a next link outside the destination base', async () => {
    nock(ORIGIN)
      .get(`${BASE_PATH}/Task`)
      .reply(200, {
        resourceType: 'Bundle',
        type: 'searchset',
        link: [{ relation: 'next', url: 'http://internal-host:8080/fhir/R4?page=2' }],
      });
    await expect(client().searchAll('Task', {})).rejects.toMatchObject({
      kind: 'invalid-response',
      message: 'GET Task (page 2): next link points outside the destination base',
    });
  });

  it('readUrl returns raw bytes and content type for a relative Binary URL', async () => {
    const pdf = Buffer.from('%PDF-1.7\n\x00\x01\x02binary', 'latin1');
    nock(ORIGIN).get(`${BASE_PATH}/Binary/b1`).reply(200, pdf, { 'Content-Type': 'application/pdf' });
    const got = await client().readUrl('Binary/b1');
    expect(got.contentType).toBe('application/pdf');
    expect(got.json).toBeUndefined();
    expect(Buffer.compare(got.body, pdf)).toBe(0);
  });

  it('readUrl parses JSON for an absolute URL under the base', async () => {
    nock(ORIGIN)
      .get(`${BASE_PATH}/DocumentReference/d1`)
      .reply(200, { resourceType: 'DocumentReference', id: 'd1' }, { 'Content-Type': 'application/fhir+json;charset=utf-8' });
    const got = await client().readUrl(`${ORIGIN}${BASE_PATH}/DocumentReference/d1`);
    expect(got.contentType).toBe('application/fhir+json');
    expect(got.json).toEqual({ resourceType: 'DocumentReference', id: 'd1' });
  });

  it('readUrl refuses absolute URLs outside the base, without a request', async () => {
    const c = client();
    await expect(c.readUrl('https://storage.example.net/bucket/report.pdf')).rejects.toMatchObject({
      kind: 'invalid-response',
      message: 'GET (url): URL is not under the destination base (list its origin in attachmentOrigins, or set presignedUrls)',
    });
    await expect(c.readUrl(`${ORIGIN}/other/Binary/1`)).rejects.toThrow('not under the destination base');
    await expect(c.readUrl(`${ORIGIN}${BASE_PATH}-evil/Binary/1`)).rejects.toThrow('not under the destination base');
  });

  it('readUrl reports an http error with its status', async () => {
    nock(ORIGIN).get(`${BASE_PATH}/Binary/b1`).reply(503, '', { 'Retry-After': '7' });
    await expect(client().readUrl('Binary/b1')).rejects.toMatchObject({ kind: 'http', status: 503, retryAfterMs: 7000 });
  });

  it('a destination at the server root works too', async () => {
    const scope = nock(ORIGIN).get('/Task/t1').reply(200, task('t1'));
    const c = client({ baseUrl: `${ORIGIN}/` });
    expect((await c.read('Task', 't1')).id).toBe('t1');
    expect(c.baseUrl).toBe(ORIGIN);
    expect(scope.isDone()).toBe(true);
  });

  it('logs carry destination, target, status and timing only', async () => {
    nock(ORIGIN).get(`${BASE_PATH}/Task`).query(true).reply(200, { resourceType: 'Bundle', type: 'searchset' });
    await client().search('Task', { identifier: `https://ehr.example.org/mrn|${PATIENT_NAME}` });
    expect(log.lines).toHaveLength(1);
    expect(log.lines[0]).toMatch(/^debug fhir request \{"destination":"centre","target":"GET Task\?…","status":200,"durationMs":\d+\}$/);
    expectNoPatientData();
  });
});
