import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { DocumentReference } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { startSandboxServer, type SandboxServer } from '../../src/sandbox/server';
import { changeStatus, getReferral } from '../../src/store';
import { type Centre, startCentre } from '../helpers/report-centre';
import { writeDestinationsFile } from '../helpers/destinations';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * Issue 13 point 5: the opinion report comes back the way documents go, as a stream. GET
 * /referrals/{id}/report/content reads it from the centre as it arrives (a raw Binary, a presigned storage URL,
 * inline data) and hands it on without holding it: the client's first bytes come before the centre has sent the
 * last, a client that leaves stops the read at the centre, and a centre that breaks off mid-report gives the
 * client a broken transfer, never a complete-looking 200.
 */

/** The destination's bearer token (auth `bearer`, tokenEnv). */
const TOKEN_ENV = 'RG_TEST_REPORT_TOKEN';
const TOKEN = 'centre-token-0001';
const auth = { type: 'bearer', tokenEnv: TOKEN_ENV };

function pdf(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  Buffer.from('%PDF-1.4\n').copy(b);
  for (let i = 9; i < bytes; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

interface Env {
  gw: Gateway;
  sandbox: SandboxServer;
  dir: string;
  centre?: Centre;
}

async function setUp(
  traits: string,
  destination: (sandbox: SandboxServer, centre?: Centre) => Record<string, unknown> & { baseUrl: string },
  withCentre: boolean
): Promise<Env> {
  process.env[TOKEN_ENV] = TOKEN;
  const sandbox = await startSandboxServer(0, { profile: 'default', traits });
  const centre = withCentre ? await startCentre(sandbox) : undefined;
  const dir = mkdtempSync(join(tmpdir(), 'rg-report-'));
  const file = writeDestinationsFile(dir, destination(sandbox, centre));
  const gw = await startGateway({ DESTINATIONS_FILE: file, DELIVERY_BASE_DELAY_MS: '30', DELIVERY_MAX_DELAY_MS: '200', [TOKEN_ENV]: TOKEN });
  return { gw, sandbox, dir, centre };
}

async function tearDown(e: Env | undefined): Promise<void> {
  if (!e) return;
  await e.gw.stop();
  await e.centre?.close();
  await e.sandbox.close();
  rmSync(e.dir, { recursive: true, force: true });
}

/** A DocumentReference at the centre with the report's attachment (posted straight to the sandbox). */
async function postOpinion(sandbox: SandboxServer, attachment: Record<string, unknown>): Promise<string> {
  const res = await fetch(`${sandbox.url}/DocumentReference`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/fhir+json' },
    body: JSON.stringify({
      resourceType: 'DocumentReference',
      status: 'current',
      type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
      content: [{ attachment }],
    }),
  });
  expect(res.status).toBe(201);
  return ((await res.json()) as DocumentReference).id as string;
}

/** A raw Binary uploaded at the centre (its own content type, the bytes as the body). */
async function postBinary(sandbox: SandboxServer, contentType: string, bytes: Buffer): Promise<string> {
  const res = await fetch(`${sandbox.url}/Binary`, { method: 'POST', headers: { 'Content-Type': contentType }, body: bytes });
  expect(res.status).toBe(201);
  return ((await res.json()) as { id: string }).id;
}

/** A referral submitted, delivered, and then completed with the given DocumentReference as its report (as the tracker records it). */
async function completedWith(gw: Gateway, externalId: string, documentReferenceId: string, contentType: string): Promise<string> {
  const res = await fetch(`${gw.url}/referrals`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...fixture(), externalId }),
  });
  expect(res.status).toBe(202);
  const id = ((await res.json()) as { id: string }).id;
  await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent', 20_000);
  await changeStatus(gw.db, id, {
    status: 'completed',
    report: { reference: `DocumentReference/${documentReferenceId}`, url: `/referrals/${id}/report/content`, contentType },
  });
  return id;
}

const getReport = (gw: Gateway, id: string, signal?: AbortSignal): Promise<Response> =>
  fetch(`${gw.url}/referrals/${id}/report/content`, { headers: { Authorization: `Bearer ${KEY_A}` }, signal });

/** Reads from `reader` until at least `n` bytes have come. */
async function readAtLeast(reader: ReadableStreamDefaultReader<Uint8Array>, n: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  while (total < n) {
    const next = await reader.read();
    if (next.done) break;
    chunks.push(Buffer.from(next.value));
    total += next.value.byteLength;
  }
  return Buffer.concat(chunks);
}

describe('the report streamed from a centre (a raw Binary, its own attachment host, inline data)', () => {
  let e: Env;
  beforeAll(async () => {
    e = await setUp('', (_sandbox, centre) => ({ baseUrl: centre?.base as string, auth }), true);
  });
  afterAll(() => tearDown(e));

  test('a report uploaded as a raw Binary comes back byte-identical, with its type, length and the safe headers', async () => {
    const report = pdf(3 * 1024 * 1024 + 17, 1);
    const binary = await postBinary(e.sandbox, 'application/pdf', report);
    const id = await completedWith(
      e.gw,
      'REPORT-RAW-1',
      await postOpinion(e.sandbox, { contentType: 'application/pdf', url: `Binary/${binary}` }),
      'application/pdf'
    );
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/pdf');
    expect(res.headers.get('content-length')).toBe(String(report.length));
    expect(res.headers.get('content-disposition')).toBe(`inline; filename="report-${id}.pdf"`);
    expect(res.headers.get('x-content-type-options')).toBe('nosniff');
    expect(Buffer.from(await res.arrayBuffer()).equals(report)).toBe(true);
    // HEAD: the same headers, no body (the read at the centre stops at the first bytes).
    const head = await fetch(`${e.gw.url}/referrals/${id}/report/content`, { method: 'HEAD', headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(head.status).toBe(200);
    expect(head.headers.get('content-length')).toBe(String(report.length));
    expect((await head.arrayBuffer()).byteLength).toBe(0);
  });

  test('an inline report (attachment data) comes back byte-identical with its length', async () => {
    const report = Buffer.from('Board opinion: surgery first.\nΩ ✓\n');
    const id = await completedWith(
      e.gw,
      'REPORT-INLINE-1',
      await postOpinion(e.sandbox, { contentType: 'text/plain', data: report.toString('base64') }),
      'text/plain'
    );
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/plain; charset=utf-8');
    expect(res.headers.get('content-length')).toBe(String(report.length));
    expect(Buffer.from(await res.arrayBuffer()).equals(report)).toBe(true);
  });

  test('a server that answers the URL with the Binary resource as FHIR JSON: its data is decoded', async () => {
    const report = pdf(40_000, 2);
    e.centre?.files.set('as-json', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/fhir+json' });
      res.end(JSON.stringify({ resourceType: 'Binary', id: 'x', contentType: 'application/pdf', data: report.toString('base64') }));
    });
    const id = await completedWith(
      e.gw,
      'REPORT-JSON-1',
      await postOpinion(e.sandbox, { contentType: 'application/pdf', url: 'files/as-json' }),
      'application/pdf'
    );
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/pdf');
    expect(Buffer.from(await res.arrayBuffer()).equals(report)).toBe(true);
  });

  test("streamed: the client's first bytes come before the centre has sent the rest; then the whole report, byte-identical", async () => {
    const report = pdf(1024 * 1024, 3);
    const half = 512 * 1024;
    const released = deferred();
    let sentAll = false;
    let authorization: string | undefined;
    e.centre?.files.set('slow', (req, res) => {
      authorization = req.headers.authorization;
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': String(report.length) });
      res.write(report.subarray(0, half));
      void released.promise.then(() => {
        sentAll = true;
        res.end(report.subarray(half));
      });
    });
    const id = await completedWith(
      e.gw,
      'REPORT-STREAM-1',
      await postOpinion(e.sandbox, { contentType: 'application/pdf', url: 'files/slow' }),
      'application/pdf'
    );
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-length')).toBe(String(report.length));
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    const first = await readAtLeast(reader, 1);
    expect(first.length).toBeGreaterThan(0);
    expect(sentAll).toBe(false); // the centre still holds the second half back
    released.resolve();
    const rest = await readAtLeast(reader, report.length - first.length);
    expect((await reader.read()).done).toBe(true);
    expect(Buffer.concat([first, rest]).equals(report)).toBe(true);
    expect(authorization).toBe(`Bearer ${TOKEN}`); // under the destination's base: the gateway's credentials
  });

  test('a client that goes away mid-report: the read at the centre is closed', async () => {
    const report = pdf(1024 * 1024, 4);
    const upstreamClosed = deferred();
    let finished = false;
    e.centre?.files.set('abandoned', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': String(report.length) });
      res.write(report.subarray(0, 256 * 1024));
      res.on('finish', () => (finished = true));
      res.on('close', () => upstreamClosed.resolve());
    });
    const id = await completedWith(
      e.gw,
      'REPORT-ABORT-1',
      await postOpinion(e.sandbox, { contentType: 'application/pdf', url: 'files/abandoned' }),
      'application/pdf'
    );
    const client = new AbortController();
    const res = await getReport(e.gw, id, client.signal);
    expect(res.status).toBe(200);
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    await readAtLeast(reader, 1);
    client.abort();
    await upstreamClosed.promise; // the gateway closed its request to the centre
    expect(finished).toBe(false);
  });

  test.each([
    ['with a Content-Length', true],
    ['chunked', false],
  ])('a centre that breaks off mid-report (%s): the client sees a broken transfer, not a whole 200', async (_name, withLength) => {
    const report = pdf(1024 * 1024, 5);
    const cut = deferred();
    const file = `broken-${withLength ? 'length' : 'chunked'}`;
    e.centre?.files.set(file, (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', ...(withLength ? { 'Content-Length': String(report.length) } : {}) });
      res.write(report.subarray(0, 256 * 1024));
      void cut.promise.then(() => res.destroy());
    });
    const id = await completedWith(
      e.gw,
      `REPORT-BROKEN-${withLength ? 1 : 2}`,
      await postOpinion(e.sandbox, { contentType: 'application/pdf', url: `files/${file}` }),
      'application/pdf'
    );
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    await readAtLeast(reader, 1);
    cut.resolve();
    await expect(readAtLeast(reader, report.length)).rejects.toThrow();
  });

  test('failures before the first byte answer an OperationOutcome: 502 for a centre that answers 404 or sends headers then nothing', async () => {
    e.centre?.files.set('headers-only', (_req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/pdf', 'Content-Length': '1000' });
      res.flushHeaders();
      setImmediate(() => res.destroy());
    });
    for (const [n, url] of [
      [1, 'files/missing'],
      [2, 'files/headers-only'],
    ] as const) {
      const id = await completedWith(e.gw, `REPORT-FAIL-${n}`, await postOpinion(e.sandbox, { contentType: 'application/pdf', url }), 'application/pdf');
      const res = await getReport(e.gw, id);
      expect(res.status).toBe(502);
      expect(res.headers.get('content-type')).toMatch(/^application\/fhir\+json/);
      const outcome = (await res.json()) as { resourceType: string; issue: Array<{ diagnostics?: string; details?: { text?: string } }> };
      expect(outcome.resourceType).toBe('OperationOutcome');
      expect(JSON.stringify(outcome.issue)).toMatch(/report content could not be fetched/);
    }
  });
});

describe('the report at a server that answers attachment URLs as presigned storage URLs (Medplum)', () => {
  let e: Env;
  beforeAll(async () => {
    e = await setUp('presignedBinaryUrls', (sandbox) => ({ baseUrl: sandbox.url, presignedUrls: true, auth }), false);
  });
  afterAll(() => tearDown(e));

  test('read from the storage URL the server gave, without the FHIR credentials (storage refuses them), byte-identical', async () => {
    const report = pdf(2 * 1024 * 1024 + 5, 6);
    const binary = await postBinary(e.sandbox, 'application/pdf', report);
    const opinion = await postOpinion(e.sandbox, { contentType: 'application/pdf', url: `Binary/${binary}` });
    // The server shows the attachment as a presigned URL on its storage host.
    const shown = (await (await fetch(`${e.sandbox.url}/DocumentReference/${opinion}`)).json()) as DocumentReference;
    expect(shown.content[0].attachment.url?.startsWith(`${e.sandbox.storageUrl}/storage/`)).toBe(true);
    const id = await completedWith(e.gw, 'REPORT-PRESIGNED-1', opinion, 'application/pdf');
    const res = await getReport(e.gw, id);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/pdf');
    expect(res.headers.get('content-length')).toBe(String(report.length));
    expect(Buffer.from(await res.arrayBuffer()).equals(report)).toBe(true);
  });
});

describe('memory', () => {
  test('a 64 MiB report passes through the gateway without being held: live memory grows by well under its size', async () => {
    // In a process of its own (test/helpers/report-memory.ts), so the memory measured is this transfer's alone.
    const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--import', 'tsx', 'test/helpers/report-memory.ts', '64'], {
      env: process.env,
      maxBuffer: 1024 * 1024,
    });
    const r = JSON.parse(stdout) as { status: number; contentLength: string; bytes: number; sha256: string; expected: string; peakGrowth: number };
    expect(r).toMatchObject({ status: 200, contentLength: String(64 * 1024 * 1024), bytes: 64 * 1024 * 1024, sha256: r.expected });
    // Streamed: a few chunks in flight (measured 2-18 MB); held whole it would be at least the report's 64 MiB (282 MB for 128 MiB).
    expect(r.peakGrowth).toBeLessThan(32 * 1024 * 1024);
  }, 60_000);
});
