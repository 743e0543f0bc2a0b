import { readFileSync } from 'node:fs';
import { sql } from 'kysely';
import { isBase64, referralSchema } from '../../src/model';
import { newReferralId, nowIso } from '../../src/store/ids';
import { storeBackends } from '../helpers/db';
import { deliveryQueue, getReferral, insertReferral, leasedQueue, queueDocuments, type Db } from '../../src/store';

/**
 * A referral's documents are stored without a JSON.stringify of the whole submission (the long base64 strings
 * are copied into the stored text byte for byte: src/store/referrals.ts, jsonBytes). What a client sent
 * must come back exactly, on both stores: megabytes of document data next to names with accents and emoji,
 * documents added later, and the stored column is still text that SQL can read.
 */
const sample = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, any>;

describe.each(storeBackends())('large submissions on %s', (_name, open) => {
  let db: Db;
  beforeEach(async () => {
    db = await open();
  });
  afterEach(async () => {
    await db.close();
  });

  test('a referral with a 3 MB document and non-ASCII text reads back exactly as submitted, stored as JSON text', async () => {
    const pdf = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < pdf.length; i++) pdf[i] = (i * 131 + (i >> 9)) & 0xff;
    const body = structuredClone(sample);
    body.patient.name = { given: ['Zoë', 'Łucja'], family: 'Ødegård-Núñez 😀' };
    body.questions = ['Is the "margin" clear? \\ / \u2028 —'];
    body.documents = [
      { kind: 'pathology-report', title: 'Slide scan', contentType: 'application/pdf', data: pdf.toString('base64') },
      ...body.documents,
      { kind: 'imaging-report', title: 'Second scan', contentType: 'application/pdf', data: pdf.subarray(1).toString('base64') },
    ];
    const payload = referralSchema.parse(body);
    const id = newReferralId();
    await insertReferral(db, {
      id,
      clientId: 'city-hospital',
      externalId: 'EHR-LARGE-1',
      idempotencyKey: null,
      requestHash: 'h',
      destination: 'sandbox',
      payload,
      at: nowIso(),
    });

    const back = await getReferral(db, id);
    expect(back?.payload).toEqual(payload);
    expect(Buffer.from(back?.payload.documents[0].data as string, 'base64').equals(pdf)).toBe(true);
    // Readable by SQL as JSON text (retention and operators query it), not a blob.
    const row = await sql<{ payload: unknown }>`select payload from referral_payloads where referral_id = ${id}`.execute(db.kysely);
    const text = row.rows[0]?.payload;
    expect(typeof text).toBe('string');
    expect(JSON.parse(text as string).patient.name.family).toBe('Ødegård-Núñez 😀');

    // Documents added later (their outbox payload is written the same way) come back whole too.
    const added = [{ kind: 'lab-report' as const, title: 'Labs', contentType: 'application/pdf', data: pdf.subarray(7).toString('base64') }];
    const { outboxId } = await queueDocuments(db, id, added, payload.documents.length);
    const entry = (await leasedQueue.forReferral(db, deliveryQueue, id)).find((e) => e.id === outboxId);
    expect(entry?.payload).toEqual({ documents: added, startIndex: payload.documents.length });
  });
});

describe('base64 check of inline documents', () => {
  test('canonical base64 is accepted; what FHIR base64Binary is not (URL-safe alphabet, whitespace, inner padding, bad length) is refused', () => {
    const big = Buffer.alloc(9 * 1024 * 1024, 7).toString('base64'); // several 4 MiB slices
    expect(isBase64(big)).toBe(true);
    expect(isBase64('AB==')).toBe(true);
    expect(isBase64('ABC=')).toBe(true);
    for (const bad of ['AB-_', 'AB-/', 'AB D', 'AB\nD', 'A===', 'AA=A', 'ABC', '====', 'AB!D', 'ABé=']) expect([bad, isBase64(bad)]).toEqual([bad, false]);
    // A bad character, or padding, deep inside a large document (in a later slice) is found too.
    for (const at of [5, 4 * 1024 * 1024 - 1, 4 * 1024 * 1024, big.length - 3]) {
      for (const c of ['-', '_', '=', ' ', '*']) {
        const s = big.slice(0, at) + c + big.slice(at + 1);
        expect([at, c, isBase64(s)]).toEqual([at, c, false]);
      }
    }
    const refused = referralSchema.safeParse({
      ...sample,
      documents: [{ kind: 'other', title: 'x', contentType: 'application/pdf', data: `${big.slice(0, -4)}AB_D` }],
    });
    expect(refused.success).toBe(false);
    expect(refused.error?.issues.map((i) => [i.path.join('.'), i.message])).toEqual([['documents.0.data', 'is not valid base64']]);
  });
});
