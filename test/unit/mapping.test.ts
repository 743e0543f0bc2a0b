import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import type {
  Bundle,
  BundleEntry,
  Condition,
  DocumentReference,
  Identifier,
  Consent,
  MedicationStatement,
  Observation,
  Patient,
  Procedure,
  Resource,
  ServiceRequest,
  Task,
} from '@medplum/fhirtypes';
import type { Destination } from '../../src/config/destinations';
import { type Referral, type ReferralInput, referralSchema } from '../../src/model';
import { GATEWAY_TAG } from '../../src/mapping/constants';
import {
  base64ByteLength,
  identifierQuery,
  inlineDocumentsOverLimit,
  mapAddedDocumentsToBundle,
  mapReferralToBundle,
  serviceRequestWithDocuments,
  taskWithDocuments,
} from '../../src/mapping/bundle';
import { bundleForFixture, bundlePath, FIXTURE_CREATED_AT, FIXTURE_DESTINATION, FIXTURES_DIR, fixtureNames } from '../../src/mapping/regenerate-fixtures';
import { loadFhirDefinitions } from '../../src/mapping/definitions';
import { collectReferences, validateBundle } from '../../src/mapping/validate';

// The golden bundles in fixtures/fhir are written by src/mapping/regenerate-fixtures.ts: map the fixtures with
// its destination, time and function, so the test and the generator cannot drift apart.
const CREATED_AT = FIXTURE_CREATED_AT;
const SANDBOX: Destination = FIXTURE_DESTINATION;
const SCT = 'http://snomed.info/sct';
const PLAC = { system: 'http://terminology.hl7.org/CodeSystem/v2-0203', code: 'PLAC', display: 'Placer Identifier' };

const FIXTURE_NAMES = fixtureNames();

function loadReferral(name: string): Referral {
  return referralSchema.parse(JSON.parse(readFileSync(join(FIXTURES_DIR, 'referrals', `${name}.json`), 'utf8')));
}

function rawReferral(name: string): ReferralInput {
  return JSON.parse(readFileSync(join(FIXTURES_DIR, 'referrals', `${name}.json`), 'utf8')) as ReferralInput;
}

const mapFixture = bundleForFixture;

function map(referral: Referral, referralId = 'ref_test'): Bundle {
  return mapReferralToBundle({ referralId, clientId: 'dev', referral, destination: SANDBOX, createdAt: CREATED_AT });
}

function resources<T extends Resource>(bundle: Bundle, type: T['resourceType']): T[] {
  return (bundle.entry ?? []).map((e) => e.resource).filter((r): r is T => r?.resourceType === type);
}

function one<T extends Resource>(bundle: Bundle, type: T['resourceType']): T {
  const all = resources<T>(bundle, type);
  expect(all).toHaveLength(1);
  return all[0];
}

function fullUrlOf(bundle: Bundle, resource: Resource): string {
  const entry = (bundle.entry ?? []).find((e) => e.resource === resource);
  if (!entry?.fullUrl) {
    throw new Error('resource not in bundle');
  }
  return entry.fullUrl;
}

function byFullUrl(bundle: Bundle, ref: string | undefined): Resource | undefined {
  return (bundle.entry ?? []).find((e) => e.fullUrl === ref)?.resource;
}

function hasTag(r: Resource): boolean {
  return (r.meta?.tag ?? []).some((t) => t.system === GATEWAY_TAG.system && t.code === GATEWAY_TAG.code);
}

function identifiersOf(r: Resource): Identifier[] {
  return ((r as { identifier?: Identifier[] }).identifier ?? []).filter((i) => i.system && i.value);
}

/** A referral with only the required fields (no stage, treatments, documents, reasons or questions). */
function minimalReferral(): Referral {
  return referralSchema.parse({
    externalId: 'MIN-1',
    kind: 'second-opinion',
    patient: {
      identifiers: [{ system: 'urn:oid:2.16.840.1.113883.19.5', value: 'MRN-1' }],
      name: { given: ['Ana'], family: 'Silva' },
      birthDate: '1980-01-01',
      gender: 'female',
    },
    referrer: {
      practitioner: { identifier: { system: 'urn:oid:1.2.3', value: 'P1' }, name: { given: ['Jo'], family: 'Doe' } },
      organization: { identifier: { system: 'urn:oid:1.2.4', value: 'O1' }, name: 'Clinic' },
    },
    diagnosis: { code: { system: 'http://hl7.org/fhir/sid/icd-10-cm', code: 'C50.911' } },
    consent: { patientAgreed: true, date: '2026-09-01' },
  });
}

beforeAll(() => {
  loadFhirDefinitions();
});

describe('fixtures', () => {
  test('there are the six fixture referrals, each with an expected bundle', () => {
    expect(FIXTURE_NAMES).toEqual([
      'breast-second-opinion',
      'colorectal-second-opinion',
      'lung-expert-opinion',
      'paediatric-leukaemia',
      'sarcoma-expert-opinion',
      'tumour-board-many-documents',
    ]);
    const expected = readdirSync(join(FIXTURES_DIR, 'fhir')).filter((f) => f.endsWith('.bundle.json'));
    expect(expected.sort()).toEqual(FIXTURE_NAMES.map((n) => `${n}.bundle.json`));
  });

  test('the breast fixture is the contract example with histology 82711006 and no destination', () => {
    const r = rawReferral('breast-second-opinion');
    expect(r.destination).toBeUndefined();
    expect(r.externalId).toBe('EHR-2026-000123');
    expect(r.diagnosis.histology).toEqual({ system: SCT, code: '82711006', display: 'Infiltrating duct carcinoma' });
    expect(r.documents?.[0].data?.length).toBeGreaterThan(400);
    expect(
      Buffer.from(r.documents?.[0].data ?? '', 'base64')
        .subarray(0, 5)
        .toString()
    ).toBe('%PDF-');
    expect(r.documents?.[1].url).toBe('https://ehr.example.org/docs/77');
  });

  test('the tumour board fixture has 8+ documents covering every document kind', () => {
    const docs = rawReferral('tumour-board-many-documents').documents ?? [];
    expect(docs.length).toBeGreaterThanOrEqual(8);
    expect(new Set(docs.map((d) => d.kind)).size).toBe(9);
  });

  test.each(FIXTURE_NAMES)('%s keeps every inline document under 10 KB', (name) => {
    for (const d of rawReferral(name).documents ?? []) {
      if (d.data) {
        expect(Buffer.from(d.data, 'base64').length).toBeLessThan(10 * 1024);
      }
    }
  });
});

describe.each(FIXTURE_NAMES)('bundle for %s', (name) => {
  let bundle: Bundle;
  let referral: Referral;
  beforeAll(() => {
    referral = loadReferral(name);
    bundle = mapFixture(name);
  });

  test('equals the golden bundle in fixtures/fhir', () => {
    const expected = JSON.parse(readFileSync(bundlePath(name), 'utf8')) as Bundle;
    expect(bundle).toEqual(expected);
  });

  test('validates against the FHIR R4 definitions with no errors and no warnings beyond urn:uuid reference targets', () => {
    expect(validateBundle(bundle)).toEqual([]);
    expect(validateBundle(bundle, { includeWarnings: true })).toEqual([]);
  });

  test('is a transaction whose fullUrls are unique lower-case urn:uuids and whose references all resolve', () => {
    expect(bundle.type).toBe('transaction');
    const urls = (bundle.entry ?? []).map((e) => e.fullUrl);
    for (const u of urls) {
      expect(u).toMatch(/^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    }
    expect(new Set(urls).size).toBe(urls.length);
    const refs = (bundle.entry ?? []).flatMap((e) => collectReferences(e.resource));
    expect(refs.length).toBeGreaterThan(10);
    for (const ref of refs) {
      expect(urls).toContain(ref);
    }
  });

  test('every entry is a conditional create on one of its own identifiers', () => {
    for (const e of bundle.entry ?? []) {
      const r = e.resource as Resource;
      expect(e.request?.method).toBe('POST');
      expect(e.request?.url).toBe(r.resourceType);
      expect(e.request?.ifNoneExist).toMatch(/^identifier=[^|]+\|.+$/);
      const queries = identifiersOf(r).map((i) => identifierQuery(i.system as string, i.value as string));
      expect(queries).toContain(e.request?.ifNoneExist);
    }
  });

  test('no resource type + identifier appears twice', () => {
    const seen = new Set<string>();
    for (const e of bundle.entry ?? []) {
      const r = e.resource as Resource;
      for (const i of identifiersOf(r)) {
        const key = `${r.resourceType}|${i.system}|${i.value}`;
        expect(seen.has(key)).toBe(false);
        seen.add(key);
      }
    }
    expect(seen.size).toBeGreaterThanOrEqual((bundle.entry ?? []).length);
  });

  test('is deterministic: mapping again gives byte-identical JSON', () => {
    expect(JSON.stringify(mapFixture(name))).toBe(JSON.stringify(bundle));
  });

  test('has one of each referral resource and never drops documents or treatments', () => {
    one(bundle, 'Patient');
    one(bundle, 'Practitioner');
    one(bundle, 'PractitionerRole');
    one(bundle, 'Condition');
    one(bundle, 'Consent');
    one(bundle, 'ServiceRequest');
    one(bundle, 'Task');
    expect(resources(bundle, 'Organization')).toHaveLength(2);
    expect(resources(bundle, 'Observation')).toHaveLength(referral.diagnosis.stage ? 1 : 0);
    expect(resources(bundle, 'DocumentReference')).toHaveLength(referral.documents.length);
    expect(resources(bundle, 'Procedure').length + resources(bundle, 'MedicationStatement').length).toBe(referral.treatmentHistory.length);
    const gatewayCreated = ['Condition', 'Observation', 'Consent', 'Procedure', 'MedicationStatement', 'DocumentReference', 'ServiceRequest', 'Task'];
    for (const e of bundle.entry ?? []) {
      const r = e.resource as Resource;
      expect(`${r.resourceType}:${hasTag(r)}`).toBe(`${r.resourceType}:${gatewayCreated.includes(r.resourceType)}`);
    }
  });

  test('ServiceRequest carries the referral: codes, reasons, links, identifiers, questions', () => {
    const sr = one<ServiceRequest>(bundle, 'ServiceRequest');
    const srUrl = fullUrlOf(bundle, sr);
    expect(sr).toMatchObject({ status: 'active', intent: 'order', priority: referral.priority, authoredOn: CREATED_AT });
    expect(sr.category?.[0].coding?.[0]).toMatchObject({ system: SCT, code: '3457005' });
    expect(sr.code?.coding?.[0].system).toBe(SCT);
    expect(['103696004', '44383000']).toContain(sr.code?.coding?.[0].code);
    expect(sr.reasonCode?.[0].coding?.[0]).toMatchObject({ system: 'http://terminology.hl7.org/CodeSystem/v2-0336', code: 'S' });
    expect(sr.reasonCode?.every((c) => typeof c.text === 'string' && c.text.length > 0)).toBe(true);
    expect(sr.reasonCode).toHaveLength(1 + new Set(referral.reasons).size + (referral.reasonText ? 1 : 0));
    expect(sr.identifier?.[0]).toEqual({ type: { coding: [PLAC] }, system: 'https://referral-gateway.dev/fhir/sid/referral', value: `ref_fixture_${name}` });
    expect(sr.identifier?.[1]).toMatchObject({ system: 'https://referral-gateway.dev/fhir/sid/client/dev/external-id', value: referral.externalId });
    expect(byFullUrl(bundle, sr.subject?.reference)?.resourceType).toBe('Patient');
    expect(byFullUrl(bundle, sr.requester?.reference)?.resourceType).toBe('PractitionerRole');
    expect(byFullUrl(bundle, sr.performer?.[0].reference)).toMatchObject({ resourceType: 'Organization', name: SANDBOX.name });
    expect(byFullUrl(bundle, sr.reasonReference?.[0].reference)?.resourceType).toBe('Condition');
    const supporting = (sr.supportingInfo ?? []).map((s) => s.reference);
    for (const r of [
      ...resources(bundle, 'DocumentReference'),
      ...resources(bundle, 'Consent'),
      ...resources(bundle, 'Observation'),
      ...resources(bundle, 'Procedure'),
      ...resources(bundle, 'MedicationStatement'),
    ]) {
      expect(supporting).toContain(fullUrlOf(bundle, r));
    }
    expect((sr.note ?? []).map((n) => n.text)).toEqual(referral.questions.map((q) => `Question from the patient: ${q}`));
    for (const d of resources<DocumentReference>(bundle, 'DocumentReference')) {
      expect(d.context?.related?.[0].reference).toBe(srUrl);
    }
  });

  test('Task is the tagged, requested fulfil-order for the ServiceRequest, owned by the centre', () => {
    const task = one<Task>(bundle, 'Task');
    const srUrl = fullUrlOf(bundle, one(bundle, 'ServiceRequest'));
    expect(task).toMatchObject({ status: 'requested', intent: 'order', priority: referral.priority, authoredOn: CREATED_AT });
    expect(task.code?.coding?.[0]).toMatchObject({ system: 'http://hl7.org/fhir/CodeSystem/task-code', code: 'fulfill' });
    expect(task.meta?.tag).toEqual([GATEWAY_TAG]);
    expect(task.focus?.reference).toBe(srUrl);
    expect(task.basedOn?.[0].reference).toBe(srUrl);
    expect(byFullUrl(bundle, task.for?.reference)?.resourceType).toBe('Patient');
    expect(byFullUrl(bundle, task.requester?.reference)?.resourceType).toBe('PractitionerRole');
    expect(byFullUrl(bundle, task.owner?.reference)).toMatchObject({ resourceType: 'Organization', identifier: [SANDBOX.organization] });
    expect(task.identifier).toEqual([{ type: { coding: [PLAC] }, system: 'https://referral-gateway.dev/fhir/sid/referral', value: `ref_fixture_${name}` }]);
    const inputs = (task.input ?? []).map((i) => i.valueReference?.reference);
    expect(inputs).toEqual(resources(bundle, 'DocumentReference').map((d) => fullUrlOf(bundle, d)));
    for (const i of task.input ?? []) {
      expect(i.type.text).toBe('Additional content');
    }
  });

  test('each DocumentReference has LOINC type, clinical-note category, and inline data with correct size and SHA-1 hash', () => {
    const docs = resources<DocumentReference>(bundle, 'DocumentReference');
    docs.forEach((d, i) => {
      const src = referral.documents[i];
      expect(d).toMatchObject({ status: 'current', docStatus: 'final', date: CREATED_AT, description: src.title });
      expect(d.identifier?.[0]).toMatchObject({ system: 'https://referral-gateway.dev/fhir/sid/document', value: `ref_fixture_${name}/document/${i + 1}` });
      expect(d.category?.[0].coding?.[0].code).toBe('clinical-note');
      expect(d.type?.coding?.at(-1)?.code).toBe(src.kind);
      if (src.kind !== 'other') {
        expect(d.type?.coding?.[0].system).toBe('http://loinc.org');
      }
      expect(byFullUrl(bundle, d.subject?.reference)?.resourceType).toBe('Patient');
      const a = d.content[0].attachment;
      expect(a.contentType).toBe(src.contentType);
      expect(a.title).toBe(src.title);
      if (src.data) {
        const bytes = Buffer.from(src.data, 'base64');
        expect(a.data).toBe(src.data);
        expect(a.url).toBeUndefined();
        expect(a.size).toBe(bytes.length);
        expect(a.hash).toBe(createHash('sha1').update(bytes).digest('base64'));
      } else {
        expect(a.url).toBe(src.url);
        expect(a.data).toBeUndefined();
        expect(a.size).toBeUndefined();
      }
    });
  });

  test('Condition has the mCODE primary-cancer shape', () => {
    const c = one<Condition>(bundle, 'Condition');
    const dx = referral.diagnosis;
    expect(c.code?.coding?.[0]).toMatchObject({ system: dx.code.system, code: dx.code.code });
    expect(c.verificationStatus?.coding?.[0].code).toBe('confirmed');
    expect(c.clinicalStatus?.coding?.[0].code).toBe(dx.clinicalStatus);
    expect(c.onsetDateTime).toBe(dx.diagnosedOn);
    const histology = c.extension?.find((x) => x.url === 'http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-histology-morphology-behavior');
    expect(histology?.valueCodeableConcept?.coding?.[0].code).toBe(dx.histology?.code);
    if (dx.bodySite) {
      expect(c.bodySite?.[0].coding?.[0].code).toBe(dx.bodySite.code);
    }
    const laterality = c.bodySite?.[0].extension?.find((x) => x.url === 'http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-laterality-qualifier');
    expect(laterality?.valueCodeableConcept?.coding?.[0].code).toBe(
      dx.laterality ? { left: '7771000', right: '24028007', bilateral: '51440002' }[dx.laterality] : undefined
    );
    if (dx.stage) {
      const obs = one<Observation>(bundle, 'Observation');
      expect(c.stage?.[0].assessment?.[0].reference).toBe(fullUrlOf(bundle, obs));
      expect(obs.focus?.[0].reference).toBe(fullUrlOf(bundle, c));
      expect(obs.method?.coding?.[0]).toMatchObject({
        system: SCT,
        code: { 'AJCC-8': '897275008', 'AJCC-7': '443830009', 'AJCC-9': '1269566009' }[dx.stage.system],
      });
      expect(obs.valueCodeableConcept?.text).toContain(dx.stage.value.toUpperCase());
      const coded = obs.valueCodeableConcept?.coding?.[0]?.code;
      expect(coded).toBe({ IIB: '1222769001', IIIC: '1222806003' }[dx.stage.value.toUpperCase()]);
      expect(c.stage?.[0].summary).toEqual(obs.valueCodeableConcept);
    } else {
      expect(c.stage).toBeUndefined();
    }
  });

  test('treatment history becomes Procedure or MedicationStatement, in order, each linked to the Condition', () => {
    const conditionUrl = fullUrlOf(bundle, one(bundle, 'Condition'));
    const treatments = (bundle.entry ?? [])
      .map((e) => e.resource as Resource)
      .filter((r): r is Procedure | MedicationStatement => r.resourceType === 'Procedure' || r.resourceType === 'MedicationStatement');
    expect(treatments.map((t) => (t.resourceType === 'Procedure' ? t.code?.text : t.medicationCodeableConcept?.text))).toEqual(
      referral.treatmentHistory.map((t) => t.description)
    );
    treatments.forEach((t, i) => {
      const drug = ['chemotherapy', 'immunotherapy', 'targeted-therapy', 'hormone-therapy'].includes(referral.treatmentHistory[i].type);
      expect(t.resourceType).toBe(drug ? 'MedicationStatement' : 'Procedure');
      expect(t.reasonReference?.[0].reference).toBe(conditionUrl);
    });
  });

  test('Consent records the patient agreement and the centre as recipient', () => {
    const consent = one<Consent>(bundle, 'Consent');
    expect(consent).toMatchObject({ status: 'active', dateTime: referral.consent.date, provision: { type: 'permit' } });
    expect(byFullUrl(bundle, consent.patient?.reference)?.resourceType).toBe('Patient');
    expect(byFullUrl(bundle, consent.provision?.actor?.[0].reference.reference)).toMatchObject({ name: SANDBOX.name });
  });

  test('Patient carries every EHR identifier typed MR; the conditional create uses the first', () => {
    const p = one<Patient>(bundle, 'Patient');
    expect(p.identifier?.map((i) => i.value)).toEqual(referral.patient.identifiers.map((i) => i.value));
    expect(p.identifier?.every((i) => i.type?.coding?.[0].code === 'MR')).toBe(true);
    const first = referral.patient.identifiers[0];
    const entry = (bundle.entry ?? []).find((e) => e.resource === p) as BundleEntry;
    expect(entry.request?.ifNoneExist).toBe(`identifier=${first.system}|${first.value}`);
  });

  test('contains no invented or refused SNOMED codes', () => {
    expect(JSON.stringify(bundle)).not.toMatch(/"(183618005|281036007|413448000)"/);
  });
});

describe('mapReferralToBundle options and edge cases', () => {
  test('a minimal referral maps to a valid bundle without stage, treatments or documents', () => {
    const bundle = map(minimalReferral());
    expect(validateBundle(bundle, { includeWarnings: true })).toEqual([]);
    expect(resources(bundle, 'Observation')).toEqual([]);
    expect(resources(bundle, 'DocumentReference')).toEqual([]);
    const task = one<Task>(bundle, 'Task');
    expect(task.input).toBeUndefined();
    const sr = one<ServiceRequest>(bundle, 'ServiceRequest');
    expect(sr.reasonCode).toHaveLength(1);
    expect(sr.note).toBeUndefined();
    expect(sr.performerType).toEqual({ text: 'Breast oncology' });
    expect((sr.supportingInfo ?? []).map((s) => byFullUrl(bundle, s.reference)?.resourceType)).toEqual(['Consent']);
  });

  test('the specialty from routing goes to ServiceRequest.performerType, by default from the first matching rule', () => {
    const sr = one<ServiceRequest>(mapFixture('sarcoma-expert-opinion'), 'ServiceRequest');
    expect(sr.performerType).toEqual({ text: 'Sarcoma' });
    const referral = loadReferral('sarcoma-expert-opinion');
    expect(one<ServiceRequest>(map(referral), 'ServiceRequest').performerType).toEqual({ text: 'Sarcoma' });
    const given = mapReferralToBundle({
      referralId: 'ref_t',
      clientId: 'dev',
      referral,
      destination: SANDBOX,
      createdAt: CREATED_AT,
      specialty: 'Orthopaedic oncology',
    });
    expect(one<ServiceRequest>(given, 'ServiceRequest').performerType).toEqual({ text: 'Orthopaedic oncology' });
    const unrouted = { ...minimalReferral(), diagnosis: { ...minimalReferral().diagnosis, code: { system: SCT, code: '372087000' } } };
    expect(one<ServiceRequest>(map(unrouted), 'ServiceRequest').performerType).toBeUndefined();
  });

  test('attachmentUrls replace inline data but keep size and hash', () => {
    const referral = loadReferral('breast-second-opinion');
    const bundle = mapReferralToBundle({
      referralId: 'ref_test',
      clientId: 'dev',
      referral,
      destination: SANDBOX,
      createdAt: CREATED_AT,
      attachmentUrls: { 0: 'Binary/abc' },
    });
    const [first, second] = resources<DocumentReference>(bundle, 'DocumentReference');
    const bytes = Buffer.from(referral.documents[0].data as string, 'base64');
    expect(first.content[0].attachment).toMatchObject({ url: 'Binary/abc', size: bytes.length, hash: createHash('sha1').update(bytes).digest('base64') });
    expect(first.content[0].attachment.data).toBeUndefined();
    expect(second.content[0].attachment.url).toBe(referral.documents[1].url);
    expect(validateBundle(bundle)).toEqual([]);
  });

  test('a consent without a date (the contract requires only the agreement) maps to a valid Consent without dateTime', () => {
    const raw = { ...minimalReferral(), consent: { patientAgreed: true } };
    const referral = referralSchema.parse(raw);
    expect(referral.consent).toEqual({ patientAgreed: true });
    const bundle = mapReferralToBundle({ referralId: 'ref_nodate', clientId: 'dev', referral, destination: SANDBOX, createdAt: CREATED_AT });
    const consent = one<Consent>(bundle, 'Consent');
    expect(consent.dateTime).toBeUndefined();
    expect(consent).toMatchObject({ status: 'active', provision: { type: 'permit' } });
    expect(validateBundle(bundle)).toEqual([]);
    // The agreement itself is still required.
    expect(referralSchema.safeParse({ ...raw, consent: { date: '2026-09-01' } }).success).toBe(false);
  });

  test('inlineDocumentsOverLimit names the documents to upload first', () => {
    const docs = loadReferral('tumour-board-many-documents').documents;
    const sizes = docs.map((d) => (d.data ? Buffer.from(d.data, 'base64').length : 0));
    for (const d of docs) {
      if (d.data) {
        expect(base64ByteLength(d.data)).toBe(Buffer.from(d.data, 'base64').length);
      }
    }
    expect(inlineDocumentsOverLimit(docs, 1_048_576)).toEqual([]);
    const limit = 500;
    expect(inlineDocumentsOverLimit(docs, limit)).toEqual(sizes.flatMap((s, i) => (s > limit ? [i] : [])));
    expect(inlineDocumentsOverLimit(docs, limit).length).toBeGreaterThan(2);
  });

  test('a different referral id gives different fullUrls and identifiers but the same clinical content', () => {
    const referral = loadReferral('lung-expert-opinion');
    const a = map(referral, 'ref_A');
    const b = map(referral, 'ref_B');
    const urlsA = new Set((a.entry ?? []).map((e) => e.fullUrl));
    expect((b.entry ?? []).some((e) => urlsA.has(e.fullUrl))).toBe(false);
    expect(one<Condition>(b, 'Condition').code).toEqual(one<Condition>(a, 'Condition').code);
    // Shared resources (patient, referrer, centre) are matched by the same business identifiers.
    expect(a.entry?.[0].request?.ifNoneExist).toBe(b.entry?.[0].request?.ifNoneExist);
    expect(one<Task>(b, 'Task').identifier?.[0].value).toBe('ref_B');
  });

  test('when the referring organisation is the destination organisation it appears once', () => {
    const referral = referralSchema.parse({
      ...rawReferral('breast-second-opinion'),
      referrer: {
        ...rawReferral('breast-second-opinion').referrer,
        organization: { identifier: { ...SANDBOX.organization }, name: 'Sandbox cancer centre' },
      },
    });
    const bundle = map(referral);
    const orgs = resources(bundle, 'Organization');
    expect(orgs).toHaveLength(1);
    const url = fullUrlOf(bundle, orgs[0]);
    expect(one<Task>(bundle, 'Task').owner?.reference).toBe(url);
    expect(one<ServiceRequest>(bundle, 'ServiceRequest').performer?.[0].reference).toBe(url);
    expect(validateBundle(bundle)).toEqual([]);
  });

  test('laterality without a body site still carries the laterality qualifier', () => {
    const raw = rawReferral('breast-second-opinion');
    delete raw.diagnosis.bodySite;
    raw.diagnosis.laterality = 'bilateral';
    const bundle = map(referralSchema.parse(raw));
    const site = one<Condition>(bundle, 'Condition').bodySite?.[0];
    expect(site?.coding).toBeUndefined();
    expect(site?.extension?.[0].valueCodeableConcept?.coding?.[0].code).toBe('51440002');
    expect(validateBundle(bundle)).toEqual([]);
  });

  test('an unknown stage value is still sent, as text only', () => {
    const raw = rawReferral('breast-second-opinion');
    raw.diagnosis.stage = { system: 'AJCC-7', value: 'IIIA' };
    const obs = one<Observation>(map(referralSchema.parse(raw)), 'Observation');
    expect(obs.valueCodeableConcept).toEqual({ text: 'Stage IIIA (AJCC 7th edition)' });
    expect(obs.method?.coding?.[0].code).toBe('443830009');
  });

  test('treatment status: ended or surgery -> completed, otherwise unknown', () => {
    const t = resources<Procedure>(mapFixture('sarcoma-expert-opinion'), 'Procedure');
    expect(t.map((p) => [p.status, p.performedPeriod?.start])).toEqual([['unknown', '2026-09-22']]);
    const ms = resources<MedicationStatement>(mapFixture('paediatric-leukaemia'), 'MedicationStatement');
    expect(ms.map((m) => m.status)).toEqual(['completed', 'completed', 'unknown']);
    const surgery = resources<Procedure>(mapFixture('breast-second-opinion'), 'Procedure')[0];
    expect(surgery).toMatchObject({ status: 'completed', performedDateTime: '2026-08-28' });
  });
});

describe('mapAddedDocumentsToBundle', () => {
  const referral = loadReferral('tumour-board-many-documents');
  const added = loadReferral('breast-second-opinion').documents;
  const input = {
    referralId: 'ref_fixture_tumour-board-many-documents',
    referral,
    documents: added,
    startIndex: 9,
    serviceRequestRef: 'ServiceRequest/123',
    patientRef: 'Patient/45',
    destination: SANDBOX,
  };

  test('creates one conditional DocumentReference per new document, numbered after the existing ones', () => {
    const bundle = mapAddedDocumentsToBundle(input);
    expect(bundle.type).toBe('transaction');
    const docs = resources<DocumentReference>(bundle, 'DocumentReference');
    expect(docs.map((d) => d.identifier?.[0].value)).toEqual([`${input.referralId}/document/10`, `${input.referralId}/document/11`]);
    for (const d of docs) {
      expect(d.context?.related).toEqual([{ reference: 'ServiceRequest/123' }]);
      expect(d.subject).toEqual({ reference: 'Patient/45' });
      expect(d.date).toBeUndefined();
      expect(byFullUrl(bundle, d.author?.[0].reference)).toMatchObject({ resourceType: 'Organization', name: 'City Hospital' });
    }
    expect(resources(bundle, 'Task')).toEqual([]);
    expect(resources(bundle, 'ServiceRequest')).toEqual([]);
    for (const e of bundle.entry ?? []) {
      expect(e.request?.ifNoneExist).toMatch(/^identifier=/);
    }
  });

  test('validates, is deterministic and uses the document numbers in its fullUrls', () => {
    const a = mapAddedDocumentsToBundle({ ...input, addedAt: '2026-10-05T10:00:00.000Z' });
    expect(validateBundle(a)).toEqual([]);
    expect(JSON.stringify(mapAddedDocumentsToBundle({ ...input, addedAt: '2026-10-05T10:00:00.000Z' }))).toBe(JSON.stringify(a));
    expect(resources<DocumentReference>(a, 'DocumentReference')[0].date).toBe('2026-10-05T10:00:00.000Z');
    // Document 10 of this referral can never collide with document 1..9 of the original bundle.
    const original = new Set(
      (mapFixture('tumour-board-many-documents').entry ?? []).filter((e) => e.resource?.resourceType === 'DocumentReference').map((e) => e.fullUrl)
    );
    for (const e of a.entry ?? []) {
      if (e.resource?.resourceType === 'DocumentReference') {
        expect(original.has(e.fullUrl)).toBe(false);
      }
    }
  });

  test('refuses references that are not plain relative references, and negative start indexes', () => {
    expect(() => mapAddedDocumentsToBundle({ ...input, serviceRequestRef: 'urn:uuid:x' })).toThrow(/serviceRequestRef/);
    expect(() => mapAddedDocumentsToBundle({ ...input, patientRef: 'Patient?identifier=x' })).toThrow(/patientRef/);
    expect(() => mapAddedDocumentsToBundle({ ...input, startIndex: -1 })).toThrow(/startIndex/);
  });
});

describe("listing documents added later on the centre's ServiceRequest and Task", () => {
  const bundle = mapFixture('breast-second-opinion');
  const task = resources<Task>(bundle, 'Task')[0];
  const sr = resources<ServiceRequest>(bundle, 'ServiceRequest')[0];
  // As the centre holds them: server ids, and a status the centre set.
  const atCentre: Task = { ...task, id: 't1', meta: { versionId: '3' }, status: 'in-progress', businessStatus: { text: 'Reviewing' } };

  test('Task: one input per new document, typed like the original inputs, keeping what the centre set', () => {
    const next = taskWithDocuments(atCentre, ['DocumentReference/9', 'DocumentReference/10', 'DocumentReference/9']) as Task;
    const inputs = next.input ?? [];
    expect(inputs).toHaveLength((task.input ?? []).length + 2);
    expect(inputs.slice(-2).map((i) => i.valueReference?.reference)).toEqual(['DocumentReference/9', 'DocumentReference/10']);
    expect(inputs.at(-1)?.type).toEqual(task.input?.[0].type);
    expect(next).toMatchObject({ id: 't1', meta: { versionId: '3' }, status: 'in-progress', businessStatus: { text: 'Reviewing' } });
    expect(next.lastModified).toBe(task.lastModified); // unchanged unless a time is given
    expect(taskWithDocuments(atCentre, ['DocumentReference/9'], '2026-11-25T10:00:00.000Z')?.lastModified).toBe('2026-11-25T10:00:00.000Z');
    expect(atCentre.input).toHaveLength((task.input ?? []).length); // the input is not modified
  });

  test('nothing to write when every document is already listed (a resend)', () => {
    const once = taskWithDocuments(atCentre, ['DocumentReference/9']) as Task;
    expect(taskWithDocuments(once, ['DocumentReference/9'])).toBeUndefined();
    const srOnce = serviceRequestWithDocuments(sr, ['DocumentReference/9']) as ServiceRequest;
    expect(srOnce.supportingInfo?.at(-1)).toEqual({ reference: 'DocumentReference/9' });
    expect(serviceRequestWithDocuments(srOnce, ['DocumentReference/9'])).toBeUndefined();
  });

  test('the updated Task still validates against R4', () => {
    const next = taskWithDocuments(atCentre, ['DocumentReference/9']) as Task;
    // At the centre, the bundle's urn:uuid references have become server ids.
    const resolved = JSON.parse(JSON.stringify(next).replace(/urn:uuid:[0-9a-f-]+/g, 'DocumentReference/1')) as Task;
    const entry = { fullUrl: 'urn:uuid:0b0f7b7e-1c1f-4b8e-9c52-2d4f5b1f0a11', resource: resolved, request: { method: 'PUT' as const, url: 'Task/t1' } };
    expect(validateBundle({ resourceType: 'Bundle', type: 'batch', entry: [entry] })).toEqual([]);
  });
});

describe('identifierQuery', () => {
  test('keeps ordinary systems readable and escapes search-special characters', () => {
    expect(identifierQuery('urn:oid:2.16.840.1.113883.19.5', 'MRN-0042')).toBe('identifier=urn:oid:2.16.840.1.113883.19.5|MRN-0042');
    expect(identifierQuery('https://x.example/id', 'a,b|c$d')).toBe('identifier=https://x.example/id|a%5C%2Cb%5C%7Cc%5C%24d');
    expect(identifierQuery('https://x.example/id', 'a b&c=d#e+f')).toBe('identifier=https://x.example/id|a%20b%26c%3Dd%23e%2Bf');
  });
});

describe('validateBundle catches broken bundles', () => {
  test('structure errors, bad values and dangling references are reported with their paths', () => {
    const bundle = structuredClone(mapFixture('breast-second-opinion'));
    const entries = bundle.entry as BundleEntry[];
    (entries[0].resource as unknown as Record<string, unknown>).favouriteColour = 'blue';
    delete (entries[entries.length - 1].resource as Partial<Task>).status;
    (entries[5].resource as Condition).subject = { reference: 'urn:uuid:00000000-0000-4000-8000-000000000000' };
    entries[1].fullUrl = entries[0].fullUrl;
    const issues = validateBundle(bundle);
    expect(issues).toEqual(
      expect.arrayContaining([
        { path: 'Bundle.entry[0].resource.favouriteColour', message: 'Invalid additional property "favouriteColour"' },
        { path: `Bundle.entry[${entries.length - 1}].resource.status`, message: 'Missing required property' },
        { path: 'Bundle.entry[5].resource', message: expect.stringMatching(/does not resolve/) },
        { path: 'Bundle.entry[1].fullUrl', message: expect.stringMatching(/duplicate fullUrl/) },
      ])
    );
  });

  test('a non-transaction bundle type is reported', () => {
    expect(validateBundle({ resourceType: 'Bundle', type: 'collection', entry: [] })).toEqual([
      { path: 'Bundle.type', message: expect.stringMatching(/transaction or batch/) },
    ]);
  });

  test('the definitions load once', () => {
    const a = loadFhirDefinitions();
    expect(loadFhirDefinitions()).toBe(a);
    expect(a.ms).toBeGreaterThanOrEqual(0);
  });
});

describe('against an in-memory FHIR server (@medplum/fhir-router)', () => {
  async function post(router: FhirRouter, repo: MemoryRepository, body: Bundle): Promise<Bundle> {
    const [outcome, result] = await router.handleRequest({ method: 'POST', url: '/', pathname: '', query: {}, params: {}, body }, repo);
    expect(outcome.issue?.[0]?.severity).toBe('information');
    return result as Bundle;
  }

  test('the transaction is accepted and resending it creates nothing new', async () => {
    const router = new FhirRouter();
    const repo = new MemoryRepository();
    const bundle = mapFixture('tumour-board-many-documents');
    const first = await post(router, repo, bundle);
    expect(first.entry?.map((e) => e.response?.status)).toEqual(bundle.entry?.map(() => '201'));
    const second = await post(router, repo, bundle);
    expect(second.entry?.map((e) => e.response?.status)).toEqual(bundle.entry?.map(() => '200'));
    expect(second.entry?.map((e) => e.response?.location?.split('/_history')[0])).toEqual(first.entry?.map((e) => e.response?.location?.split('/_history')[0]));

    const tasks = await repo.searchResources<Task>({ resourceType: 'Task', filters: [] });
    expect(tasks).toHaveLength(1);
    const sr = await repo.readReference<ServiceRequest>(tasks[0].focus as { reference: string });
    expect(sr.identifier?.[0].value).toBe('ref_fixture_tumour-board-many-documents');
    const docs = await repo.searchResources<DocumentReference>({ resourceType: 'DocumentReference', filters: [] });
    expect(docs).toHaveLength(9);
    expect(docs.every((d) => d.context?.related?.[0].reference === `ServiceRequest/${sr.id}`)).toBe(true);

    // Documents added later land linked to the same ServiceRequest.
    const added = mapAddedDocumentsToBundle({
      referralId: 'ref_fixture_tumour-board-many-documents',
      referral: loadReferral('tumour-board-many-documents'),
      documents: loadReferral('breast-second-opinion').documents,
      startIndex: 9,
      serviceRequestRef: `ServiceRequest/${sr.id}`,
      patientRef: tasks[0].for?.reference as string,
      destination: SANDBOX,
    });
    const third = await post(router, repo, added);
    expect(third.entry?.map((e) => e.response?.status)).toEqual(['200', '201', '201']);
    expect(await repo.searchResources({ resourceType: 'DocumentReference', filters: [] })).toHaveLength(11);
    expect(await repo.searchResources({ resourceType: 'Organization', filters: [] })).toHaveLength(2);
  });
});
