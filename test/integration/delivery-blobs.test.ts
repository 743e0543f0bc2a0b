import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Binary, Bundle, DocumentReference } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { startSandboxServer } from '../../src/sandbox/server';
import { binaryUploadsOf, deliveryQueue, getReferral, leasedQueue, possiblyOrphanedUploads } from '../../src/store';
import { addBlobDocuments, type BlobReferral, createBlobReferral, type GeneratedDocument, generatedBytes, sha256 } from '../helpers/blob-referrals';
import { writeDestinationsFile } from '../helpers/destinations';
import { eventually, startGateway } from '../helpers/gateway';
import { type LossyProxy, startLossyProxy } from '../helpers/lossy-proxy';

/**
 * Documents whose bytes are in the blob store (streamed at intake: `blob`, no `data`) reach the centre without the
 * gateway ever holding them: as a raw Binary streamed from the store, or as base64 streamed into the transaction.
 * The centre is the sandbox, which hashes what it receives: the tests compare its SHA-256 with the blob's.
 */
jest.setTimeout(60_000);

const MAX_INLINE = 64 * 1024;
/** Larger than the inline limit, and not a multiple of 3 (the base64 of the stream must still be the base64 of the whole). */
const LARGE: GeneratedDocument = { bytes: 3 * 1024 * 1024 + 1, seed: 1, contentType: 'application/dicom' };

describe('documents in the blob store delivered to a FHIR server', () => {
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;
  let gw: Gateway;
  let dir: string;
  const proxies: Record<string, LossyProxy> = {};
  let centre: RecordingCentre;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    proxies.lostTransaction = await startLossyProxy(sandbox.url);
    proxies.lostUpload = await startLossyProxy(sandbox.url, { lose: 'raw-binary' });
    proxies.lostPost = await startLossyProxy(sandbox.url, { lose: 'raw-binary' });
    proxies.lostPutTransaction = await startLossyProxy(sandbox.url);
    centre = await startRecordingCentre();
    dir = mkdtempSync(join(tmpdir(), 'rg-blob-delivery-'));
    const at = (id: string, extra: Record<string, unknown>, baseUrl = sandbox.url): Record<string, unknown> & { baseUrl: string } => ({
      id,
      baseUrl,
      maxInlineBytes: MAX_INLINE,
      ...extra,
    });
    const destinations = writeDestinationsFile(
      dir,
      at('raw-put', { binaryMode: 'raw', clientIds: true }),
      at('raw-post', { binaryMode: 'raw', clientIds: false }),
      at('put', { binaryMode: 'put' }),
      at('cc', { binaryMode: 'conditional-create' }, centre.base),
      // 3 MiB of document is 4 MiB of base64: over this cap it leaves the transaction as a raw upload.
      at('json-cap', { binaryMode: 'put', maxJsonBytes: 1_000_000 }),
      at('raw-lost-transaction', { binaryMode: 'raw', clientIds: true }, proxies.lostTransaction.base),
      at('raw-lost-upload', { binaryMode: 'raw', clientIds: true }, proxies.lostUpload.base),
      at('post-lost-upload', { binaryMode: 'raw', clientIds: false }, proxies.lostPost.base),
      at('put-lost-transaction', { binaryMode: 'put' }, proxies.lostPutTransaction.base)
    );
    gw = await startGateway({ DESTINATIONS_FILE: destinations, BLOB_DIR: join(dir, 'blobs'), DELIVERY_BASE_DELAY_MS: '20' });
  });

  afterAll(async () => {
    await gw.stop();
    for (const p of Object.values(proxies)) await p.close();
    await centre.close();
    await sandbox.close();
    rmSync(dir, { recursive: true, force: true });
  });

  async function delivered(r: BlobReferral): Promise<{ attempts: number; documents: DocumentReference[] }> {
    const sent = await eventually(async () => {
      const cur = await getReferral(gw.db, r.id, { payload: false });
      if (cur?.status === 'delivery-failed') throw new Error(`delivery failed: ${cur.statusReason ?? ''}`);
      return cur?.status === 'sent' ? cur : undefined;
    }, 30_000);
    const documents: DocumentReference[] = [];
    for (const ref of sent.fhir?.documents ?? []) documents.push((await (await fetch(`${sandbox.url}/${ref}`)).json()) as DocumentReference);
    const [submit] = await leasedQueue.forReferral(gw.db, deliveryQueue, r.id);
    return { attempts: submit.attempts, documents };
  }

  /** The Binaries the sandbox holds (straight from its repository: a search would answer their content as base64). */
  async function binaries(): Promise<Binary[]> {
    const bundle = (await sandbox.repo.search({ resourceType: 'Binary', count: 1000 })) as Bundle<Binary>;
    return (bundle.entry ?? []).map((e) => e.resource as Binary);
  }

  function attachmentOf(documents: DocumentReference[], r: BlobReferral, k = 0): NonNullable<DocumentReference['content'][0]['attachment']> {
    return documents[r.firstBlobIndex + k].content[0].attachment;
  }

  async function serverDigest(url: string | undefined): Promise<{ sha256: string; bytes: number; versions: number; contentType: string }> {
    const id = /^Binary\/([^/]+)$/.exec(url ?? '')?.[1];
    if (!id) throw new Error(`not a Binary URL: ${url}`);
    const digest = await sandbox.binary(id);
    if (!digest) throw new Error(`the sandbox holds no Binary ${id}`);
    return digest;
  }

  test('binaryMode raw with client ids: one raw Binary (PUT Binary/<stable id>), hashed at the server as the blob; size and SHA-1 from the blob', async () => {
    const before = sandbox.binaryUploads();
    const r = await createBlobReferral(gw, { documents: [LARGE], destination: 'raw-put' });
    const { documents } = await delivered(r);
    const att = attachmentOf(documents, r);
    expect(att.url).toMatch(/^Binary\/rg-[0-9a-f-]{36}$/);
    expect(att.data).toBeUndefined();
    expect(att.size).toBe(LARGE.bytes);
    expect(att.hash).toBe(r.blobs[0].sha1);
    expect(att.contentType).toBe('application/dicom');
    const digest = await serverDigest(att.url);
    expect(digest).toMatchObject({ sha256: r.blobs[0].sha256, bytes: LARGE.bytes, versions: 1, contentType: 'application/dicom' });
    // Received as a stream into a temporary file, not into memory.
    const after = sandbox.binaryUploads();
    expect(after.received - before.received).toBe(1);
    expect(after.inFiles - before.inFiles).toBe(1);
    // The small PDF of the sample referral still travels inline.
    expect(documents[0].content[0].attachment.data).toBeDefined();
  });

  test('binaryMode raw without client ids: POST Binary, its id recorded before the transaction', async () => {
    const r = await createBlobReferral(gw, { documents: [LARGE], destination: 'raw-post' });
    const { documents } = await delivered(r);
    const att = attachmentOf(documents, r);
    const recorded = (await binaryUploadsOf(gw.db, r.id, 'raw-post')).get(r.firstBlobIndex + 1);
    expect(recorded).toMatchObject({ state: 'done', lostUploads: 0 });
    expect(att.url).toBe(`Binary/${recorded?.binaryId}`);
    expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, bytes: LARGE.bytes, versions: 1 });
  });

  test("binaryMode put: the base64 streamed into the transaction's Binary entry; the server decodes the blob's bytes", async () => {
    const r = await createBlobReferral(gw, { documents: [LARGE], destination: 'put' });
    const { documents } = await delivered(r);
    const att = attachmentOf(documents, r);
    expect(att.url).toMatch(/^Binary\/rg-/);
    expect(att).toMatchObject({ size: LARGE.bytes, hash: r.blobs[0].sha1 });
    expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, bytes: LARGE.bytes });
    const binary = (await binaries()).find((b) => `Binary/${b.id}` === att.url);
    expect(binary?.data?.length).toBe(Math.ceil(LARGE.bytes / 3) * 4); // kept as the JSON carried it
  });

  test('binaryMode conditional-create: the same, the Binary a conditional create on its tag', async () => {
    // The sandbox has no _tag search on Binary: a stand-in centre that takes the transaction and decodes its Binary.
    const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 2 }], destination: 'cc' });
    await delivered(r);
    const tx = centre.transactions.at(-1);
    const binary = tx?.entry?.find((e) => e.resource?.resourceType === 'Binary');
    expect(binary?.request).toMatchObject({ method: 'POST', url: 'Binary', ifNoneExist: expect.stringMatching(/^_tag=/) });
    const data = (binary?.resource as Binary).data ?? '';
    expect(sha256(Buffer.from(data, 'base64'))).toBe(r.blobs[0].sha256);
    const doc = tx?.entry?.filter((e) => e.resource?.resourceType === 'DocumentReference')[r.firstBlobIndex]?.resource as DocumentReference;
    expect(doc.content[0].attachment).toMatchObject({ url: binary?.fullUrl, size: LARGE.bytes, hash: r.blobs[0].sha1 });
  });

  test('maxJsonBytes: a blob document counts with its base64 size and leaves the transaction as a raw upload', async () => {
    const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 3 }], destination: 'json-cap' });
    const { documents } = await delivered(r);
    const att = attachmentOf(documents, r);
    expect(att.url).toMatch(/^Binary\/rg-/);
    expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, bytes: LARGE.bytes });
    expect((await binaryUploadsOf(gw.db, r.id, 'json-cap')).get(r.firstBlobIndex + 1)).toMatchObject({ state: 'done' });
  });

  test('a blob document at or under maxInlineBytes is read from the store and sent inline', async () => {
    const small: GeneratedDocument = { bytes: MAX_INLINE, seed: 4, contentType: 'application/pdf' };
    const r = await createBlobReferral(gw, { documents: [small], destination: 'raw-put' });
    const { documents } = await delivered(r);
    const att = attachmentOf(documents, r);
    expect(att.url).toBeUndefined();
    expect(Buffer.from(att.data ?? '', 'base64').equals(generatedBytes(small))).toBe(true);
    expect(att).toMatchObject({ size: small.bytes, hash: r.blobs[0].sha1 });
  });

  test('several blob documents in one referral, one raw and one inline', async () => {
    const r = await createBlobReferral(gw, {
      documents: [
        { ...LARGE, seed: 5 },
        { bytes: 1000, seed: 6, contentType: 'text/plain' },
      ],
      destination: 'raw-put',
    });
    const { documents } = await delivered(r);
    expect(await serverDigest(attachmentOf(documents, r, 0).url)).toMatchObject({ sha256: r.blobs[0].sha256 });
    expect(sha256(Buffer.from(attachmentOf(documents, r, 1).data ?? '', 'base64'))).toBe(r.blobs[1].sha256);
  });

  test('a blob document added after submission (a documents delivery) is uploaded raw and linked in the same way', async () => {
    const r = await createBlobReferral(gw, { documents: [], destination: 'raw-put' });
    await delivered(r);
    const added = await addBlobDocuments(gw, r.id, [{ ...LARGE, seed: 12 }], r.firstBlobIndex);
    const doc = await eventually(async () => {
      const cur = await getReferral(gw.db, r.id, { payload: false });
      const ref = cur?.fhir?.documents[added.firstNumber - 1];
      return ref ? ((await (await fetch(`${sandbox.url}/${ref}`)).json()) as DocumentReference) : undefined;
    }, 30_000);
    const att = doc.content[0].attachment;
    expect(att).toMatchObject({ size: LARGE.bytes, hash: added.blobs[0].sha1 });
    expect(await serverDigest(att.url)).toMatchObject({ sha256: added.blobs[0].sha256, bytes: LARGE.bytes, versions: 1 });
  });

  describe('redelivery after a fault does not create a second Binary', () => {
    test('raw, the transaction answer lost: the upload is recorded and not sent again', async () => {
      const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 7 }], destination: 'raw-lost-transaction' });
      const { documents, attempts } = await delivered(r);
      expect(proxies.lostTransaction.dropped()).toBe(1);
      expect(attempts).toBe(2);
      const att = attachmentOf(documents, r);
      expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, versions: 1 });
      expect((await binaries()).filter((b) => b.meta?.versionId && `Binary/${b.id}` === att.url)).toHaveLength(1);
    });

    test('raw with client ids, the upload answer lost: the resend is the same PUT Binary/<id> (one Binary, a second version)', async () => {
      const count = (await binaries()).length;
      const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 8 }], destination: 'raw-lost-upload' });
      const { documents, attempts } = await delivered(r);
      expect(proxies.lostUpload.dropped()).toBe(1);
      expect(attempts).toBe(2);
      const att = attachmentOf(documents, r);
      expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, bytes: LARGE.bytes, versions: 2 });
      expect((await binaries()).length).toBe(count + 1);
    });

    test('put, the transaction answer lost: the resend writes the same Binary again', async () => {
      const count = (await binaries()).length;
      const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 9 }], destination: 'put-lost-transaction' });
      const { documents, attempts } = await delivered(r);
      expect(attempts).toBe(2);
      const att = attachmentOf(documents, r);
      expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, versions: 2 });
      expect((await binaries()).length).toBe(count + 1);
    });

    test('raw without client ids, the upload answer lost: the documented orphan (one unreferenced Binary, counted as a lost upload)', async () => {
      const count = (await binaries()).length;
      const r = await createBlobReferral(gw, { documents: [{ ...LARGE, seed: 10 }], destination: 'post-lost-upload' });
      const { documents } = await delivered(r);
      const att = attachmentOf(documents, r);
      expect(await serverDigest(att.url)).toMatchObject({ sha256: r.blobs[0].sha256, versions: 1 });
      // The POST whose answer was lost created a Binary nobody points at; the gateway knows and says so.
      expect((await binaries()).length).toBe(count + 2);
      expect(await possiblyOrphanedUploads(gw.db, 'post-lost-upload')).toEqual([
        expect.objectContaining({ referralId: r.id, document: r.firstBlobIndex + 1, lost: 1 }),
      ]);
    });
  });

  test('a blob missing from the store fails the delivery with the reason; nothing is sent', async () => {
    const count = (await binaries()).length;
    const gone = { sha256: 'ab'.repeat(32), bytes: LARGE.bytes, sha1: 'AAAAAAAAAAAAAAAAAAAAAAAAAAA=' };
    const r = await createBlobReferral(gw, { documents: [gone], destination: 'raw-put' });
    const cur = await eventually(async () => {
      const c = await getReferral(gw.db, r.id, { payload: false });
      return c?.status === 'delivery-failed' ? c : undefined;
    }, 30_000);
    expect(cur.statusReason).toBe(`the bytes of document ${r.firstBlobIndex + 1} are not in the blob store`);
    const [submit] = await leasedQueue.forReferral(gw.db, deliveryQueue, r.id);
    expect(submit).toMatchObject({ state: 'failed', attempts: 1 });
    expect((await binaries()).length).toBe(count);
  });
});

interface RecordingCentre {
  base: string;
  /** The transactions received, parsed. */
  transactions: Bundle[];
  close(): Promise<void>;
}

/** A FHIR server stand-in: every search finds nothing, every transaction entry is created (201). */
async function startRecordingCentre(): Promise<RecordingCentre> {
  const transactions: Bundle[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      res.setHeader('Content-Type', 'application/fhir+json');
      if (req.method === 'GET') {
        res.end(JSON.stringify({ resourceType: 'Bundle', type: 'searchset', total: 0, entry: [] }));
        return;
      }
      const bundle = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Bundle;
      transactions.push(bundle);
      const entry = (bundle.entry ?? []).map((e, i) => ({ response: { status: '201 Created', location: `${e.resource?.resourceType}/${i + 1}/_history/1` } }));
      res.end(JSON.stringify({ resourceType: 'Bundle', type: 'transaction-response', entry }));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}/fhir`,
    transactions,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}
