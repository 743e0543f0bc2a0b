import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Binary } from '@medplum/fhirtypes';
import { startSandboxServer } from '../../src/sandbox/server';

/**
 * Raw Binary uploads at the sandbox: received as a stream and hashed as they arrive, kept in a temporary file past
 * 1 MiB (the sandbox runs in the gateway's own process by default: a large Binary must not sit in its heap), served
 * back as a stream, and asked for by tests as the server computed them (SHA-256, size).
 */
describe('the sandbox receives raw Binaries as streams', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let parent: string;

  const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
  const bytes = (n: number, seed: number): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) % 251));
  /** The sandbox's own temporary directory (made on its first large upload), and what is in it. */
  const files = (): string[] => readdirSync(parent).flatMap((d) => readdirSync(join(parent, d)));

  beforeAll(async () => {
    parent = mkdtempSync(join(tmpdir(), 'rg-sandbox-binaries-test-'));
    sandbox = await startSandboxServer(0, { binaries: { tempDir: parent } });
  });
  afterAll(async () => {
    await sandbox.close();
    rmSync(parent, { recursive: true, force: true });
  });

  async function put(id: string, body: Buffer, contentType = 'application/dicom'): Promise<Response> {
    return fetch(`${sandbox.url}/Binary/${id}`, { method: 'PUT', headers: { 'Content-Type': contentType }, body: new Uint8Array(body) });
  }

  test('a large upload goes to a file; the server hashes it; GET streams the same bytes back; a JSON read carries them as base64', async () => {
    const before = sandbox.binaryUploads();
    const body = bytes(5 * 1024 * 1024 + 3, 1);
    expect((await put('big-1', body)).status).toBe(201);
    expect(await sandbox.binary('big-1')).toEqual({
      id: 'big-1',
      versionId: expect.any(String),
      versions: 1,
      contentType: 'application/dicom',
      bytes: body.length,
      sha256: sha256(body),
    });
    const after = sandbox.binaryUploads();
    expect(after).toMatchObject({ receiving: 0, received: before.received + 1, inFiles: before.inFiles + 1 });
    expect(files()).toHaveLength(after.inFiles);

    const raw = await fetch(`${sandbox.url}/Binary/big-1`, { headers: { Accept: 'application/dicom' } });
    expect(raw.headers.get('content-length')).toBe(String(body.length));
    expect(Buffer.from(await raw.arrayBuffer()).equals(body)).toBe(true);
    const json = (await (await fetch(`${sandbox.url}/Binary/big-1`, { headers: { Accept: 'application/fhir+json' } })).json()) as Binary;
    expect(Buffer.from(json.data ?? '', 'base64').equals(body)).toBe(true);
    // Also over HTTP, for tests of a sandbox in another process.
    expect(await (await fetch(`${new URL(sandbox.url).origin}/_sandbox/binaries/big-1`)).json()).toMatchObject({ sha256: sha256(body), bytes: body.length });
    expect((await fetch(`${new URL(sandbox.url).origin}/_sandbox/binaries/nope`)).status).toBe(404);
  });

  test('a small upload stays in memory; a second PUT to the same id is a second version', async () => {
    const before = sandbox.binaryUploads();
    const first = await put('small-1', bytes(1000, 2), 'application/pdf');
    expect(first.status).toBe(201);
    const version = /W\/"([^"]+)"/.exec(first.headers.get('etag') ?? '')?.[1];
    expect((await put('small-1', bytes(2000, 3), 'application/pdf')).status).toBe(200);
    expect(sandbox.binaryUploads().inFiles).toBe(before.inFiles);
    expect(await sandbox.binary('small-1')).toMatchObject({ versions: 2, bytes: 2000, sha256: sha256(bytes(2000, 3)) });
    expect(await sandbox.binary('small-1', version)).toMatchObject({ bytes: 1000, sha256: sha256(bytes(1000, 2)) });
  });

  test('an upload cut off in the middle leaves nothing: no Binary, no file', async () => {
    const before = sandbox.binaryUploads();
    const filesBefore = files().length;
    const url = new URL(`${sandbox.url}/Binary/cut-1`);
    await new Promise<void>((resolve) => {
      const req = request(url, { method: 'PUT', headers: { 'Content-Type': 'application/dicom', 'Content-Length': String(8 * 1024 * 1024) } });
      req.on('error', () => resolve());
      req.write(bytes(3 * 1024 * 1024, 4));
      const watch = setInterval(() => {
        if (sandbox.binaryUploads().receivingBytes > 2 * 1024 * 1024) {
          clearInterval(watch);
          req.destroy();
          resolve();
        }
      }, 5);
    });
    for (let i = 0; i < 100 && sandbox.binaryUploads().receiving > 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(sandbox.binaryUploads()).toMatchObject({ receiving: 0, received: before.received, aborted: before.aborted + 1, stored: before.stored });
    expect(files()).toHaveLength(filesBefore);
    expect(await sandbox.binary('cut-1')).toBeUndefined();
  });

  test('an upload whose write is refused (a stale If-Match) is not kept', async () => {
    expect((await put('refused-1', bytes(10, 5))).status).toBe(201);
    const filesBefore = files().length;
    const res = await fetch(`${sandbox.url}/Binary/refused-1`, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/dicom', 'If-Match': 'W/"99"' },
      body: new Uint8Array(bytes(2 * 1024 * 1024, 6)),
    });
    expect(res.status).toBe(412);
    expect(files()).toHaveLength(filesBefore);
    expect(await sandbox.binary('refused-1')).toMatchObject({ versions: 1, bytes: 10 });
  });

  test('closing the sandbox removes its temporary directory', async () => {
    const own = mkdtempSync(join(tmpdir(), 'rg-sandbox-binaries-close-'));
    const other = await startSandboxServer(0, { binaries: { tempDir: own } });
    await fetch(`${other.url}/Binary/x`, { method: 'PUT', headers: { 'Content-Type': 'application/dicom' }, body: new Uint8Array(bytes(2 * 1024 * 1024, 7)) });
    const dirs = readdirSync(own);
    expect(dirs).toHaveLength(1);
    await other.close();
    expect(existsSync(join(own, dirs[0]))).toBe(false);
    rmSync(own, { recursive: true, force: true });
  });
});
