import { mkdtempSync, readdirSync, readFileSync, writeFileSync, cpSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { documentKinds, priorities, reasonCodes, referralKinds, treatmentTypes } from '../../src/model';
import {
  DOCUMENT_IDENTIFIER_SYSTEM,
  GATEWAY_IDENTIFIER_BASE,
  GATEWAY_TAG,
  PLACER_IDENTIFIER_TYPE,
  REFERRAL_IDENTIFIER_SYSTEM,
  externalIdSystem,
} from '../../src/mapping/constants';
import { isSnomedConceptId, verhoeffValid } from '../../src/mapping/snomed';
import {
  consentCodes,
  documentKindCodes,
  externalIdSystemFor,
  findStageGroup,
  getMappingsDir,
  identifierSystems,
  knownStageGroups,
  lateralityCoding,
  loadTables,
  opinionReportType,
  referralCategory,
  referralKindCode,
  referralReasonCode,
  requestPriority,
  resetTables,
  routingRules,
  secondOpinionReason,
  setMappingsDir,
  snomedDoNotUseReason,
  stageTypeCode,
  stagingSystem,
  taskCodes,
  treatmentTypeInfo,
} from '../../src/mapping/tables';
import { ENTRY_NAMESPACE, entryFullUrl, uuidV5 } from '../../src/mapping/uuid';

const MAPPINGS = resolve(__dirname, '../../mappings');
const SCT = 'http://snomed.info/sct';
const LOINC = 'http://loinc.org';

describe('mapping tables: loading', () => {
  afterEach(() => setMappingsDir(undefined));

  test('finds the mappings folder of the repository and loads every table', () => {
    expect(getMappingsDir()).toBe(MAPPINGS);
    const t = loadTables();
    expect(Object.keys(t).sort()).toEqual(
      ['cancerCondition', 'documentKinds', 'identifierSystems', 'imaging', 'referralCodes', 'routing', 'staging', 'treatmentTypes'].sort()
    );
  });

  test('loads once and caches until reset', () => {
    const a = loadTables();
    expect(loadTables()).toBe(a);
    resetTables();
    expect(loadTables()).not.toBe(a);
    expect(loadTables()).toEqual(a);
  });

  test('every table file states its source in _source', () => {
    for (const file of readdirSync(MAPPINGS).filter((f) => f.endsWith('.json') && !f.startsWith('destinations'))) {
      const json = JSON.parse(readFileSync(join(MAPPINGS, file), 'utf8')) as { _source?: unknown };
      expect(typeof json._source).toBe('string');
      expect((json._source as string).length).toBeGreaterThan(40);
    }
  });

  test('lookups hand out the cached tables deep-frozen, so callers cannot corrupt them', () => {
    const code = referralKindCode('second-opinion');
    expect(referralKindCode('second-opinion')).toBe(code);
    expect(Object.isFrozen(code) && Object.isFrozen(code.coding) && Object.isFrozen(code.coding?.[0])).toBe(true);
    expect(() => {
      (code as { text?: string }).text = 'changed';
    }).toThrow(TypeError);
    expect(() => (code.coding as unknown[]).splice(0)).toThrow(TypeError);
    expect(referralKindCode('second-opinion').text).toBe('Second opinion');
    expect(referralKindCode('second-opinion').coding).toHaveLength(2);
    expect(Object.isFrozen(loadTables().routing.rules[0].icd10)).toBe(true);
    expect(Object.isFrozen(documentKindCodes('pathology-report').type.coding)).toBe(true);
  });

  describe('a broken table fails with the file and field at fault', () => {
    let dir: string;
    beforeEach(() => {
      dir = mkdtempSync(join(tmpdir(), 'mappings-'));
      cpSync(MAPPINGS, dir, { recursive: true });
    });
    afterEach(() => rmSync(dir, { recursive: true, force: true }));

    test('a document kind missing from document-kinds.json', () => {
      const file = join(dir, 'document-kinds.json');
      const json = JSON.parse(readFileSync(file, 'utf8'));
      delete json.kinds['lab-report'];
      writeFileSync(file, JSON.stringify(json));
      setMappingsDir(dir);
      expect(() => loadTables()).toThrow(/document-kinds\.json is invalid: kinds\.lab-report/);
    });

    test('a mistyped SNOMED code (bad check digit) in referral-codes.json', () => {
      const file = join(dir, 'referral-codes.json');
      const json = JSON.parse(readFileSync(file, 'utf8'));
      json.category.coding[0].code = '3457006';
      writeFileSync(file, JSON.stringify(json));
      setMappingsDir(dir);
      expect(() => loadTables()).toThrow(/referral-codes\.json is invalid: category\.coding\.0: SNOMED CT code is not a valid concept id/);
    });

    test('a routing range that runs backwards', () => {
      const file = join(dir, 'routing.json');
      const json = JSON.parse(readFileSync(file, 'utf8'));
      json.rules[0].icd10 = ['C34-C33'];
      writeFileSync(file, JSON.stringify(json));
      setMappingsDir(dir);
      expect(() => loadTables()).toThrow(/routing\.json is invalid: rules\.0\.icd10\.0: range must be ascending/);
    });

    test('invalid JSON', () => {
      writeFileSync(join(dir, 'staging.json'), '{ not json');
      setMappingsDir(dir);
      expect(() => loadTables()).toThrow(/staging\.json/);
    });
  });
});

describe('mapping tables: codes', () => {
  test('referral category is SNOMED 3457005 Patient referral', () => {
    expect(referralCategory().coding).toEqual([{ system: SCT, code: '3457005', display: 'Patient referral' }]);
  });

  test.each([
    ['second-opinion', '103696004', 'Second opinion'],
    ['expert-opinion', '44383000', 'Expert opinion'],
    ['tumour-board-review', '103696004', 'Tumour board review'],
  ])('kind %s -> SNOMED %s plus the gateway kind code and text', (kind, snomed, text) => {
    const c = referralKindCode(kind);
    expect(c.coding?.[0]).toMatchObject({ system: SCT, code: snomed });
    expect(c.coding?.[1]).toMatchObject({ system: 'https://referral-gateway.dev/fhir/CodeSystem/referral-kind', code: kind });
    expect(c.text).toBe(text);
  });

  test('every contract kind, reason and priority has a table entry', () => {
    for (const k of referralKinds) {
      expect(referralKindCode(k).text).toBeTruthy();
    }
    for (const r of reasonCodes) {
      const c = referralReasonCode(r);
      expect(c.text).toBeTruthy();
      expect(c.coding?.some((x) => x.system === 'https://referral-gateway.dev/fhir/CodeSystem/referral-reason' && x.code === r)).toBe(true);
    }
    for (const p of priorities) {
      expect(requestPriority(p)).toBe(p);
    }
  });

  test('every referral carries v2-0336#S; patient-preference also maps to v2-0336#P', () => {
    expect(secondOpinionReason().coding).toEqual([{ system: 'http://terminology.hl7.org/CodeSystem/v2-0336', code: 'S', display: 'Second Opinion' }]);
    expect(referralReasonCode('patient-preference').coding?.[0]).toEqual({
      system: 'http://terminology.hl7.org/CodeSystem/v2-0336',
      code: 'P',
      display: 'Patient Preference',
    });
    expect(referralReasonCode('diagnosis-uncertain').coding?.some((c) => c.system === SCT)).toBe(false);
  });

  test('unknown kind, reason, priority, document kind, treatment type and laterality throw naming the table', () => {
    expect(() => referralKindCode('consult')).toThrow('no referral kind for "consult" in mappings/referral-codes.json');
    expect(() => referralReasonCode('cost')).toThrow(/referral reason .*cost/);
    expect(() => requestPriority('soon')).toThrow(/priority .*soon/);
    expect(() => documentKindCodes('x-ray')).toThrow('no document kind for "x-ray" in mappings/document-kinds.json');
    expect(() => treatmentTypeInfo('homeopathy')).toThrow(/treatment type .*homeopathy/);
    expect(() => lateralityCoding('middle')).toThrow(/laterality .*middle/);
    expect(() => stagingSystem('TNM-UICC')).toThrow(/staging system .*TNM-UICC/);
  });

  const expectedLoinc: Record<(typeof documentKinds)[number], string | undefined> = {
    'pathology-report': '11526-1',
    'imaging-report': '18748-4',
    'imaging-study': '18748-4',
    'genomic-report': '51969-4',
    'lab-report': '11502-2',
    'discharge-summary': '18842-5',
    'treatment-summary': '11506-3',
    'clinical-note': '11506-3',
    other: undefined,
  };

  test.each(documentKinds.map((k) => [k, expectedLoinc[k]] as const))('document kind %s -> LOINC %s, clinical-note category', (kind, loinc) => {
    const c = documentKindCodes(kind);
    const loincCodes = c.type.coding?.filter((x) => x.system === LOINC).map((x) => x.code) ?? [];
    expect(loincCodes).toEqual(loinc ? [loinc] : []);
    expect(c.type.coding?.at(-1)).toMatchObject({ system: 'https://referral-gateway.dev/fhir/CodeSystem/document-kind', code: kind });
    expect(c.type.text).toBeTruthy();
    expect(c.category.coding).toEqual([
      { system: 'http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category', code: 'clinical-note', display: 'Clinical Note' },
    ]);
  });

  test('the opinion report type centres should use is LOINC 11488-4 Consult note', () => {
    expect(opinionReportType()).toEqual({ system: LOINC, code: '11488-4', display: 'Consult note' });
  });

  test('Task code is task-code#fulfill; Consent codes are the R4 ones', () => {
    expect(taskCodes().code.coding).toEqual([{ system: 'http://hl7.org/fhir/CodeSystem/task-code', code: 'fulfill', display: 'Fulfill the focal request' }]);
    const c = consentCodes();
    expect(c.scope.coding?.[0]).toMatchObject({ system: 'http://terminology.hl7.org/CodeSystem/consentscope', code: 'patient-privacy' });
    expect(c.category.coding?.[0]).toMatchObject({ system: LOINC, code: '59284-0' });
  });

  test.each(treatmentTypes.map((t) => [t]))('treatment type %s maps to a resource with a gateway category code', (type) => {
    const info = treatmentTypeInfo(type);
    const drug = ['chemotherapy', 'immunotherapy', 'targeted-therapy', 'hormone-therapy'].includes(type);
    expect(info.resource).toBe(drug ? 'MedicationStatement' : 'Procedure');
    expect(info.category.coding?.at(-1)).toMatchObject({ system: 'https://referral-gateway.dev/fhir/CodeSystem/treatment-type', code: type });
  });

  test('laterality qualifiers are the mCODE SNOMED codes', () => {
    expect(lateralityCoding('left').code).toBe('7771000');
    expect(lateralityCoding('right').code).toBe('24028007');
    expect(lateralityCoding('bilateral').code).toBe('51440002');
  });
});

describe('mapping tables: staging', () => {
  test.each([
    ['AJCC-8', '897275008'],
    ['AJCC-7', '443830009'],
    ['AJCC-9', '1269566009'],
  ])('%s -> SNOMED %s', (system, code) => {
    expect(stagingSystem(system).coding?.[0]).toMatchObject({ system: SCT, code });
  });

  test('stage types: clinical 399537006, pathologic 399588009, otherwise 399390009', () => {
    expect(stageTypeCode('clinical').coding?.[0].code).toBe('399537006');
    expect(stageTypeCode('pathologic').coding?.[0].code).toBe('399588009');
    expect(stageTypeCode(undefined).coding?.[0].code).toBe('399390009');
  });

  test('only IIB and IIIC carry a SNOMED qualifier; other groups are text only', () => {
    expect(findStageGroup('IIB')).toEqual({
      value: 'IIB',
      coding: { system: SCT, code: '1222769001', display: 'American Joint Committee on Cancer stage IIB (qualifier value)' },
    });
    expect(findStageGroup('IIIC')?.coding?.code).toBe('1222806003');
    const coded = knownStageGroups().filter((g) => findStageGroup(g)?.coding);
    expect(coded.sort()).toEqual(['IIB', 'IIIC']);
    expect(findStageGroup('IIIA')).toEqual({ value: 'IIIA' });
  });

  test('stage groups are matched case-insensitively and without a leading "Stage"', () => {
    expect(findStageGroup('stage iib')?.value).toBe('IIB');
    expect(findStageGroup(' 0is ')?.value).toBe('0is');
    expect(findStageGroup('IVa')?.value).toBe('IVA');
  });

  test('unknown stage groups return undefined', () => {
    expect(findStageGroup('V')).toBeUndefined();
    expect(findStageGroup('T2N0M0')).toBeUndefined();
    expect(findStageGroup('')).toBeUndefined();
  });
});

describe('mapping tables: identifiers and constants', () => {
  test('identifier-systems.json agrees with the exported constants the poller uses', () => {
    const t = identifierSystems();
    expect(t.tag).toEqual(GATEWAY_TAG);
    expect(t.base).toBe(GATEWAY_IDENTIFIER_BASE);
    expect(t.systems.referral).toBe(REFERRAL_IDENTIFIER_SYSTEM);
    expect(t.systems.document).toBe(DOCUMENT_IDENTIFIER_SYSTEM);
    expect(t.placerType).toEqual(PLACER_IDENTIFIER_TYPE);
    expect(externalIdSystemFor('city-hospital')).toBe(externalIdSystem('city-hospital'));
  });

  test('every gateway system lives under the gateway base and they are all different', () => {
    const systems = Object.values(identifierSystems().systems);
    for (const s of systems) {
      expect(s.startsWith(GATEWAY_IDENTIFIER_BASE)).toBe(true);
    }
    expect(new Set(systems).size).toBe(systems.length);
  });

  test('the externalId system is scoped by client id and escapes it', () => {
    expect(externalIdSystemFor('dev')).toBe('https://referral-gateway.dev/fhir/sid/client/dev/external-id');
    expect(externalIdSystemFor('a b/c')).toBe('https://referral-gateway.dev/fhir/sid/client/a%20b%2Fc/external-id');
    expect(externalIdSystemFor('one')).not.toBe(externalIdSystemFor('two'));
  });
});

describe('mapping tables: no invented or refused SNOMED codes', () => {
  const allJson = readdirSync(MAPPINGS)
    .filter((f) => f.endsWith('.json') && !f.startsWith('destinations'))
    .map((f) => readFileSync(join(MAPPINGS, f), 'utf8'))
    .join('\n');

  test('183618005 and 281036007 appear only on the do-not-use list (and in prose saying so)', () => {
    for (const f of readdirSync(MAPPINGS).filter((x) => x.endsWith('.json') && x !== 'destinations.json')) {
      const data = { ...JSON.parse(readFileSync(join(MAPPINGS, f), 'utf8')), _source: '', snomedDoNotUse: {} };
      expect(JSON.stringify(data)).not.toMatch(/183618005|281036007|413448000/);
    }
    expect(snomedDoNotUseReason('183618005')).toMatch(/second opinion/);
    expect(snomedDoNotUseReason('281036007')).toMatch(/Follow-up consultation/);
    expect(snomedDoNotUseReason('82711006')).toBeUndefined();
  });

  test('every SNOMED code in the tables is a well-formed concept id', () => {
    const codes = [...allJson.matchAll(/"system":\s*"http:\/\/snomed\.info\/sct",\s*"code":\s*"(\d+)"/g)].map((m) => m[1]);
    expect(codes.length).toBeGreaterThan(15);
    for (const code of codes) {
      expect(`${code}:${isSnomedConceptId(code)}`).toBe(`${code}:true`);
    }
    for (const rule of routingRules()) {
      for (const code of rule.snomed) {
        expect(isSnomedConceptId(code)).toBe(true);
      }
    }
  });
});

describe('SNOMED CT id checks', () => {
  test('valid concept ids pass, typos and non-concept ids fail', () => {
    for (const ok of ['3457005', '103696004', '897275008', '1269566009', '353431000119107', '7771000']) {
      expect(isSnomedConceptId(ok)).toBe(true);
    }
    expect(isSnomedConceptId('103696005')).toBe(false); // wrong check digit
    expect(isSnomedConceptId('183618005')).toBe(false); // the never-verified "second opinion" code fails its check digit
    expect(isSnomedConceptId('12345')).toBe(false); // too short
    expect(isSnomedConceptId('0103696004')).toBe(false); // leading zero
    expect(isSnomedConceptId('C50.912')).toBe(false);
    expect(isSnomedConceptId('900000000000207008')).toBe(true); // long extension-style id
  });

  test('Verhoeff: the classic example 2363 is valid, 2364 is not', () => {
    expect(verhoeffValid('2363')).toBe(true);
    expect(verhoeffValid('2364')).toBe(false);
    expect(verhoeffValid('')).toBe(false);
    expect(verhoeffValid('12a')).toBe(false);
  });
});

describe('deterministic entry ids', () => {
  test('uuidV5 matches the RFC 4122 reference value', () => {
    // Python: uuid.uuid5(uuid.NAMESPACE_DNS, 'www.example.com')
    expect(uuidV5('www.example.com', '6ba7b810-9dad-11d1-80b4-00c04fd430c8')).toBe('2ed6657d-e927-568b-95e1-2665a8aea6a2');
  });

  test('entry fullUrls are lower-case urn:uuid v5, stable, and differ by referral and role', () => {
    const a = entryFullUrl('ref_1', 'patient');
    expect(a).toMatch(/^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(entryFullUrl('ref_1', 'patient')).toBe(a);
    expect(entryFullUrl('ref_2', 'patient')).not.toBe(a);
    expect(entryFullUrl('ref_1', 'task')).not.toBe(a);
    expect(ENTRY_NAMESPACE).toMatch(/^[0-9a-f-]{36}$/);
  });
});
