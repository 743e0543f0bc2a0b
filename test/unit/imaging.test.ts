import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import type { Bundle, DocumentReference, Endpoint, ImagingStudy, Resource, ServiceRequest, Task } from '@medplum/fhirtypes';
import { readReferralBundle } from '../../src/intake/fhir-bundle/map';
import { mapAddedDocumentsToBundle, mapReferralToBundle } from '../../src/mapping/bundle';
import { loadFhirDefinitions } from '../../src/mapping/definitions';
import { FIXTURE_DESTINATION, FIXTURES_DIR } from '../../src/mapping/regenerate-fixtures';
import { validateBundle } from '../../src/mapping/validate';
import { type Referral, documentSchema, referralSchema } from '../../src/model';
import { pathToExpression } from '../../src/outcomes';

/**
 * Imaging studies (issue 13 point 3): a document of kind imaging-study with a `study` (a DICOMweb reference alone, or
 * the description of DICOM bytes) becomes an ImagingStudy (+ the Endpoint of its WADO-RS server) in the transaction,
 * listed in ServiceRequest.supportingInfo and Task.input; the FHIR bundle intake reads it back.
 */

type Json = Record<string, any>;

const CREATED_AT = '2026-10-01T09:00:00.000Z';
const UID = '1.2.826.0.1.3680043.8.498.12345';
const PACS = 'https://pacs.uh.example.org/dicom-web';

const DICOMWEB = {
  kind: 'imaging-study',
  title: 'Staging CT chest/abdomen/pelvis',
  date: '2026-09-02',
  contentType: 'application/dicom',
  study: {
    endpoint: PACS,
    studyInstanceUid: UID,
    modalities: ['CT', 'PT'],
    seriesCount: 4,
    instanceCount: 812,
    description: 'PET-CT whole body',
    started: '2026-09-02T08:15:00Z',
  },
};

/** One small DICOM file inline, described by its study (no endpoint: the bytes are the study). */
const DICOM_BYTES = {
  kind: 'imaging-study',
  title: 'Key image (DICOM)',
  contentType: 'application/dicom',
  data: Buffer.from('DICM-not-really').toString('base64'),
  study: { studyInstanceUid: '1.2.3.4.5.6', modalities: ['MR'], seriesCount: 1 },
};

function referralJson(documents: unknown[]): Json {
  const r = JSON.parse(readFileSync(join(FIXTURES_DIR, 'referrals', 'sarcoma-expert-opinion.json'), 'utf8')) as Json;
  r.documents = documents;
  return r;
}

function referral(documents: unknown[]): Referral {
  return referralSchema.parse(referralJson(documents));
}

function map(r: Referral, referralId = 'ref_imaging'): Bundle {
  return mapReferralToBundle({ referralId, clientId: 'dev', referral: r, destination: FIXTURE_DESTINATION, createdAt: CREATED_AT });
}

function resources<T extends Resource>(bundle: Bundle, type: T['resourceType']): T[] {
  return (bundle.entry ?? []).map((e) => e.resource).filter((r): r is T => r?.resourceType === type);
}

function fullUrlOf(bundle: Bundle, resource: Resource): string | undefined {
  return (bundle.entry ?? []).find((e) => e.resource === resource)?.fullUrl;
}

function entryOf(bundle: Bundle, resource: Resource): NonNullable<Bundle['entry']>[number] | undefined {
  return (bundle.entry ?? []).find((e) => e.resource === resource);
}

/** The issues documentSchema gives, as `expression: message`. */
function issues(doc: unknown): string[] {
  const p = documentSchema.safeParse(doc);
  return p.success ? [] : p.error.issues.map((i) => `${pathToExpression(i.path)}: ${i.message}`);
}

beforeAll(() => {
  loadFhirDefinitions();
});

describe('the document schema: study', () => {
  test('a DICOMweb reference (study alone, with its endpoint) and DICOM bytes with their study are accepted', () => {
    expect(issues(DICOMWEB)).toEqual([]);
    expect(issues(DICOM_BYTES)).toEqual([]);
    expect(issues({ ...DICOM_BYTES, data: undefined, contentType: 'application/zip', upload: true })).toEqual([]);
    expect(issues({ ...DICOM_BYTES, data: undefined, file: 'ct-study' })).toEqual([]);
    // A study with a date only as its start, and DICOM without any study (as before: a plain document).
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, started: '2026-09-02' } })).toEqual([]);
    expect(issues({ kind: 'imaging-study', title: 'CT', contentType: 'application/dicom', url: `${PACS}/studies/${UID}` })).toEqual([]);
  });

  test('a bad Study Instance UID is refused, naming the field', () => {
    for (const uid of ['urn:oid:1.2.3', '1.2.03', '1..2', '1', 'abc', `1.${'2'.repeat(63)}`]) {
      expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, studyInstanceUid: uid } })).toEqual([
        expect.stringMatching(/^study\.studyInstanceUid: must be a DICOM UID/),
      ]);
    }
  });

  test('a study on another kind than imaging-study is refused at study', () => {
    expect(issues({ ...DICOMWEB, kind: 'imaging-report' })).toEqual(['study: is only allowed for kind imaging-study (got imaging-report)']);
    expect(issues({ ...DICOM_BYTES, kind: 'pathology-report' })).toEqual(['study: is only allowed for kind imaging-study (got pathology-report)']);
  });

  test('a DICOMweb reference without its endpoint is refused at study.endpoint', () => {
    const { endpoint: _e, ...noEndpoint } = DICOMWEB.study;
    expect(issues({ ...DICOMWEB, study: noEndpoint })).toEqual([expect.stringMatching(/^study\.endpoint: is required when the study is the only source/)]);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, endpoint: 'ftp://pacs.example.org/' } })).toEqual([
      expect.stringMatching(/^study\.endpoint: must be an http\(s\) URL/),
    ]);
  });

  test('the content type must be DICOM when a study describes the document; modalities and counts are checked', () => {
    expect(issues({ ...DICOM_BYTES, contentType: 'application/pdf' })).toEqual([
      expect.stringMatching(/^contentType: must be application\/dicom or application\/zip/),
    ]);
    expect(issues({ ...DICOMWEB, contentType: 'application/zip' })).toEqual([expect.stringMatching(/^contentType: must be application\/dicom for a DICOMweb/)]);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, modalities: ['CAT'] } })[0]).toMatch(/^study\.modalities\[0\]: /);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, modalities: [] } })).toEqual([expect.stringMatching(/^study\.modalities: at least one/)]);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, modalities: ['CT', 'CT'] } })).toEqual(['study.modalities: lists a modality twice']);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, seriesCount: 0 } })[0]).toMatch(/^study\.seriesCount: /);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, instanceCount: 2 } })).toEqual([
      expect.stringMatching(/^study\.instanceCount: is smaller than seriesCount/),
    ]);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, started: '2999-01-01T00:00:00Z' } })).toEqual(['study.started: is in the future']);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, started: '2026-09-02T08:15' } })[0]).toMatch(/^study\.started: must be a date/);
    expect(issues({ ...DICOMWEB, study: { ...DICOMWEB.study, accession: 'A1' } })[0]).toMatch(/^study: /);
  });

  test('still exactly one byte source; none at all names the study as the fifth choice', () => {
    expect(issues({ ...DICOM_BYTES, url: 'https://x.example.org/a.dcm' })).toEqual([
      'data: exactly one of data, url, file or upload is allowed (got data, url)',
    ]);
    const { data: _d, study: _s, ...none } = DICOM_BYTES;
    expect(issues(none)).toEqual(['data: one of data (base64), url, file (a multipart part), upload (true) or study (a DICOMweb reference) is required']);
  });
});

describe('mapping: ImagingStudy and Endpoint in the transaction', () => {
  test('a DICOMweb reference becomes an ImagingStudy with its Endpoint, listed in supportingInfo and Task.input', () => {
    const bundle = map(referral([DICOMWEB]));
    expect(validateBundle(bundle)).toEqual([]);
    const [study] = resources<ImagingStudy>(bundle, 'ImagingStudy');
    const [endpoint] = resources<Endpoint>(bundle, 'Endpoint');
    expect(study).toMatchObject({
      status: 'available',
      identifier: [{ system: 'urn:dicom:uid', value: `urn:oid:${UID}` }],
      modality: [
        { system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'CT', display: 'Computed Tomography' },
        { system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'PT', display: 'Positron emission tomography' },
      ],
      numberOfSeries: 4,
      numberOfInstances: 812,
      started: '2026-09-02T08:15:00Z',
      description: 'PET-CT whole body',
      endpoint: [{ reference: fullUrlOf(bundle, endpoint) }],
    });
    const patient = resources(bundle, 'Patient')[0];
    expect(study.subject).toEqual({ reference: fullUrlOf(bundle, patient) });
    expect(entryOf(bundle, study)?.request).toEqual({ method: 'POST', url: 'ImagingStudy', ifNoneExist: `identifier=urn:dicom:uid|urn:oid:${UID}` });

    expect(endpoint).toMatchObject({
      status: 'active',
      connectionType: { system: 'http://terminology.hl7.org/CodeSystem/endpoint-connection-type', code: 'dicom-wado-rs' },
      payloadType: [{ text: 'DICOM WADO-RS' }],
      payloadMimeType: ['application/dicom'],
      address: PACS,
      identifier: [{ system: 'https://referral-gateway.dev/fhir/sid/endpoint', value: PACS }],
    });
    expect(entryOf(bundle, endpoint)?.request?.ifNoneExist).toBe(`identifier=https://referral-gateway.dev/fhir/sid/endpoint|${PACS}`);

    // The ServiceRequest lists the ImagingStudy right after the document; so does the Task.
    const sr = resources<ServiceRequest>(bundle, 'ServiceRequest')[0];
    const [doc] = resources<DocumentReference>(bundle, 'DocumentReference');
    const refs = (sr.supportingInfo ?? []).map((r) => r.reference);
    expect(refs.slice(-2)).toEqual([fullUrlOf(bundle, doc), fullUrlOf(bundle, study)]);
    const task = resources<Task>(bundle, 'Task')[0];
    expect((task.input ?? []).map((i) => i.valueReference?.reference)).toEqual([fullUrlOf(bundle, doc), fullUrlOf(bundle, study)]);

    // The document itself: the study's WADO-RS URL, related to the ServiceRequest and to the ImagingStudy.
    expect(doc.content[0].attachment).toMatchObject({ contentType: 'application/dicom', url: `${PACS}/studies/${UID}`, title: DICOMWEB.title });
    expect(doc.context?.related).toEqual([{ reference: fullUrlOf(bundle, sr) }, { reference: fullUrlOf(bundle, study) }]);
  });

  test('DICOM bytes keep their DocumentReference (inline data) and get an ImagingStudy without an Endpoint', () => {
    const bundle = map(referral([DICOM_BYTES]));
    expect(validateBundle(bundle)).toEqual([]);
    const [doc] = resources<DocumentReference>(bundle, 'DocumentReference');
    expect(doc.content[0].attachment).toMatchObject({ contentType: 'application/dicom', data: DICOM_BYTES.data, size: 15 });
    const [study] = resources<ImagingStudy>(bundle, 'ImagingStudy');
    expect(study.identifier).toEqual([{ system: 'urn:dicom:uid', value: 'urn:oid:1.2.3.4.5.6' }]);
    expect(study.endpoint).toBeUndefined();
    expect(study.numberOfInstances).toBeUndefined();
    expect(resources(bundle, 'Endpoint')).toEqual([]);
    // A document sent as a raw Binary (attachmentUrls) keeps its study the same way.
    const raw = mapReferralToBundle({
      referralId: 'ref_imaging',
      clientId: 'dev',
      referral: referral([DICOM_BYTES]),
      destination: FIXTURE_DESTINATION,
      createdAt: CREATED_AT,
      attachmentUrls: { 0: 'Binary/77' },
    });
    expect(resources<DocumentReference>(raw, 'DocumentReference')[0].content[0].attachment.url).toBe('Binary/77');
    expect(resources(raw, 'ImagingStudy')).toHaveLength(1);
  });

  test('one PACS is one Endpoint; one study sent twice is one ImagingStudy, listed once', () => {
    const other = { ...DICOMWEB, title: 'MRI', study: { ...DICOMWEB.study, studyInstanceUid: '1.2.3.99', modalities: ['MR'] } };
    const zip = { kind: 'imaging-study', title: 'CT as zip', contentType: 'application/zip', url: 'https://ehr.example.org/ct.zip', study: DICOMWEB.study };
    const bundle = map(referral([DICOMWEB, other, zip]));
    expect(validateBundle(bundle)).toEqual([]);
    expect(resources(bundle, 'Endpoint')).toHaveLength(1);
    expect(resources(bundle, 'ImagingStudy')).toHaveLength(2);
    expect(resources(bundle, 'DocumentReference')).toHaveLength(3);
    const sr = resources<ServiceRequest>(bundle, 'ServiceRequest')[0];
    const refs = (sr.supportingInfo ?? []).map((r) => r.reference);
    expect(new Set(refs).size).toBe(refs.length);
    expect(refs.filter((r) => (bundle.entry ?? []).find((e) => e.fullUrl === r)?.resource?.resourceType === 'ImagingStudy')).toHaveLength(2);
  });

  test('is deterministic, and a server that already holds the study, the Endpoint and the referral creates nothing new', async () => {
    const r = referral([DICOMWEB, DICOM_BYTES]);
    const bundle = map(r);
    expect(JSON.stringify(map(r))).toBe(JSON.stringify(bundle));
    const router = new FhirRouter();
    const repo = new MemoryRepository();
    const post = async (body: Bundle): Promise<Bundle> => {
      const [outcome, result] = await router.handleRequest({ method: 'POST', url: '/', pathname: '', query: {}, params: {}, body }, repo);
      expect(outcome.issue?.[0]?.severity).toBe('information');
      return result as Bundle;
    };
    const first = await post(bundle);
    expect(first.entry?.map((e) => e.response?.status)).toEqual(bundle.entry?.map(() => '201'));
    const second = await post(bundle);
    expect(second.entry?.map((e) => e.response?.status)).toEqual(bundle.entry?.map(() => '200'));
    const studies = await repo.searchResources<ImagingStudy>({ resourceType: 'ImagingStudy', filters: [] });
    expect(studies).toHaveLength(2);
    const sr = (await repo.searchResources<ServiceRequest>({ resourceType: 'ServiceRequest', filters: [] }))[0];
    for (const s of studies) expect(sr.supportingInfo?.map((x) => x.reference)).toContain(`ImagingStudy/${s.id}`);
    const endpoints = await repo.searchResources<Endpoint>({ resourceType: 'Endpoint', filters: [] });
    expect(endpoints).toHaveLength(1);
    expect(studies.find((s) => s.identifier?.[0].value === `urn:oid:${UID}`)?.endpoint).toEqual([{ reference: `Endpoint/${endpoints[0].id}` }]);

    // Another referral of the same patient with the same study (same PACS): the ImagingStudy and Endpoint are reused.
    const again = await post(map(referral([DICOMWEB]), 'ref_imaging_2'));
    expect(again.entry?.filter((e) => /^(ImagingStudy|Endpoint)\//.test(e.response?.location ?? '')).map((e) => e.response?.status)).toEqual(['200', '200']);
    expect(await repo.searchResources({ resourceType: 'ImagingStudy', filters: [] })).toHaveLength(2);
  });

  test('documents added later: the ImagingStudy names the centre Patient and the document relates to it', () => {
    const bundle = mapAddedDocumentsToBundle({
      referralId: 'ref_imaging',
      referral: referral([]),
      documents: referral([DICOMWEB]).documents,
      startIndex: 3,
      serviceRequestRef: 'ServiceRequest/12',
      patientRef: 'Patient/45',
      destination: FIXTURE_DESTINATION,
      addedAt: CREATED_AT,
    });
    expect(validateBundle(bundle)).toEqual([]);
    const [study] = resources<ImagingStudy>(bundle, 'ImagingStudy');
    expect(study.subject).toEqual({ reference: 'Patient/45' });
    const [doc] = resources<DocumentReference>(bundle, 'DocumentReference');
    expect(doc.identifier?.[0].value).toBe('ref_imaging/document/4');
    expect(doc.context?.related).toEqual([{ reference: 'ServiceRequest/12' }, { reference: fullUrlOf(bundle, study) }]);
    expect(resources(bundle, 'Endpoint')).toHaveLength(1);
  });
});

describe('FHIR bundle intake: ImagingStudy read back as an imaging-study document', () => {
  test('round trip: the mapped bundle reads back as the same documents (DICOMweb reference, DICOM bytes, a zip by URL)', () => {
    const zip = {
      kind: 'imaging-study',
      title: 'CT as zip',
      contentType: 'application/zip',
      url: 'https://ehr.example.org/ct.zip',
      study: { ...DICOMWEB.study, studyInstanceUid: '1.2.3.7' },
    };
    const r = referral([DICOMWEB, DICOM_BYTES, zip]);
    const reading = readReferralBundle(JSON.parse(JSON.stringify(map(r))));
    expect(reading.issues).toEqual([]);
    const back = referralSchema.parse(reading.referral);
    expect(back.documents).toEqual(r.documents);
    expect(reading.locate('documents[0].study.studyInstanceUid')).toMatch(/^Bundle\.entry\[\d+\]\.resource\.identifier\[0\]\.value$/);
    expect(reading.locate('documents[0].study.endpoint')).toMatch(/^Bundle\.entry\[\d+\]\.resource\.address$/);
  });

  test("an EHR's ImagingStudy in supportingInfo, with no DocumentReference, is a DICOMweb reference", () => {
    const b = JSON.parse(JSON.stringify(map(referral([DICOMWEB])))) as Json;
    // Drop the DocumentReference: the EHR sent the ImagingStudy (series-level modality only) and its Endpoint.
    const docUrl = (b.entry as Json[]).find((e) => e.resource.resourceType === 'DocumentReference')?.fullUrl;
    b.entry = (b.entry as Json[]).filter((e) => e.fullUrl !== docUrl);
    for (const e of b.entry as Json[]) {
      const res = e.resource;
      if (res.resourceType === 'ServiceRequest') res.supportingInfo = res.supportingInfo.filter((s: Json) => s.reference !== docUrl);
      if (res.resourceType === 'Task') res.input = res.input.filter((i: Json) => i.valueReference.reference !== docUrl);
      if (res.resourceType === 'ImagingStudy') {
        delete res.modality;
        res.series = [
          { uid: '1.2.3.1', modality: { system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'CT' } },
          { uid: '1.2.3.2', modality: { system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'PT' } },
          { uid: '1.2.3.3', modality: { system: 'http://dicom.nema.org/resources/ontology/DCM', code: 'CT' } },
        ];
        delete res.numberOfSeries;
      }
    }
    const reading = readReferralBundle(b);
    expect(reading.issues).toEqual([]);
    const back = referralSchema.parse(reading.referral);
    expect(back.documents).toEqual([
      {
        kind: 'imaging-study',
        title: 'PET-CT whole body',
        date: '2026-09-02',
        contentType: 'application/dicom',
        study: { ...DICOMWEB.study, seriesCount: 3 },
      },
    ]);
  });
});
