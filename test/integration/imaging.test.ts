import type { Bundle, DocumentReference, Endpoint, ImagingStudy, ServiceRequest, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { type SandboxServer, startSandboxServer } from '../../src/sandbox/server';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * Imaging end to end (issue 13 point 3): an EHR posts a referral with a DICOMweb imaging study; the sandbox centre
 * then holds the ImagingStudy and the Endpoint of the PACS, the ServiceRequest lists the ImagingStudy in
 * supportingInfo, and the referral's own view still lists one DocumentReference per document. A study added later
 * is linked the same way.
 */
describe('an imaging study referenced by DICOMweb reaches the centre as an ImagingStudy', () => {
  let gw: Gateway;
  let fhirBase: string;

  const api = async (path: string, body?: unknown): Promise<{ status: number; body: any }> => {
    const res = await fetch(`${gw.url}${path}`, {
      method: body === undefined ? 'GET' : 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: await res.json() };
  };
  const fhir = async <T>(path: string): Promise<T> => {
    const res = await fetch(`${fhirBase}/${path}`);
    if (!res.ok) throw new Error(`GET ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };

  beforeAll(async () => {
    gw = await startGateway();
    fhirBase = `${gw.url}/sandbox/fhir/R4`;
  });
  afterAll(async () => {
    await gw.stop();
  });

  const PACS = 'https://pacs.cityhospital.example.org/dicom-web';
  const UID = '1.2.826.0.1.3680043.8.498.10001';
  const study = {
    kind: 'imaging-study',
    title: 'Staging PET-CT',
    contentType: 'application/dicom',
    study: { endpoint: PACS, studyInstanceUid: UID, modalities: ['PT', 'CT'], seriesCount: 5, instanceCount: 1200, started: '2026-08-30T10:00:00Z' },
  };

  test('submitted with the referral, and added later', async () => {
    const { callbackUrl: _none, ...referral } = fixture('breast-second-opinion');
    const created = await api('/referrals', { ...referral, externalId: 'EHR-IMAGING-1', documents: [...referral.documents, study] });
    expect([created.status, created.body.issue]).toEqual([202, undefined]);
    const sent = await eventually(async () => {
      const r = (await api(`/referrals/${created.body.id}`)).body;
      return r.status === 'sent' ? r : undefined;
    });
    // One DocumentReference per document in the view, the study's among them (its WADO-RS URL).
    expect(sent.fhir.documents).toHaveLength(referral.documents.length + 1);
    const doc = await fhir<DocumentReference>(sent.fhir.documents[referral.documents.length]);
    expect(doc.content[0].attachment).toMatchObject({ contentType: 'application/dicom', url: `${PACS}/studies/${UID}` });

    const studies = await fhir<Bundle<ImagingStudy>>(`ImagingStudy?identifier=${encodeURIComponent(`urn:dicom:uid|urn:oid:${UID}`)}`);
    expect(studies.entry).toHaveLength(1);
    const imaging = studies.entry?.[0].resource as ImagingStudy;
    expect(imaging).toMatchObject({ status: 'available', numberOfSeries: 5, numberOfInstances: 1200, started: '2026-08-30T10:00:00Z' });
    expect(imaging.modality?.map((m) => m.code)).toEqual(['PT', 'CT']);
    const sr = await fhir<ServiceRequest>(sent.fhir.serviceRequest);
    expect(imaging.subject?.reference).toBe(sr.subject?.reference);
    expect(sr.supportingInfo?.map((r) => r.reference)).toContain(`ImagingStudy/${imaging.id}`);
    expect(doc.context?.related?.map((r) => r.reference)).toEqual([sent.fhir.serviceRequest, `ImagingStudy/${imaging.id}`]);
    const task = await fhir<Task>(sent.fhir.task);
    expect(task.input?.map((i) => i.valueReference?.reference)).toContain(`ImagingStudy/${imaging.id}`);

    const endpoint = await fhir<Endpoint>(imaging.endpoint?.[0].reference as string);
    expect(endpoint).toMatchObject({ status: 'active', address: PACS, connectionType: { code: 'dicom-wado-rs' }, payloadMimeType: ['application/dicom'] });

    // A second study of the same PACS added later: its own ImagingStudy, the same Endpoint, linked from the ServiceRequest.
    const UID2 = '1.2.826.0.1.3680043.8.498.10002';
    const added = await api(`/referrals/${created.body.id}/documents`, {
      documents: [{ ...study, title: 'Follow-up MRI', study: { endpoint: PACS, studyInstanceUid: UID2, modalities: ['MR'], seriesCount: 3 } }],
    });
    expect([added.status, added.body.issue]).toEqual([202, undefined]);
    const later = await eventually(async () => {
      const r = (await api(`/referrals/${created.body.id}`)).body;
      return r.fhir?.documents.length === referral.documents.length + 2 ? r : undefined;
    });
    const second = (await fhir<Bundle<ImagingStudy>>(`ImagingStudy?identifier=${encodeURIComponent(`urn:dicom:uid|urn:oid:${UID2}`)}`)).entry?.[0]
      .resource as ImagingStudy;
    expect(second.endpoint).toEqual(imaging.endpoint);
    const sr2 = await fhir<ServiceRequest>(later.fhir.serviceRequest);
    expect(sr2.supportingInfo?.map((r) => r.reference)).toEqual(expect.arrayContaining([`ImagingStudy/${imaging.id}`, `ImagingStudy/${second.id}`]));
    expect((await fhir<Bundle>('Endpoint')).entry).toHaveLength(1);
  }, 30_000);

  test('a study on another kind, or a DICOMweb reference without its endpoint, answers 422 naming the field', async () => {
    const { callbackUrl: _none, ...referral } = fixture('breast-second-opinion');
    const wrongKind = await api('/referrals', { ...referral, externalId: 'EHR-IMAGING-2', documents: [{ ...study, kind: 'imaging-report' }] });
    expect(wrongKind.status).toBe(422);
    expect(wrongKind.body.issue.map((i: any) => i.expression?.[0])).toContain('documents[0].study');
    const { endpoint: _e, ...noEndpoint } = study.study;
    const missing = await api('/referrals', { ...referral, externalId: 'EHR-IMAGING-3', documents: [{ ...study, study: noEndpoint }] });
    expect(missing.status).toBe(422);
    expect(missing.body.issue.map((i: any) => i.expression?.[0])).toContain('documents[0].study.endpoint');
  });
});

/**
 * On every sandbox server profile (conditional transactions on hapi, resolve-first on medplum and strict): two
 * referrals of one patient naming the same study on the same PACS leave one ImagingStudy and one Endpoint at the
 * centre, both listed by each referral's ServiceRequest.
 */
describe.each([
  ['hapi', 'hapi'],
  ['medplum', 'medplum'],
  ['strict', 'medplum'],
])('the same study in two referrals on the %s sandbox (destination profile %s)', (sandboxProfile, destinationProfile) => {
  let sandbox: SandboxServer;
  let gw: Gateway;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0, { profile: sandboxProfile });
    gw = await startGateway({ FHIR_BASE_URL: sandbox.url, FHIR_PROFILE: destinationProfile });
  });
  afterAll(async () => {
    await gw.stop();
    await sandbox.close();
  });

  const search = async <T>(query: string): Promise<T[]> => {
    const res = await fetch(`${sandbox.url}/${query}`, { headers: { Accept: 'application/fhir+json' } });
    expect(res.status).toBe(200);
    return ((await res.json()) as Bundle).entry?.map((e) => e.resource as T) ?? [];
  };

  test('one ImagingStudy and one Endpoint, linked from both ServiceRequests', async () => {
    const { callbackUrl: _none, ...referral } = fixture('breast-second-opinion');
    const doc = {
      kind: 'imaging-study',
      title: 'Staging CT',
      contentType: 'application/dicom',
      study: { endpoint: 'https://pacs.example.org/dicom-web', studyInstanceUid: '1.2.3.4.5.6.7', modalities: ['CT'], seriesCount: 2 },
    };
    const sent: any[] = [];
    for (const externalId of ['EHR-IMG-A', 'EHR-IMG-B']) {
      const res = await fetch(`${gw.url}/referrals`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ ...referral, externalId, documents: [doc] }),
      });
      expect(res.status).toBe(202);
      const id = ((await res.json()) as { id: string }).id;
      sent.push(
        await eventually(async () => {
          const r = (await (await fetch(`${gw.url}/referrals/${id}`, { headers: { Authorization: `Bearer ${KEY_A}` } })).json()) as any;
          if (r.status === 'delivery-failed') throw new Error(r.statusReason);
          return r.status === 'sent' ? r : undefined;
        }, 20_000)
      );
    }
    const studies = await search<ImagingStudy>('ImagingStudy');
    expect(studies).toHaveLength(1);
    expect(await search<Endpoint>('Endpoint')).toHaveLength(1);
    for (const r of sent) {
      const [sr] = await search<ServiceRequest>(`ServiceRequest?_id=${r.fhir.serviceRequest.split('/')[1]}`);
      expect(sr.supportingInfo?.map((x) => x.reference)).toContain(`ImagingStudy/${studies[0].id}`);
    }
  }, 45_000);
});
