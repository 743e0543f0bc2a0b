import { Readable } from 'node:stream';
import type { BlobStore } from '../../src/blobs';
import type { Destination, DestinationDirectory } from '../../src/config';
import { DeliveryWorker } from '../../src/delivery';
import { type DeliveryContext, type DestinationAdapter, DestinationAdapters } from '../../src/destinations';
import type { ReferralDocument } from '../../src/model';
import { setLogLevel } from '../../src/observability';
import { type Db, deliveryQueue, insertReferral, leasedQueue, newReferralId, nowIso } from '../../src/store';
import { sampleReferral } from '../helpers/blob-referrals';
import { freshSqlite } from '../helpers/db';

/**
 * An attempt whose documents take long to send (a large streamed document) gets a time budget that grows with their
 * size, and keeps its entry's lease while it runs: another worker cannot take the entry over from under it.
 */
describe('a long attempt: its budget and its lease', () => {
  const destination = {
    type: 'direct-messaging',
    id: 'dm',
    name: 'DM',
    organization: { system: 's', value: 'v' },
    baseUrl: 'https://dm.example',
    auth: { type: 'none' },
    timeoutMs: 100,
    maxInlineBytes: 1000,
  } as unknown as Destination;
  const directory: DestinationDirectory = { ids: () => ['dm'], get: (id) => (id === 'dm' ? destination : undefined) };
  let db: Db;
  let worker: DeliveryWorker;
  /** What the adapter saw: whether its budget ran out during a 1 s send, and whether another worker could claim. */
  const seen: Array<{ aborted: boolean; takenOver: boolean }> = [];

  const adapter: DestinationAdapter = {
    type: 'direct-messaging',
    async submit(ctx: DeliveryContext) {
      ctx.takePayload();
      const aborted = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), 1_000);
        ctx.signal.addEventListener('abort', () => {
          clearTimeout(timer);
          resolve(true);
        });
      });
      // Past the 300 ms lease it was claimed with: renewed, so another worker finds nothing to take.
      const takenOver = (await leasedQueue.claim(db, deliveryQueue, 'w_other', 1, 300)).length > 0;
      seen.push({ aborted, takenOver });
      return aborted ? { kind: 'retry', reason: 'budget', neutral: true } : { kind: 'done' };
    },
    addDocuments: async () => ({ kind: 'done' }),
    cancel: async () => ({ kind: 'done' }),
    track: async () => 'delta',
    readReport: async () => ({ contentType: 'text/plain', body: Readable.from([]) }),
  };

  beforeEach(async () => {
    setLogLevel('error');
    seen.length = 0;
    db = await freshSqlite();
    worker = new DeliveryWorker(db, directory, new DestinationAdapters([adapter]), {
      maxAttempts: 1,
      maxAgeMs: 60_000,
      baseDelayMs: 10,
      maxDelayMs: 10,
      concurrency: 1,
      idleMs: 20,
      blobs: {} as BlobStore,
      leaseMs: 300,
      floorBytesPerSecond: 1024 * 1024,
    });
  });
  afterEach(async () => {
    await worker.stop();
    await db.close();
  });

  async function queue(documents: ReferralDocument[]): Promise<string> {
    const payload = sampleReferral();
    payload.documents.push(...documents);
    const id = newReferralId();
    await insertReferral(db, { id, clientId: 'c', externalId: `E-${id}`, idempotencyKey: null, requestHash: 'h', destination: 'dm', payload, at: nowIso() });
    return id;
  }

  async function settled(id: string): Promise<{ state: string; attempts: number }> {
    for (;;) {
      const [entry] = await leasedQueue.forReferral(db, deliveryQueue, id);
      if (entry.state !== 'pending') return entry;
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  test('1 MiB of document in the blob store: a budget of 0.3 s + 1.3 s at 1 MiB/s covers a 1 s send; the lease is renewed', async () => {
    const blob = { sha256: 'a'.repeat(64), bytes: 1024 * 1024, sha1: 'x' };
    const id = await queue([{ kind: 'pathology-report', title: 'WSI', contentType: 'application/dicom', upload: true, blob } as ReferralDocument]);
    worker.start();
    expect(await settled(id)).toMatchObject({ state: 'done', attempts: 1 });
    expect(seen).toEqual([{ aborted: false, takenOver: false }]);
  });

  test('no large document: the budget of three 100 ms requests cuts a 1 s send', async () => {
    const id = await queue([]);
    worker.start();
    expect(await settled(id)).toMatchObject({ state: 'failed', attempts: 1 });
    expect(seen).toEqual([{ aborted: true, takenOver: false }]);
  });
});
