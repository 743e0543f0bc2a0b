import { createHash } from 'node:crypto';
import type { DocumentReference } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * A document over 1 MiB is accepted when it comes with the referral (the intake check validates the FHIR content
 * with the bytes left out); one added later must be too. Before, POST /referrals/{id}/documents validated the
 * bytes themselves and answered 422 "base64Binary exceeds 1048576 bytes" (@medplum/core's limit) for any PDF
 * over 1 MiB.
 */
describe('documents added later', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('a 3 MB PDF added to a sent referral is accepted and reaches the centre whole', async () => {
    const api = async (path: string, body?: unknown): Promise<{ status: number; body: any }> => {
      const res = await fetch(`${gw.url}${path}`, {
        method: body === undefined ? 'GET' : 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return { status: res.status, body: await res.json() };
    };
    const { callbackUrl: _none, ...referral } = fixture();
    const created = await api('/referrals', { ...referral, externalId: 'EHR-ADD-LARGE-1' });
    expect(created.status).toBe(202);
    const id = created.body.id as string;
    await eventually(async () => (await api(`/referrals/${id}`)).body.status === 'sent');

    const pdf = Buffer.alloc(3_000_000);
    for (let i = 0; i < pdf.length; i++) pdf[i] = (i * 7919) % 251;
    const added = await api(`/referrals/${id}/documents`, {
      documents: [{ kind: 'imaging-report', title: 'PET-CT report', contentType: 'application/pdf', data: pdf.toString('base64') }],
    });
    expect([added.status, added.body.issue]).toEqual([202, undefined]);

    const view = await eventually(async () => {
      const r = (await api(`/referrals/${id}`)).body;
      return r.fhir?.documents.length === referral.documents.length + 1 ? r : undefined;
    }, 20_000);
    const doc = (await (await fetch(`${gw.url}/sandbox/fhir/R4/${view.fhir.documents[referral.documents.length]}`)).json()) as DocumentReference;
    expect(doc.content[0].attachment.size).toBe(pdf.length);
    expect(doc.content[0].attachment.hash).toBe(createHash('sha1').update(pdf).digest('base64'));
  }, 60_000);
});
