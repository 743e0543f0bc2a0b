// Issue 13, end to end at full size: a 1 GiB document through each streamed path (multipart POST, PUT .../content)
// reaches the centre byte-identical, with the gateway's peak memory read from its own process; and a gateway killed
// (SIGKILL) in the middle of an upload loses nothing and keeps nothing half-written. The gateway and the sandbox FHIR
// server run as processes of their own, as in production.
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'undici';
import { documentStream, multipartStream, resetPeak, rssOf } from '../helpers/document-bytes';
import { fixture } from '../helpers/gateway';
import { freePort, spawnTs, startSandboxProcess, waitForHealth } from '../helpers/processes';

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;
const KEY = 'key-large-documents-0001';
const auth = { authorization: `Bearer ${KEY}` };
/** The gateway's peak resident memory may grow by at most this while it streams a 1 GiB document in and out. */
const MAX_GROWTH = 96 * MIB;

jest.setTimeout(300_000);

/**
 * Where the gigabytes go: a RAM-backed /dev/shm when it has room (the test writes about 3 GiB; on a disk, that much
 * dirty data would slow every fsync of the suites that run next), else the system's temporary directory.
 */
function roomyTmp(): string {
  try {
    const fs = statfsSync('/dev/shm');
    if (fs.bavail * fs.bsize > 6 * GIB) return '/dev/shm';
  } catch {
    // no /dev/shm here
  }
  return tmpdir();
}

function referralWith(doc: Record<string, unknown>): Record<string, any> {
  const r = fixture();
  r.externalId = `BIG-${randomBytes(6).toString('hex')}`;
  r.documents = [{ kind: 'imaging-study', title: 'CT chest, abdomen, pelvis', contentType: 'application/dicom', ...doc }];
  delete r.callbackUrl;
  return r;
}

describe('1 GiB documents through the gateway, in processes of their own', () => {
  let dir: string;
  let centre: { child: ChildProcess; url: string };
  let gateway: ChildProcess;
  let api: string;
  let stderr = '';

  const startGateway = async (): Promise<void> => {
    const port = await freePort();
    api = `http://127.0.0.1:${port}`;
    stderr = '';
    gateway = spawnTs('src/index.ts', {
      NODE_ENV: 'test',
      PORT: String(port),
      HOST: '127.0.0.1',
      DATABASE_URL: `sqlite:${join(dir, 'gateway.db')}`,
      BLOB_DIR: join(dir, 'blobs'),
      API_KEYS: `city-hospital:${KEY}`,
      LOG_LEVEL: 'warn',
      HL7_MLLP_PORT: '0',
      DESTINATIONS_FILE: join(dir, 'none.json'),
      FHIR_BASE_URL: centre.url,
      FHIR_TIMEOUT_MS: '120000',
      DELIVERY_BASE_DELAY_MS: '100',
    });
    gateway.stdout?.resume();
    gateway.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitForHealth(gateway, api, 30_000, () => stderr);
  };
  /** Whether the gateway process is still running (one killed by a signal has a signalCode and no exitCode). */
  const running = (): boolean => gateway.exitCode === null && gateway.signalCode === null;
  const stopGateway = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> => {
    if (!running()) return;
    const exited = new Promise((r) => gateway.once('exit', r));
    gateway.kill(signal);
    await exited;
  };

  const view = async (id: string): Promise<any> => (await request(`${api}/referrals/${id}`, { headers: auth })).body.json();
  const until = async (id: string, status: string, timeoutMs = 240_000): Promise<any> => {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const v = await view(id);
      if (v.status === status) return v;
      if (v.status === 'delivery-failed' || Date.now() > end) throw new Error(`referral ${id} is ${v.status}: ${v.delivery?.lastError ?? ''}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  /**
   * The document the centre holds for a delivered referral: the SHA-256 and size the sandbox computed as the bytes
   * arrived (GET /_sandbox/binaries/<id>), how many versions that Binary has, and how many Binaries it received whole.
   */
  const atCentre = async (delivered: any): Promise<{ sha256: string; bytes: number; versions: number; contentType: string }> => {
    const docRef = (await (await fetch(`${centre.url}/${delivered.fhir.documents[0]}`)).json()) as { content: Array<{ attachment: { url: string } }> };
    const binaryId = docRef.content[0].attachment.url.split('/')[1];
    const digest = (await (await fetch(`${new URL(centre.url).origin}/_sandbox/binaries/${binaryId}`)).json()) as {
      sha256: string;
      bytes: number;
      versions: number;
      contentType: string;
    };
    return { sha256: digest.sha256, bytes: digest.bytes, versions: digest.versions, contentType: digest.contentType };
  };
  const receivedWhole = async (): Promise<number> =>
    ((await (await fetch(`${new URL(centre.url).origin}/_sandbox/binaries`)).json()) as { received: number }).received;

  beforeAll(async () => {
    dir = mkdtempSync(join(roomyTmp(), 'rg-large-'));
    // The sandbox keeps the Binaries it receives under its TMPDIR: here, beside the gateway's blobs.
    mkdirSync(join(dir, 'centre'));
    centre = await startSandboxProcess({ TMPDIR: join(dir, 'centre') });
    await startGateway();
    // Every path once with a small document, so that idle memory includes the code they load.
    const small = documentStream(MIB);
    const r = await request(`${api}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'multipart/form-data; boundary=warm' },
      body: multipartStream('warm', referralWith({ file: 'scan' }), [{ name: 'scan', type: 'application/dicom', stream: small.stream }]),
    });
    await until(((await r.body.json()) as { id: string }).id, 'sent');
  });
  afterAll(async () => {
    await stopGateway();
    centre.child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  });

  test('multipart POST of 1 GiB: stored, delivered byte-identical, the gateway never holds it', async () => {
    const pid = gateway.pid as number;
    const idle = rssOf(pid).rss;
    resetPeak(pid);
    const doc = documentStream(GIB);
    const res = await request(`${api}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'multipart/form-data; boundary=big-boundary-1' },
      body: multipartStream('big-boundary-1', referralWith({ file: 'scan' }), [{ name: 'scan', type: 'application/dicom', stream: doc.stream }]),
    });
    const accepted = (await res.body.json()) as { id: string; status: string };
    expect(res.statusCode).toBe(202);
    const delivered = await until(accepted.id, 'sent');
    const growth = rssOf(pid).peak - idle;
    expect(await atCentre(delivered)).toEqual({ sha256: doc.digest(), bytes: GIB, versions: 1, contentType: 'application/dicom' });
    expect(growth).toBeLessThan(MAX_GROWTH);
  });

  test('PUT .../content of 1 GiB: the referral waits, then is delivered byte-identical, the gateway never holds it', async () => {
    const created = await request(`${api}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify(referralWith({ upload: true })),
    });
    const awaiting = (await created.body.json()) as { id: string; status: string; uploads: Array<{ url: string }> };
    expect(awaiting.status).toBe('awaiting-documents');
    const pid = gateway.pid as number;
    const idle = rssOf(pid).rss;
    resetPeak(pid);
    const doc = documentStream(GIB);
    const put = await request(`${api}${awaiting.uploads[0].url}`, {
      method: 'PUT',
      headers: { ...auth, 'content-type': 'application/dicom', 'content-length': String(GIB) },
      body: doc.stream,
    });
    expect(put.statusCode).toBe(202);
    await put.body.dump();
    const delivered = await until(awaiting.id, 'sent');
    const growth = rssOf(pid).peak - idle;
    expect(await atCentre(delivered)).toEqual({ sha256: doc.digest(), bytes: GIB, versions: 1, contentType: 'application/dicom' });
    expect(growth).toBeLessThan(MAX_GROWTH);
  });

  test('SIGKILL in the middle of an upload: after a restart nothing half-written is kept, the referral still waits, and the resent upload is delivered once', async () => {
    const created = await request(`${api}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: JSON.stringify(referralWith({ upload: true })),
    });
    const awaiting = (await created.body.json()) as { id: string; uploads: Array<{ url: string }> };
    const size = 256 * MIB;
    const seed = randomBytes(MIB);
    const first = documentStream(size, seed);
    let sent = 0;
    first.stream.on('data', (c: Buffer) => {
      sent += c.length;
      if (sent >= 64 * MIB && running() && !gateway.killed) gateway.kill('SIGKILL');
    });
    await request(`${api}${awaiting.uploads[0].url}`, {
      method: 'PUT',
      headers: { ...auth, 'content-type': 'application/dicom', 'content-length': String(size) },
      body: first.stream,
    }).then(
      () => undefined,
      () => undefined // the connection dies with the gateway
    );
    await new Promise((r) => (running() ? gateway.once('exit', r) : r(undefined)));
    expect(gateway.signalCode).toBe('SIGKILL');

    await startGateway();
    expect(readdirSync(join(dir, 'blobs', 'tmp'))).toEqual([]);
    const after = await view(awaiting.id);
    expect(after.status).toBe('awaiting-documents');
    expect(after.uploads[0].received).toBe(false);

    const again = documentStream(size, seed);
    const before = await receivedWhole();
    const put = await request(`${api}${awaiting.uploads[0].url}`, {
      method: 'PUT',
      headers: { ...auth, 'content-type': 'application/dicom', 'content-length': String(size) },
      body: again.stream,
    });
    expect(put.statusCode).toBe(202);
    await put.body.dump();
    const delivered = await until(awaiting.id, 'sent');
    expect(delivered.fhir.documents).toHaveLength(1);
    // One Binary, uploaded once: the centre never saw the cut-off upload (the gateway had not stored it).
    expect(await atCentre(delivered)).toEqual({ sha256: again.digest(), bytes: size, versions: 1, contentType: 'application/dicom' });
    expect((await receivedWhole()) - before).toBe(1);
  });
});
