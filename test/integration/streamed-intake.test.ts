// Issue 13: documents that stream in. POST /referrals as multipart/form-data (a referral part, then file parts) and
// PUT /referrals/{id}/documents/{n}/content for documents declared "upload": true. The bytes go to the blob store as
// they arrive; every refusal answers an OperationOutcome and keeps nothing: no referral, no blob, no temporary file.
import { createHash, randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { Readable } from 'node:stream';
import { join } from 'node:path';
import type { Gateway } from '../../src/gateway';
import { serviceDatabases } from '../helpers/db';
import { eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';

const DAY = 24 * 3600_000;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** The sample referral with one document whose bytes come as the file part `scan` (or by upload). */
function referralWith(doc: Record<string, unknown>, externalId = `EXT-${randomBytes(6).toString('hex')}`): Record<string, any> {
  const r = fixture();
  r.externalId = externalId;
  r.documents = [{ kind: 'pathology-report', title: 'Whole-slide image', contentType: 'application/octet-stream', ...doc }];
  delete r.callbackUrl;
  return r;
}

function multipart(referral: unknown, files: Array<{ name: string; bytes: Buffer; type?: string }>, referralLast = false): FormData {
  const form = new FormData();
  const json = (): void => form.append('referral', JSON.stringify(referral));
  if (!referralLast) json();
  for (const f of files) form.append(f.name, new Blob([new Uint8Array(f.bytes)], { type: f.type ?? 'application/octet-stream' }), `${f.name}.bin`);
  if (referralLast) json();
  return form;
}

/** How many referrals the gateway stores. */
async function referralCount(gw: Gateway): Promise<number> {
  const row = await gw.db.kysely
    .selectFrom('referrals')
    .select((e) => e.fn.countAll().as('n'))
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

async function blobFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const fan of readdirSync(dir)) {
    out.push(...readdirSync(join(dir, fan)).map((f) => `${fan}/${f}`));
  }
  return out.sort();
}

describe('streamed documents: multipart POST /referrals and PUT .../content', () => {
  let gw: Gateway;
  let base: string;
  let dir: string;
  const auth = { Authorization: `Bearer ${KEY_A}` };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'rg-streamed-'));
    gw = await startGateway({ BLOB_DIR: dir, MAX_DOCUMENT_BYTES: String(4 * 1024 * 1024), MAX_REFERRAL_DOCUMENT_BYTES: String(6 * 1024 * 1024) });
    base = gw.url;
  });
  afterAll(async () => {
    await gw.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Blob files stored (not counting the temporary directory, which must be empty). */
  const stored = async (): Promise<string[]> => {
    expect(readdirSync(join(dir, 'tmp'))).toEqual([]);
    return (await blobFiles(dir)).filter((f) => !f.startsWith('tmp/'));
  };
  const countReferrals = (): Promise<number> => referralCount(gw);

  test('a multipart referral is stored with its file part in the blob store (hashed on the way) and queued', async () => {
    const bytes = randomBytes(3 * 1024 * 1024 + 17);
    const referral = referralWith({ file: 'scan', sha256: sha256(bytes) });
    const res = await fetch(`${base}/referrals`, { method: 'POST', headers: auth, body: multipart(referral, [{ name: 'scan', bytes }]) });
    expect(res.status).toBe(202);
    const view = (await res.json()) as { id: string; status: string };
    expect(view.status).toBe('queued');
    const full = await gw.service.get('city-hospital', view.id);
    expect(full.payload.documents[0].blob).toEqual({
      sha256: sha256(bytes),
      bytes: bytes.length,
      sha1: createHash('sha1').update(bytes).digest('base64'),
    });
    const back = gw.blobs.open(sha256(bytes));
    const chunks: Buffer[] = [];
    for await (const c of (await back) as AsyncIterable<Buffer>) chunks.push(c);
    expect(Buffer.concat(chunks).equals(bytes)).toBe(true);

    // The same submission again is answered as the original and stores nothing more.
    const again = await fetch(`${base}/referrals`, { method: 'POST', headers: auth, body: multipart(referral, [{ name: 'scan', bytes }]) });
    expect(again.status).toBe(200);
    expect(((await again.json()) as { id: string }).id).toBe(view.id);
  });

  test('refusals keep nothing: digest mismatch 422, over MAX_DOCUMENT_BYTES 413, a part that never comes 422, an unknown part 400', async () => {
    const before = await stored();
    const n = await countReferrals();
    const bytes = randomBytes(256 * 1024);

    const mismatch = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: auth,
      body: multipart(referralWith({ file: 'scan', sha256: sha256(Buffer.from('other')) }), [{ name: 'scan', bytes }]),
    });
    expect(mismatch.status).toBe(422);
    const mm = (await mismatch.json()) as { resourceType: string; issue: Array<{ expression?: string[]; details: { text: string } }> };
    expect(mm.resourceType).toBe('OperationOutcome');
    expect(mm.issue[0].expression).toEqual(['documents[0]']);
    expect(mm.issue[0].details.text).toMatch(/SHA-256/);

    const big = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: auth,
      body: multipart(referralWith({ file: 'scan' }), [{ name: 'scan', bytes: randomBytes(4 * 1024 * 1024 + 1) }]),
    });
    expect(big.status).toBe(413);
    expect(JSON.stringify(await big.json())).toMatch(/MAX_DOCUMENT_BYTES/);

    const missing = await fetch(`${base}/referrals`, { method: 'POST', headers: auth, body: multipart(referralWith({ file: 'scan' }), []) });
    expect(missing.status).toBe(422);
    const ms = (await missing.json()) as { issue: Array<{ expression?: string[]; details: { text: string } }> };
    expect(ms.issue[0].expression).toEqual(['documents[0].file']);
    expect(ms.issue[0].details.text).toMatch(/never came/);

    const unknown = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: auth,
      body: multipart(referralWith({ file: 'scan' }), [
        { name: 'scan', bytes },
        { name: 'other', bytes },
      ]),
    });
    expect(unknown.status).toBe(400);
    expect(JSON.stringify(await unknown.json())).toMatch(/other.{1,4} is named by no document/);

    const late = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: auth,
      body: multipart(referralWith({ file: 'scan' }), [{ name: 'scan', bytes }], true),
    });
    expect(late.status).toBe(400);
    expect(JSON.stringify(await late.json())).toMatch(/must come first/);

    // A JSON referral cannot name a file part.
    const json = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: { ...auth, 'Content-Type': 'application/json' },
      body: JSON.stringify(referralWith({ file: 'scan' })),
    });
    expect(json.status).toBe(422);
    expect(JSON.stringify(await json.json())).toMatch(/multipart\/form-data/);

    expect(await stored()).toEqual(before);
    expect(await countReferrals()).toBe(n);
  });

  test('MAX_REFERRAL_DOCUMENT_BYTES bounds the parts together', async () => {
    const before = await stored();
    const referral = referralWith({ file: 'a' });
    referral.documents.push({ ...referral.documents[0], file: 'b' });
    const res = await fetch(`${base}/referrals`, {
      method: 'POST',
      headers: auth,
      body: multipart(referral, [
        { name: 'a', bytes: randomBytes(3 * 1024 * 1024) },
        { name: 'b', bytes: randomBytes(3 * 1024 * 1024 + 1) },
      ]),
    });
    expect(res.status).toBe(413);
    expect(JSON.stringify(await res.json())).toMatch(/MAX_REFERRAL_DOCUMENT_BYTES/);
    expect(await stored()).toEqual(before);
  });

  test('a client that disconnects mid-upload leaves no blob and no referral', async () => {
    const before = await stored();
    const n = await countReferrals();
    const boundary = 'x-boundary-42';
    const head =
      `--${boundary}\r\nContent-Disposition: form-data; name="referral"\r\n\r\n${JSON.stringify(referralWith({ file: 'scan' }))}\r\n` +
      `--${boundary}\r\nContent-Disposition: form-data; name="scan"; filename="scan.bin"\r\nContent-Type: application/octet-stream\r\n\r\n`;
    await new Promise<void>((resolve) => {
      const req = request(`${base}/referrals`, {
        method: 'POST',
        headers: { ...auth, 'Content-Type': `multipart/form-data; boundary=${boundary}`, 'Content-Length': String(head.length + 3 * 1024 * 1024) },
      });
      req.on('error', () => resolve());
      req.write(head);
      req.write(randomBytes(1024 * 1024), () => setTimeout(() => req.destroy(), 200));
      req.on('close', () => resolve());
    });
    await eventually(async () => readdirSync(join(dir, 'tmp')).length === 0);
    expect(await stored()).toEqual(before);
    expect(await countReferrals()).toBe(n);
  });

  test('upload: true waits in awaiting-documents; PUT checks type and digest, completes the referral, and a resend is idempotent', async () => {
    const bytes = randomBytes(2 * 1024 * 1024 + 3);
    const referral = referralWith({ upload: true, contentType: 'application/dicom', kind: 'imaging-report' });
    const res = await fetch(`${base}/referrals`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(referral) });
    expect(res.status).toBe(202);
    const view = (await res.json()) as { id: string; status: string; uploads: Array<{ document: number; url: string; received: boolean }> };
    expect(view.status).toBe('awaiting-documents');
    expect(view.uploads).toEqual([expect.objectContaining({ document: 1, url: `/referrals/${view.id}/documents/1/content`, received: false })]);
    const url = `${base}${view.uploads[0].url}`;
    const put = (body: Buffer, headers: Record<string, string> = {}): Promise<Response> =>
      fetch(url, { method: 'PUT', headers: { ...auth, 'Content-Type': 'application/dicom', ...headers }, body: new Uint8Array(body) });

    // Another client cannot see it, nor upload to it.
    expect((await fetch(url, { method: 'PUT', headers: { Authorization: `Bearer ${KEY_B}`, 'Content-Type': 'application/dicom' }, body: 'x' })).status).toBe(
      404
    );
    const wrongType = await put(bytes, { 'Content-Type': 'application/pdf' });
    expect(wrongType.status).toBe(415);
    const badDigest = await put(bytes, { 'Repr-Digest': `sha-256=:${createHash('sha256').update('nope').digest('base64')}:` });
    expect(badDigest.status).toBe(422);
    expect(((await badDigest.json()) as { issue: Array<{ expression: string[] }> }).issue[0].expression).toEqual(['documents[0]']);
    expect(readdirSync(join(dir, 'tmp'))).toEqual([]);
    expect(await gw.blobs.stat(sha256(bytes))).toBeUndefined();
    expect(
      (await fetch(`${base}/referrals/${view.id}/documents/2/content`, { method: 'PUT', headers: { ...auth, 'Content-Type': 'application/dicom' }, body: 'x' }))
        .status
    ).toBe(404);

    const ok = await put(bytes, { 'Repr-Digest': `sha-256=:${createHash('sha256').update(bytes).digest('base64')}:` });
    expect(ok.status).toBe(202);
    expect(((await ok.json()) as { status: string }).status).toBe('queued');
    expect(await gw.blobs.stat(sha256(bytes))).toBe(bytes.length);

    const again = await put(bytes);
    expect(again.status).toBe(200);
    const other = await put(randomBytes(10));
    expect(other.status).toBe(409);
    const history = ((await (await fetch(`${base}/referrals/${view.id}`, { headers: auth })).json()) as { history: Array<{ status: string }> }).history;
    expect(history.map((h) => h.status).slice(0, 2)).toEqual(['awaiting-documents', 'queued']);
  });

  test('a referral awaiting documents can be cancelled, and then takes no upload', async () => {
    const referral = referralWith({ upload: true });
    const view = (await (
      await fetch(`${base}/referrals`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(referral) })
    ).json()) as { id: string };
    const cancelled = await fetch(`${base}/referrals/${view.id}/cancel`, {
      method: 'POST',
      headers: { ...auth, 'Content-Type': 'application/json' },
      body: JSON.stringify({ reason: 'sent to another centre' }),
    });
    expect(cancelled.status).toBe(202);
    expect(((await cancelled.json()) as { status: string }).status).toBe('cancelled');
    const put = await fetch(`${base}/referrals/${view.id}/documents/1/content`, {
      method: 'PUT',
      headers: { ...auth, 'Content-Type': 'application/octet-stream' },
      body: 'late bytes',
    });
    expect(put.status).toBe(409);
    expect(JSON.stringify(await put.json())).toMatch(/cancelled/);
  });
});

describe('the upload deadline', () => {
  test('a referral whose uploads do not all arrive in time becomes expired, with the reason', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'rg-deadline-'));
    const gw = await startGateway({ BLOB_DIR: dir, UPLOAD_DEADLINE_HOURS: String(1 / 3600) }); // one second
    try {
      const res = await fetch(`${gw.url}/referrals`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(referralWith({ upload: true })),
      });
      const { id } = (await res.json()) as { id: string };
      const expired = await eventually(async () => {
        const r = await gw.service.get('city-hospital', id, { payload: false });
        return r.status === 'expired' ? r : undefined;
      }, 10_000);
      expect(expired.statusReason).toMatch(/UPLOAD_DEADLINE_HOURS/);
    } finally {
      await gw.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('a full blob store', () => {
  const mnt = join(tmpdir(), `rg-full-${process.pid}`);
  let gw: Gateway | undefined;

  beforeAll(() => {
    mkdirSync(mnt, { recursive: true });
    const args = ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mnt];
    try {
      execFileSync('mount', args, { stdio: 'pipe' });
    } catch {
      execFileSync('sudo', ['-n', 'mount', ...args], { stdio: 'pipe' }); // CI runs as root or with sudo (.ci/run)
    }
  });
  afterAll(async () => {
    await gw?.stop();
    try {
      execFileSync('umount', [mnt], { stdio: 'pipe' });
    } catch {
      execFileSync('sudo', ['-n', 'umount', mnt], { stdio: 'pipe' });
    }
    rmSync(mnt, { recursive: true, force: true });
  });

  test('a document that does not fit is answered 507 and nothing of it stays', async () => {
    gw = await startGateway({ BLOB_DIR: mnt });
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}` },
      body: multipart(referralWith({ file: 'scan' }), [{ name: 'scan', bytes: randomBytes(3 * 1024 * 1024) }]),
    });
    expect(res.status).toBe(507);
    const body = (await res.json()) as { resourceType: string; issue: Array<{ details: { text: string } }> };
    expect(body.resourceType).toBe('OperationOutcome');
    expect(body.issue[0].details.text).toMatch(/full/);
    expect(readdirSync(join(mnt, 'tmp'))).toEqual([]);
    expect(await referralCount(gw)).toBe(0);
    // Room again: the same request succeeds.
    const small = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}` },
      body: multipart(referralWith({ file: 'scan' }), [{ name: 'scan', bytes: randomBytes(512 * 1024) }]),
    });
    expect(small.status).toBe(202);
  });
});

describe.each(serviceDatabases())('retention of streamed documents, stored on %s', (name, database) => {
  test('a closed referral loses its blob with its document bytes; a blob no referral names is collected once old', async () => {
    const db = await database();
    const dir = mkdtempSync(join(tmpdir(), 'rg-blob-retention-'));
    const gw = await startGateway({ DATABASE_URL: db.url, BLOB_DIR: dir, DOCUMENT_RETENTION_DAYS: '30', REFERRAL_RETENTION_DAYS: '365' });
    try {
      expect(gw.blobs.kind).toBe(name === 'postgres' ? 'postgres' : 'fs');
      const auth = { Authorization: `Bearer ${KEY_A}` };
      const kept = randomBytes(300 * 1024);
      const referral = referralWith({ upload: true });
      referral.documents.push({ ...referral.documents[0] });
      const { id } = (await (
        await fetch(`${gw.url}/referrals`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(referral) })
      ).json()) as { id: string };
      const put = await fetch(`${gw.url}/referrals/${id}/documents/1/content`, {
        method: 'PUT',
        headers: { ...auth, 'Content-Type': 'application/octet-stream' },
        body: new Uint8Array(kept),
      });
      expect(put.status).toBe(202);
      expect(((await put.json()) as { status: string }).status).toBe('awaiting-documents');
      const cancel = await fetch(`${gw.url}/referrals/${id}/cancel`, {
        method: 'POST',
        headers: { ...auth, 'Content-Type': 'application/json' },
        body: JSON.stringify({ reason: 'the patient withdrew' }),
      });
      expect(((await cancel.json()) as { status: string }).status).toBe('cancelled');
      // A blob no referral names (a crash between the bytes and the referral): collected, but only once older than an hour.
      const stray = await gw.blobs.put(Readable.from([randomBytes(1000)]), { maxBytes: 10_000 });

      const soon = await gw.retention.run(new Date(Date.now() + 10 * 60_000));
      expect(soon).toMatchObject({ referralsStripped: 0, blobsDeleted: 0 });
      expect(await gw.blobs.stat(stray.sha256)).toBe(1000);

      const month = await gw.retention.run(new Date(Date.now() + 31 * DAY));
      expect(month).toMatchObject({ referralsStripped: 1, documentsStripped: 1, blobsDeleted: 2 });
      expect(await gw.blobs.stat(sha256(kept))).toBeUndefined();
      expect(await gw.blobs.stat(stray.sha256)).toBeUndefined();
      const doc = (await gw.service.get('city-hospital', id)).payload.documents[0];
      expect(doc.blob).toBeUndefined();
      expect(doc).toMatchObject({ dataRemoved: { bytes: kept.length, sha256: sha256(kept) } });
    } finally {
      await gw.stop();
      await db.drop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('documents added to a sent referral', () => {
  test('cannot be streamed (file or upload): 422 naming the field', async () => {
    const gw = await startGateway();
    try {
      const auth = { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' };
      const { id } = (await (
        await fetch(`${gw.url}/referrals`, { method: 'POST', headers: auth, body: JSON.stringify(referralWith({ data: 'AAAA' })) })
      ).json()) as {
        id: string;
      };
      const res = await fetch(`${gw.url}/referrals/${id}/documents`, {
        method: 'POST',
        headers: auth,
        body: JSON.stringify({ documents: [{ kind: 'other', title: 'Late scan', contentType: 'application/dicom', upload: true }] }),
      });
      expect(res.status).toBe(422);
      expect(((await res.json()) as { issue: Array<{ expression: string[] }> }).issue[0].expression).toEqual(['documents[0].upload']);
    } finally {
      await gw.stop();
    }
  });
});
