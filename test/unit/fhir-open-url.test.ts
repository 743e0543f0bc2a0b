import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Destination } from '../../src/config/destinations';
import { createFhirClient, FhirRequestError, type FhirClient } from '../../src/destinations/fhir/client';

/**
 * The FHIR client's streamed read (openUrl), against local HTTP servers: the centre's FHIR server and a storage
 * host elsewhere. The same rules as the buffered reads (credentials only under the base, attachment URLs
 * elsewhere only when allowed and then without them), the body handed over as it comes, the timeout applying to
 * each wait once the headers are in.
 */

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

interface Host {
  origin: string;
  routes: Map<string, Handler>;
  seen: Array<{ path: string; authorization?: string; accept?: string }>;
  close(): Promise<void>;
}

async function host(): Promise<Host> {
  const routes = new Map<string, Handler>();
  const seen: Host['seen'] = [];
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    seen.push({ path, authorization: req.headers.authorization, accept: req.headers.accept });
    const handler = routes.get(path);
    if (handler) {
      handler(req, res);
    } else {
      res.writeHead(404, { 'Content-Type': 'application/fhir+json' }).end(JSON.stringify({ resourceType: 'OperationOutcome', issue: [{ code: 'not-found' }] }));
    }
  });
  server.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  return {
    origin: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    routes,
    seen,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

async function drain(body: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of body) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

describe('FhirClient.openUrl', () => {
  let centre: Host;
  let storage: Host;
  const bytes = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7) & 0xff));

  beforeEach(async () => {
    centre = await host();
    storage = await host();
  });
  afterEach(async () => {
    await centre.close();
    await storage.close();
  });

  function client(over: Partial<Destination> = {}): FhirClient {
    const dest: Destination = {
      id: 'centre',
      name: 'Centre',
      organization: { system: 'https://example.org/org', value: 'centre' },
      baseUrl: `${centre.origin}/fhir/R4`,
      auth: { type: 'bearer', tokenEnv: 'TOKEN' },
      timeoutMs: 2_000,
      maxInlineBytes: 1_048_576,
      ...over,
    };
    return createFhirClient(dest, {
      env: { TOKEN: 'tok', CLIENT_ID: 'id', CLIENT_SECRET: 'secret' },
      logger: { debug: () => undefined, warn: () => undefined },
    });
  }

  test('a Binary under the base: the raw bytes as a stream, with type, length, Accept and the credentials', async () => {
    centre.routes.set('/fhir/R4/Binary/b1', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf; name=x', 'Content-Length': String(bytes.length) });
      res.end(bytes);
    });
    const got = await client().openUrl('Binary/b1', { accept: 'application/pdf' });
    expect(got).toMatchObject({ status: 200, contentType: 'application/pdf', contentLength: bytes.length });
    expect((await drain(got.body)).equals(bytes)).toBe(true);
    expect(centre.seen).toEqual([{ path: '/fhir/R4/Binary/b1', authorization: 'Bearer tok', accept: 'application/pdf' }]);
  });

  test('a 401 with refreshable auth: one new token, one more try', async () => {
    let tokens = 0;
    centre.routes.set('/token', (_req, res) => {
      tokens++;
      res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ access_token: `t${tokens}`, token_type: 'Bearer', expires_in: 3600 }));
    });
    centre.routes.set('/fhir/R4/Binary/b2', (req, res) => {
      if (req.headers.authorization !== 'Bearer t2') res.writeHead(401).end();
      else res.writeHead(200, { 'Content-Type': 'application/pdf' }).end(bytes);
    });
    const c = client({ auth: { type: 'client-credentials', tokenUrl: `${centre.origin}/token`, clientIdEnv: 'CLIENT_ID', clientSecretEnv: 'CLIENT_SECRET' } });
    const got = await c.openUrl(`${centre.origin}/fhir/R4/Binary/b2`);
    expect((await drain(got.body)).equals(bytes)).toBe(true);
    expect(got.contentLength).toBeUndefined();
    expect(centre.seen.filter((s) => s.path === '/fhir/R4/Binary/b2').map((s) => s.authorization)).toEqual(['Bearer t1', 'Bearer t2']);
  });

  test('an error answer is a FhirRequestError with the status and the OperationOutcome codes', async () => {
    await expect(client().openUrl('Binary/missing')).rejects.toMatchObject({
      kind: 'http',
      status: 404,
      message: 'GET Binary/…: HTTP 404 (OperationOutcome: not-found)',
    });
  });

  test('a URL outside the base is refused without a request; an allowed storage URL is read without credentials', async () => {
    storage.routes.set('/bucket/r.pdf', (_req, res) => res.writeHead(200, { 'Content-Type': 'application/pdf' }).end(bytes));
    await expect(client().openUrl(`${storage.origin}/bucket/r.pdf`)).rejects.toThrow('URL is not under the destination base');
    await expect(client().openUrl(`${centre.origin}/elsewhere/r.pdf`)).rejects.toThrow('URL is not under the destination base');
    expect(storage.seen).toEqual([]);
    expect(centre.seen).toEqual([]);
    // presignedUrls: the base's host name, another port (as the sandbox's storage server)
    const got = await client({ presignedUrls: true }).openUrl(`${storage.origin}/bucket/r.pdf?Signature=abc`);
    expect((await drain(got.body)).equals(bytes)).toBe(true);
    expect(storage.seen).toEqual([{ path: '/bucket/r.pdf', authorization: undefined, accept: '*/*' }]);
  });

  test('a redirect from under the base is followed only to an allowed place, and without the credentials', async () => {
    centre.routes.set('/fhir/R4/Binary/moved', (_req, res) => res.writeHead(302, { Location: `${storage.origin}/bucket/r.pdf?Signature=abc` }).end());
    storage.routes.set('/bucket/r.pdf', (_req, res) => res.writeHead(200, { 'Content-Type': 'application/pdf' }).end(bytes));
    await expect(client().openUrl('Binary/moved')).rejects.toThrow('URL is not under the destination base');
    expect(storage.seen).toEqual([]);
    const got = await client({ attachmentOrigins: [storage.origin] }).openUrl('Binary/moved');
    expect((await drain(got.body)).equals(bytes)).toBe(true);
    expect(storage.seen).toEqual([{ path: '/bucket/r.pdf', authorization: undefined, accept: '*/*' }]);
  });

  test('the timeout bounds each wait once the headers are in: a slow steady body completes, a stalled one fails', async () => {
    centre.routes.set('/fhir/R4/Binary/steady', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf' });
      let n = 0;
      const tick = setInterval(() => {
        res.write(bytes.subarray(n * 1000, (n + 1) * 1000));
        if (++n === 30) {
          clearInterval(tick);
          res.end();
        }
      }, 50);
    });
    const steady = await client({ timeoutMs: 1_000 }).openUrl('Binary/steady');
    expect((await drain(steady.body)).equals(bytes.subarray(0, 30_000))).toBe(true);

    centre.routes.set('/fhir/R4/Binary/stalled', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf' });
      res.write(bytes.subarray(0, 1000));
    });
    const stalled = await client({ timeoutMs: 300 }).openUrl('Binary/stalled');
    await expect(drain(stalled.body)).rejects.toMatchObject({ kind: 'timeout', message: 'GET Binary/…: no data for 300 ms' });
  });

  test('destroying the body closes the request at the server', async () => {
    let closed: () => void = () => undefined;
    const serverSawClose = new Promise<void>((resolve) => (closed = resolve));
    centre.routes.set('/fhir/R4/Binary/long', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': String(bytes.length * 10) });
      res.write(bytes);
      res.on('close', () => closed());
    });
    const got = await client().openUrl('Binary/long');
    await new Promise((resolve) => got.body.once('readable', resolve));
    got.body.destroy();
    await serverSawClose;
  });

  test('a body cut short of its Content-Length fails the stream (network), never ends it as whole', async () => {
    centre.routes.set('/fhir/R4/Binary/cut', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': String(bytes.length) });
      res.write(bytes.subarray(0, 1000), () => res.destroy());
    });
    const got = await client().openUrl('Binary/cut');
    const err = await drain(got.body).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FhirRequestError);
    expect(err).toMatchObject({ kind: 'network' });
  });
});
