import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeProtectedHeader, jwtVerify } from 'jose';
import type { Task } from '@medplum/fhirtypes';
import { destinationSchema, type Destination, type DestinationAuth } from '../../src/config/destinations';
import { createAuthProvider } from '../../src/destinations/fhir/client/auth';
import { createFhirClient, FhirRequestError } from '../../src/destinations/fhir/client';

/**
 * A local OAuth token endpoint and FHIR server (node http on port 0). The token endpoint verifies what a SMART
 * Backend Services server verifies: the client assertion's signature against the registered public key, and
 * its claims (iss = sub = client_id, aud = the token URL, a jti never seen before, exp no more than 5 minutes
 * ahead); or, for plain client-credentials, the Basic client authentication.
 */
interface TokenRequestSeen {
  form: URLSearchParams;
  authorization?: string;
  header?: Record<string, unknown>;
  claims?: Record<string, unknown>;
  error?: string;
}

function listen(handler: (req: IncomingMessage, body: string, res: ServerResponse) => void | Promise<void>): Promise<{ server: Server; url: string }> {
  const server = createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (body += c));
    req.on('end', () => void handler(req, body, res));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` })));
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

const CLIENT_ID = 'referral-gateway-test';
const SCOPE = 'system/Task.rus system/ServiceRequest.cruds';

let tokenServer: { server: Server; url: string };
let fhirServer: { server: Server; url: string };
let tokenUrl: string;
let seen: TokenRequestSeen[] = [];
const jtis = new Set<string>();
let issued = 0;
let expiresIn = 3600;
/** Public keys the token endpoint trusts for CLIENT_ID, by alg. */
const registered: Partial<Record<'RS384' | 'ES384', KeyObject>> = {};
/** Tokens the FHIR server refuses with 401 (e.g. revoked or expired on its side). */
const refused = new Set<string>();
const fhirAuth: string[] = [];
let dir: string;

const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ec = generateKeyPairSync('ec', { namedCurve: 'P-384' });
const other = generateKeyPairSync('ec', { namedCurve: 'P-384' });
const pem = (k: KeyObject): string => k.export({ type: 'pkcs8', format: 'pem' }) as string;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'rg-auth-'));
  tokenServer = await listen(async (req, body, res) => {
    const form = new URLSearchParams(body);
    const record: TokenRequestSeen = { form, authorization: req.headers.authorization };
    seen.push(record);
    if (req.method !== 'POST' || !/^application\/x-www-form-urlencoded/.test(req.headers['content-type'] ?? '')) {
      return json(res, 400, { error: 'invalid_request' });
    }
    if (form.get('grant_type') !== 'client_credentials') return json(res, 400, { error: 'unsupported_grant_type' });
    if (form.has('client_assertion')) {
      try {
        if (form.get('client_assertion_type') !== 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer') throw new Error('assertion type');
        const assertion = form.get('client_assertion') as string;
        record.header = decodeProtectedHeader(assertion) as Record<string, unknown>;
        const alg = record.header.alg as 'RS384' | 'ES384';
        const key = registered[alg];
        if (!key) throw new Error(`no key registered for ${alg}`);
        const { payload } = await jwtVerify(assertion, key, { algorithms: [alg], issuer: CLIENT_ID, subject: CLIENT_ID, audience: tokenUrl });
        record.claims = payload as Record<string, unknown>;
        const nowS = Math.floor(Date.now() / 1000);
        if (typeof payload.jti !== 'string' || jtis.has(payload.jti)) throw new Error('jti reused');
        jtis.add(payload.jti);
        if (typeof payload.exp !== 'number' || payload.exp > nowS + 300 + 5) throw new Error('exp too far ahead');
        if (form.get('scope') !== SCOPE) throw new Error('scope');
      } catch (err) {
        record.error = (err as Error).message;
        return json(res, 401, { error: 'invalid_client', error_description: record.error });
      }
    } else {
      const expected = 'Basic ' + Buffer.from(`${CLIENT_ID}:s3cr%2Bt+x`).toString('base64'); // RFC 6749 form-encoding of "s3cr+t x"
      if (req.headers.authorization !== expected) {
        record.error = 'bad client authentication';
        return json(res, 401, { error: 'invalid_client' });
      }
    }
    issued++;
    return json(res, 200, { access_token: `tok-${issued}`, token_type: 'bearer', expires_in: expiresIn, scope: SCOPE });
  });
  tokenUrl = `${tokenServer.url}/auth/token`;
  fhirServer = await listen((req, _body, res) => {
    const auth = req.headers.authorization ?? '';
    fhirAuth.push(auth);
    const token = auth.replace(/^Bearer /, '');
    if (!auth.startsWith('Bearer ') || refused.has(token)) {
      return json(res, 401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] });
    }
    return json(res, 200, { resourceType: 'Task', id: 't1', status: 'requested', intent: 'order', meta: { versionId: '1' } });
  });
});

afterAll(async () => {
  await new Promise((r) => tokenServer.server.close(r));
  await new Promise((r) => fhirServer.server.close(r));
  rmSync(dir, { recursive: true, force: true });
});

beforeEach(() => {
  seen = [];
  issued = 0;
  expiresIn = 3600;
  refused.clear();
  fhirAuth.length = 0;
  delete registered.RS384;
  delete registered.ES384;
});

function destination(auth: DestinationAuth): Destination {
  return {
    id: 'centre',
    name: 'Centre',
    organization: { system: 'https://example.org/org', value: 'centre' },
    baseUrl: `${fhirServer.url}/fhir/R4`,
    auth,
    timeoutMs: 2_000,
    maxInlineBytes: 1_048_576,
  };
}

const quiet = { debug: () => undefined, warn: () => undefined };

describe('SMART Backend Services (JWT client assertion)', () => {
  it('RS384 with the key from a PEM file: the token endpoint verifies signature and claims; the token is then reused', async () => {
    registered.RS384 = rsa.publicKey;
    const keyFile = join(dir, 'rs384.pem');
    writeFileSync(keyFile, pem(rsa.privateKey));
    const auth = destinationSchema.shape.auth.parse({
      type: 'smart-backend',
      tokenUrl,
      clientIdEnv: 'CENTRE_CLIENT_ID',
      privateKeyFile: keyFile,
      alg: 'RS384',
      kid: 'gw-key-2026',
      scope: SCOPE,
    });
    const client = createFhirClient(destination(auth), { env: { CENTRE_CLIENT_ID: CLIENT_ID }, logger: quiet });
    const t0 = Math.floor(Date.now() / 1000);
    expect((await client.read<Task>('Task', 't1')).status).toBe('requested');
    await client.read<Task>('Task', 't1');

    expect(seen).toHaveLength(1); // cached for the second request
    const [req] = seen;
    expect(req.error).toBeUndefined();
    expect(req.authorization).toBeUndefined(); // no client secret: the assertion authenticates
    expect(req.header).toEqual({ alg: 'RS384', typ: 'JWT', kid: 'gw-key-2026' });
    expect(req.claims).toMatchObject({ iss: CLIENT_ID, sub: CLIENT_ID, aud: tokenUrl });
    const { exp, iat } = req.claims as { exp: number; iat: number };
    expect(exp - iat).toBeLessThanOrEqual(300);
    expect(exp).toBeGreaterThan(t0);
    expect(fhirAuth).toEqual(['Bearer tok-1', 'Bearer tok-1']);
  });

  it('ES384 with the PEM in an environment variable (one line with \\n escapes)', async () => {
    registered.ES384 = ec.publicKey;
    const env = { CENTRE_CLIENT_ID: CLIENT_ID, CENTRE_KEY: pem(ec.privateKey).replace(/\n/g, '\\n') };
    const auth: DestinationAuth = { type: 'smart-backend', tokenUrl, clientIdEnv: 'CENTRE_CLIENT_ID', privateKeyEnv: 'CENTRE_KEY', alg: 'ES384', scope: SCOPE };
    const client = createFhirClient(destination(auth), { env, logger: quiet });
    await client.read('Task', 't1');
    expect(seen).toHaveLength(1);
    expect(seen[0].error).toBeUndefined();
    expect(seen[0].header).toEqual({ alg: 'ES384', typ: 'JWT' });
    expect(seen[0].claims).toMatchObject({ iss: CLIENT_ID, sub: CLIENT_ID, aud: tokenUrl });
  });

  it('caches the token until shortly before expires_in, then signs a new assertion with a new jti', async () => {
    registered.ES384 = ec.publicKey;
    expiresIn = 120; // renewal margin: a tenth of the lifetime (12 s), at most 60 s
    let now = Date.now();
    const env = { CENTRE_CLIENT_ID: CLIENT_ID, CENTRE_KEY: pem(ec.privateKey) };
    const auth: DestinationAuth = { type: 'smart-backend', tokenUrl, clientIdEnv: 'CENTRE_CLIENT_ID', privateKeyEnv: 'CENTRE_KEY', alg: 'ES384', scope: SCOPE };
    const client = createFhirClient(destination(auth), { env, logger: quiet, now: () => now });
    await client.read('Task', 't1');
    now += 107_000;
    await client.read('Task', 't1');
    expect(seen).toHaveLength(1);
    now += 2_000; // 109 s: within 12 s of expiry
    await client.read('Task', 't1');
    expect(seen).toHaveLength(2);
    expect(seen.every((s) => s.error === undefined)).toBe(true);
    expect(seen[0].claims?.jti).not.toBe(seen[1].claims?.jti);
    expect(fhirAuth).toEqual(['Bearer tok-1', 'Bearer tok-1', 'Bearer tok-2']);
  });

  it('a 401 from the FHIR server re-authenticates exactly once; a second 401 is a failure, not a loop', async () => {
    registered.RS384 = rsa.publicKey;
    const env = { CENTRE_CLIENT_ID: CLIENT_ID, CENTRE_KEY: pem(rsa.privateKey) };
    const auth: DestinationAuth = { type: 'smart-backend', tokenUrl, clientIdEnv: 'CENTRE_CLIENT_ID', privateKeyEnv: 'CENTRE_KEY', alg: 'RS384', scope: SCOPE };
    const client = createFhirClient(destination(auth), { env, logger: quiet });
    refused.add('tok-1'); // e.g. revoked at the centre before its expires_in
    expect((await client.read<Task>('Task', 't1')).id).toBe('t1');
    expect(fhirAuth).toEqual(['Bearer tok-1', 'Bearer tok-2']);
    expect(seen).toHaveLength(2);

    refused.add('tok-2');
    refused.add('tok-3');
    const err = await client.read('Task', 't1').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FhirRequestError);
    expect(err).toMatchObject({ kind: 'http', status: 401 });
    expect(seen).toHaveLength(3); // one re-authentication for that request, no more
    expect(fhirAuth.slice(2)).toEqual(['Bearer tok-2', 'Bearer tok-3']);
  });

  it('an assertion signed with a key the centre does not know is refused at the token endpoint, without key material in the error', async () => {
    registered.ES384 = ec.publicKey;
    const env = { CENTRE_CLIENT_ID: CLIENT_ID, CENTRE_KEY: pem(other.privateKey) };
    const auth: DestinationAuth = { type: 'smart-backend', tokenUrl, clientIdEnv: 'CENTRE_CLIENT_ID', privateKeyEnv: 'CENTRE_KEY', alg: 'ES384', scope: SCOPE };
    const client = createFhirClient(destination(auth), { env, logger: quiet });
    const err = (await client.read('Task', 't1').catch((e: unknown) => e)) as FhirRequestError;
    expect(seen[0].error).toMatch(/signature/);
    expect(err).toMatchObject({ kind: 'http', status: 401, source: 'token-endpoint' });
    expect(err.message).toBe('GET Task/…: token endpoint returned HTTP 401 (invalid_client)');
    expect(err.message).not.toContain('PRIVATE');
    expect(fhirAuth).toEqual([]); // the FHIR server was never called
  });

  it('configuration errors are caught when the client is built and name the variable or file, never the key', () => {
    const base = { type: 'smart-backend' as const, tokenUrl, clientIdEnv: 'CENTRE_CLIENT_ID', scope: SCOPE };
    const env = { CENTRE_CLIENT_ID: CLIENT_ID, EC_KEY: pem(ec.privateKey), RSA_KEY: pem(rsa.privateKey), JUNK: 'not a key' };
    expect(() => createAuthProvider({ ...base, alg: 'RS384', privateKeyEnv: 'EC_KEY' }, env)).toThrow(
      'alg RS384 needs an RSA private key of at least 2048 bits in the environment variable EC_KEY'
    );
    expect(() => createAuthProvider({ ...base, alg: 'ES384', privateKeyEnv: 'RSA_KEY' }, env)).toThrow('alg ES384 needs an EC P-384 private key');
    expect(() => createAuthProvider({ ...base, alg: 'ES384', privateKeyEnv: 'JUNK' }, env)).toThrow(
      'environment variable JUNK does not hold a PEM private key'
    );
    expect(() => createAuthProvider({ ...base, alg: 'ES384', privateKeyEnv: 'MISSING' }, env)).toThrow('environment variable MISSING is not set');
    expect(() => createAuthProvider({ ...base, alg: 'ES384', privateKeyFile: join(dir, 'nope.pem') }, env)).toThrow(
      /cannot read the private key file .*nope\.pem \(ENOENT\)/
    );
    expect(() => createAuthProvider({ ...base, alg: 'ES384', privateKeyEnv: 'EC_KEY' }, {})).toThrow('environment variable CENTRE_CLIENT_ID is not set');
    let message = '';
    try {
      createAuthProvider({ ...base, alg: 'RS384', privateKeyEnv: 'EC_KEY' }, env);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toContain('EC_KEY');
    expect(message).not.toMatch(/BEGIN|KEY-----|MI[A-Za-z0-9+/]{20}/);
  });

  it('the destination registry accepts smart-backend with a key file or variable (exactly one), RS384 or ES384 only', () => {
    const base = { type: 'smart-backend', tokenUrl, clientIdEnv: 'CID', scope: SCOPE, alg: 'ES384' };
    expect(destinationSchema.shape.auth.safeParse({ ...base, privateKeyEnv: 'K' }).success).toBe(true);
    expect(destinationSchema.shape.auth.safeParse({ ...base, privateKeyFile: '/etc/gw/key.pem' }).success).toBe(true);
    expect(destinationSchema.shape.auth.safeParse(base).success).toBe(false);
    expect(destinationSchema.shape.auth.safeParse({ ...base, privateKeyEnv: 'K', privateKeyFile: '/k.pem' }).success).toBe(false);
    expect(destinationSchema.shape.auth.safeParse({ ...base, privateKeyEnv: 'K', alg: 'RS256' }).success).toBe(false);
    // a secret itself in the file instead of a variable name is refused
    expect(destinationSchema.shape.auth.safeParse({ ...base, privateKeyEnv: '-----BEGIN PRIVATE KEY-----' }).success).toBe(false);
  });
});

describe('client-credentials against a local token endpoint', () => {
  const auth: DestinationAuth = { type: 'client-credentials', tokenUrl: '', clientIdEnv: 'CID', clientSecretEnv: 'CSECRET', scope: SCOPE };
  const env = { CID: CLIENT_ID, CSECRET: 's3cr+t x' };

  it('authenticates with form-encoded Basic credentials, reuses the token, and re-authenticates once on a 401', async () => {
    const client = createFhirClient(destination({ ...auth, tokenUrl }), { env, logger: quiet });
    await client.read('Task', 't1');
    await client.read('Task', 't1');
    expect(seen).toHaveLength(1);
    expect(seen[0].error).toBeUndefined();
    expect(seen[0].form.get('scope')).toBe(SCOPE);
    expect(seen[0].form.has('client_secret')).toBe(false); // never in the body
    refused.add('tok-1');
    await client.read('Task', 't1');
    expect(seen).toHaveLength(2);
    expect(fhirAuth).toEqual(['Bearer tok-1', 'Bearer tok-1', 'Bearer tok-1', 'Bearer tok-2']);
  });

  it('a wrong secret is a 401 from the token endpoint that does not leak the secret', async () => {
    const client = createFhirClient(destination({ ...auth, tokenUrl }), { env: { ...env, CSECRET: 'wrong-secret' }, logger: quiet });
    const err = (await client.read('Task', 't1').catch((e: unknown) => e)) as FhirRequestError;
    expect(err).toMatchObject({ kind: 'http', status: 401, source: 'token-endpoint' });
    expect(JSON.stringify({ m: err.message })).not.toContain('wrong-secret');
  });

  it('a token endpoint that does not answer in time is a timeout', async () => {
    const slow = await listen(() => undefined); // never answers
    try {
      const d = { ...destination({ ...auth, tokenUrl: `${slow.url}/token` }), timeoutMs: 200 };
      const err = (await createFhirClient(d, { env, logger: quiet })
        .read('Task', 't1')
        .catch((e: unknown) => e)) as FhirRequestError;
      expect(err).toMatchObject({ kind: 'timeout', source: 'token-endpoint' });
    } finally {
      slow.server.closeAllConnections();
      await new Promise((r) => slow.server.close(r));
    }
  });
});
