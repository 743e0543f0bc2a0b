import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import type { Binary, DocumentReference } from '@medplum/fhirtypes';
import { base64Chunks, base64Length, type BlobStore, BlobUnreadable, readBlob, verifiedBlob } from '../../src/blobs';
import { entryBudgetMs, documentBytes } from '../../src/delivery/worker';
import { documentsToMoveOut, estimateJsonBytes, planBinaries } from '../../src/destinations/fhir/attachments';
import { BlobReads, resolveBlobDocuments } from '../../src/destinations/fhir/blob-documents';
import { jsonRequestBody } from '../../src/destinations/fhir/client';
import { DeadlineExceeded, fetchWithDeadline, sendStreamed } from '../../src/http';
import { jsonBytes, StreamedString } from '../../src/json';
import { mapReferralToBundle } from '../../src/mapping';
import type { BlobRef, ReferralDocument } from '../../src/model';
import { sampleReferral } from '../helpers/blob-referrals';

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const sha1 = (b: Buffer): string => createHash('sha1').update(b).digest('base64');

/** A blob store over a map, whose reads come in pieces of `piece` bytes. */
function memoryStore(blobs: Buffer[], piece = 1000): Pick<BlobStore, 'open' | 'stat'> & { opened: number } {
  const byHash = new Map(blobs.map((b) => [sha256(b), b]));
  const store = {
    opened: 0,
    async open(hash: string) {
      const b = byHash.get(hash);
      if (!b) return undefined;
      store.opened++;
      return Readable.from(
        (function* () {
          for (let at = 0; at < b.length; at += piece) yield b.subarray(at, at + piece);
        })()
      );
    },
    async stat(hash: string) {
      return byHash.get(hash)?.length;
    },
  };
  return store;
}

const refOf = (b: Buffer): BlobRef => ({ sha256: sha256(b), bytes: b.length, sha1: sha1(b) });
const bytes = (n: number, seed = 1): Buffer => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed) % 256));
const collect = async (it: AsyncIterable<Uint8Array>): Promise<Buffer> => {
  const parts: Buffer[] = [];
  for await (const p of it) parts.push(Buffer.from(p));
  return Buffer.concat(parts);
};
const blobDoc = (b: Buffer, contentType = 'application/dicom'): ReferralDocument =>
  ({ kind: 'pathology-report', title: 'Slide', contentType, upload: true, blob: refOf(b) }) as ReferralDocument;

describe('reading blobs for delivery', () => {
  test('base64 of a stream in pieces of any size is the base64 of the whole', async () => {
    for (const size of [0, 1, 2, 3, 4, 1000, 3001, 65_537]) {
      const whole = bytes(size, size);
      for (const piece of [1, 2, 5, 64, 4096]) {
        const source = (await memoryStore([whole], piece).open(sha256(whole))) as Readable;
        const text = (await collect(base64Chunks(source))).toString('latin1');
        expect(text).toBe(whole.toString('base64'));
        expect(text.length).toBe(base64Length(size));
      }
    }
  });

  test('verifiedBlob hands on the bytes, but fails before the last piece when they are not the ones stored', async () => {
    const good = bytes(10_000);
    const store = memoryStore([good]);
    expect((await collect(verifiedBlob(store, refOf(good)))).equals(good)).toBe(true);
    // Another digest: every piece but the last is handed on, then it fails.
    const seen: number[] = [];
    const wrong = { sha256: sha256(good).replace(/^./, (c) => (c === '0' ? '1' : '0')), bytes: good.length };
    const store2 = { open: async () => store.open(sha256(good)) };
    await expect(
      (async () => {
        for await (const p of verifiedBlob(store2, wrong)) seen.push(p.length);
      })()
    ).rejects.toThrow(BlobUnreadable);
    expect(seen.reduce((a, b) => a + b, 0)).toBe(good.length - 1000);
    await expect(readBlob(store, { sha256: sha256(good), bytes: good.length + 1 })).rejects.toThrow(/holds 10000 of its 10001 bytes/);
    await expect(readBlob(store, { sha256: sha256(good), bytes: good.length - 1 })).rejects.toThrow(/more than its/);
    await expect(readBlob(store, { sha256: 'f'.repeat(64), bytes: 1 })).rejects.toThrow(/not in the blob store/);
  });

  test('resolveBlobDocuments: small blob documents become inline data, large ones stay, missing ones are named', async () => {
    const small = bytes(100);
    const large = bytes(5000, 2);
    const store = memoryStore([small, large]);
    const inline = { kind: 'imaging-report', title: 'x', contentType: 'text/plain', data: 'QQ==' } as ReferralDocument;
    const largeDoc = blobDoc(large);
    const resolved = await resolveBlobDocuments(store, [inline, blobDoc(small), largeDoc], 1000, 2);
    if ('missing' in resolved) throw new Error(resolved.missing);
    expect(resolved.documents[0]).toBe(inline);
    expect(resolved.documents[1]).toMatchObject({ data: small.toString('base64') });
    expect(resolved.documents[1].blob).toBeUndefined();
    expect(resolved.documents[2]).toBe(largeDoc); // streamed when sent, not read here
    expect(await resolveBlobDocuments(store, [blobDoc(bytes(7, 9))], 1000, 2)).toEqual({ missing: 'the bytes of document 3 are not in the blob store' });
  });
});

describe('blob documents in the plan and the JSON', () => {
  const destination = { baseUrl: 'https://c.example/fhir', maxInlineBytes: 1000 };
  const large = bytes(3001, 3);
  const store = memoryStore([large], 64);

  test('binaryMode raw: a blob document over the limit is uploaded raw; put: a Binary entry whose data is streamed', () => {
    const reads = new BlobReads(store);
    const raw = planBinaries({ referralId: 'r1', documents: [blobDoc(large)], startIndex: 0, destination: { ...destination, binaryMode: 'raw' } });
    expect(raw.raw).toEqual([0]);
    // The generic profile's default (put) is for inline documents: a streamed one still goes raw unless the destination sets the mode itself.
    expect(planBinaries({ referralId: 'r1', documents: [blobDoc(large)], startIndex: 0, destination: { ...destination, binaryMode: undefined } }).raw).toEqual([
      0,
    ]);
    const put = planBinaries({
      referralId: 'r1',
      documents: [blobDoc(large)],
      startIndex: 0,
      destination: { ...destination, binaryMode: 'put' },
      blobData: (b) => reads.base64(b),
    });
    expect(put.raw).toEqual([]);
    const data = (put.entries[0].resource as Binary).data as unknown;
    expect(data).toBeInstanceOf(StreamedString);
    expect((data as StreamedString).length).toBe(base64Length(large.length));
    // Pushed out (maxJsonBytes): raw, whatever its size.
    const out = planBinaries({ referralId: 'r1', documents: [blobDoc(bytes(10))], startIndex: 0, destination, alsoRaw: [0] });
    expect(out.raw).toEqual([0]);
  });

  test('the JSON estimate counts a streamed string by its length; documentsToMoveOut counts blob documents by their base64', () => {
    const s = new StreamedString(400_000, async function* () {});
    expect(estimateJsonBytes({ a: s, b: 'x' })).toBe(Buffer.byteLength(JSON.stringify({ a: '', b: 'x' })) + 400_000);
    const docs = [blobDoc(bytes(3000)), { kind: 'imaging-report', title: 'x', contentType: 'text/plain', data: 'A'.repeat(2000) } as ReferralDocument];
    expect(documentsToMoveOut(docs, new Set(), 7000, 4500)).toEqual([0]);
    expect(documentsToMoveOut(docs, new Set(), 7000, 2500)).toEqual([0, 1]);
  });

  test('jsonRequestBody streams a blob base64 into the JSON: the bytes are JSON.stringify of the value with the whole base64', async () => {
    const reads = new BlobReads(store);
    const value = { resourceType: 'Binary', data: reads.base64(refOf(large)), contentType: 'application/dicom', note: 'é "q"' };
    const body = jsonRequestBody(value);
    expect(typeof body).toBe('function');
    const text = (await collect((body as () => ReadableStream<Uint8Array>)())).toString('utf8');
    expect(text).toBe(JSON.stringify({ ...value, data: large.toString('base64') }));
    // Each call reads the blob again (a resend).
    await collect((body as () => ReadableStream<Uint8Array>)());
    expect(store.opened).toBeGreaterThanOrEqual(2);
    // A stored payload never holds one.
    expect(() => jsonBytes(value)).toThrow(/only be written to a stream/);
  });

  test('a streamed string that gives the wrong length fails the body', async () => {
    const short = new StreamedString(10, async function* () {
      yield Buffer.from('AAAA');
    });
    const body = jsonRequestBody({ data: short }) as () => ReadableStream<Uint8Array>;
    await expect(collect(body())).rejects.toThrow(/gave 4 of its 10 characters/);
  });

  test('a blob whose bytes are not the ones stored is recorded as unreadable by the reads of the attempt', async () => {
    const reads = new BlobReads({ open: store.open, stat: store.stat });
    const lying = { ...refOf(large), bytes: large.length + 3 };
    await expect(collect(reads.body(lying).stream())).rejects.toThrow(BlobUnreadable);
    expect(reads.failure).toBeInstanceOf(BlobUnreadable);
  });

  test('the mapper gives a blob document its URL, size and SHA-1 from the blob, and reads nothing', () => {
    const referral = sampleReferral();
    const doc = blobDoc(large);
    const bundle = mapReferralToBundle({
      referralId: 'ref_1',
      clientId: 'c',
      referral: { ...referral, documents: [...referral.documents, doc] },
      destination: {
        id: 'centre',
        name: 'C',
        organization: { system: 's', value: 'v' },
        baseUrl: 'https://c.example/fhir',
        auth: { type: 'none' },
        timeoutMs: 1000,
        maxInlineBytes: 1000,
      },
      createdAt: '2026-01-01T00:00:00Z',
      attachmentUrls: { [referral.documents.length]: 'Binary/rg-1' },
    });
    const refs = (bundle.entry ?? []).filter((e) => e.resource?.resourceType === 'DocumentReference');
    const att = (refs.at(-1)?.resource as DocumentReference).content[0].attachment;
    expect(att).toMatchObject({ url: 'Binary/rg-1', size: large.length, hash: sha1(large), contentType: 'application/dicom' });
    expect(att.data).toBeUndefined();
  });
});

describe("an attempt's time budget", () => {
  test('grows with the documents to send at the floor rate', () => {
    expect(entryBudgetMs({ timeoutMs: 30_000 })).toBe(90_000);
    expect(entryBudgetMs({ timeoutMs: 30_000 }, 1024 * 1024 * 1024)).toBe(90_000 + 1_024_000);
    expect(entryBudgetMs({ timeoutMs: 1_000 }, 10 * 1024 * 1024, 10 * 1024 * 1024)).toBe(4_000);
    const doc = blobDoc(bytes(3000));
    expect(documentBytes([doc, { data: 'AAAA' } as ReferralDocument, { url: 'https://x' } as unknown as ReferralDocument])).toBe(4000 + 4);
  });
});

describe('a streamed request body: the timeout is one of inactivity', () => {
  let server: ReturnType<typeof createServer>;
  let url: string;
  const received: Buffer[] = [];
  beforeAll(async () => {
    server = createServer((req: IncomingMessage, res) => {
      if (req.url === '/refuse') {
        res.statusCode = 413;
        res.end('{"resourceType":"OperationOutcome"}');
        return;
      }
      const parts: Buffer[] = [];
      req.on('data', (c: Buffer) => parts.push(c));
      req.on('end', () => {
        received.push(Buffer.concat(parts));
        res.setHeader('Content-Type', 'application/json');
        res.end(JSON.stringify({ bytes: Buffer.concat(parts).length, length: req.headers['content-length'] ?? null }));
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/upload`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });

  /** 10 pieces, one every `everyMs`, then (with `stallAfter`) nothing more after that many. */
  const slow = (everyMs: number, stallAfter?: number): ReadableStream<Uint8Array> => {
    let n = 0;
    return new ReadableStream<Uint8Array>({
      async pull(c) {
        if (stallAfter !== undefined && n >= stallAfter) return new Promise<void>(() => undefined);
        await new Promise((r) => setTimeout(r, everyMs));
        if (n++ === 10) c.close();
        else c.enqueue(Buffer.alloc(1000, n));
      },
    });
  };

  test.each([
    [
      'sendStreamed (node:http)',
      (body: ReadableStream<Uint8Array>, timeoutMs: number) =>
        sendStreamed(url, { method: 'PUT', headers: new Headers({ 'Content-Length': '10000' }), body }, timeoutMs),
    ],
    [
      'fetchWithDeadline (a given fetch)',
      (body: ReadableStream<Uint8Array>, timeoutMs: number) =>
        fetchWithDeadline(fetch, url, { method: 'PUT', headers: { 'Content-Length': '10000' }, body, duplex: 'half' } as RequestInit, timeoutMs),
    ],
  ])('%s: an upload that keeps moving outlasts the timeout; one that stalls is cut', async (_name, send) => {
    // 10 pieces 60 ms apart: 600 ms in all, with a 250 ms timeout.
    const res = await send(slow(60), 250);
    expect(res.status).toBe(200);
    expect(JSON.parse(Buffer.from(res.bytes).toString())).toEqual({ bytes: 10_000, length: '10000' });
    const started = Date.now();
    await expect(send(slow(10, 3), 250)).rejects.toEqual(new DeadlineExceeded(250, true));
    expect(Date.now() - started).toBeLessThan(1_500);
  });

  test('sendStreamed: a server that answers before the body is sent (413) is heard at once; the rest is not sent', async () => {
    const started = Date.now();
    const res = await sendStreamed(
      url.replace('/upload', '/refuse'),
      { method: 'PUT', headers: new Headers({ 'Content-Length': '10000' }), body: slow(100) },
      5_000
    );
    expect(res.status).toBe(413);
    expect(Date.now() - started).toBeLessThan(900);
  });
});
