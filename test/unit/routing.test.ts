import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { type Referral, type ReferralInput, referralSchema } from '../../src/model';
import { checkCodes } from '../../src/mapping/codes';
import { icd10Category, matchingRules, routeReferral } from '../../src/mapping/routing';
import { routingRules } from '../../src/mapping/tables';

const FIXTURES = resolve(__dirname, '../../fixtures/referrals');
const ICD10CM = 'http://hl7.org/fhir/sid/icd-10-cm';
const ICD10 = 'http://hl7.org/fhir/sid/icd-10';
const SCT = 'http://snomed.info/sct';

function fixture(name: string): ReferralInput {
  return JSON.parse(readFileSync(join(FIXTURES, `${name}.json`), 'utf8')) as ReferralInput;
}

/** The breast fixture with changes applied, parsed through the real schema. */
function referral(change: (r: ReferralInput) => void = () => undefined): Referral {
  const r = fixture('breast-second-opinion');
  change(r);
  return referralSchema.parse(r);
}

function withDiagnosis(system: string, code: string): Referral {
  return referral((r) => {
    r.diagnosis.code = { system, code };
  });
}

const ALL = ['example-cancer-centre', 'example-sarcoma-centre', 'example-haematology-centre', 'sandbox'];

describe('routeReferral: rules by cancer type', () => {
  test.each([
    ['breast', ICD10CM, 'C50.912', 'example-cancer-centre', 'Breast oncology'],
    ['breast in situ', ICD10CM, 'D05.11', 'example-cancer-centre', 'Breast oncology'],
    ['lung', ICD10CM, 'C34.11', 'example-cancer-centre', 'Thoracic oncology'],
    ['trachea', ICD10CM, 'C33', 'example-cancer-centre', 'Thoracic oncology'],
    ['colon', ICD10CM, 'C18.7', 'example-cancer-centre', 'Colorectal oncology'],
    ['rectosigmoid', ICD10CM, 'C19', 'example-cancer-centre', 'Colorectal oncology'],
    ['rectum', ICD10CM, 'C20', 'example-cancer-centre', 'Colorectal oncology'],
    ['bone sarcoma', ICD10CM, 'C40.21', 'example-sarcoma-centre', 'Sarcoma'],
    ['pelvic bone sarcoma', ICD10CM, 'C41.4', 'example-sarcoma-centre', 'Sarcoma'],
    ['soft tissue sarcoma', ICD10CM, 'C49.22', 'example-sarcoma-centre', 'Sarcoma'],
    ['mesothelioma', ICD10CM, 'C45.0', 'example-sarcoma-centre', 'Sarcoma'],
    ['lymphoid leukaemia', ICD10CM, 'C91.02', 'example-haematology-centre', 'Haemato-oncology (leukaemia)'],
    ['myeloid leukaemia', ICD10CM, 'C92.00', 'example-haematology-centre', 'Haemato-oncology (leukaemia)'],
    ['unspecified leukaemia', ICD10CM, 'C95.90', 'example-haematology-centre', 'Haemato-oncology (leukaemia)'],
    ['pancreas (general rule)', ICD10CM, 'C25.0', 'example-cancer-centre', 'General oncology'],
    ['Merkel cell (C4A, general rule)', ICD10CM, 'C4A.9', 'example-cancer-centre', 'General oncology'],
    ['WHO ICD-10 breast', ICD10, 'C50.9', 'example-cancer-centre', 'Breast oncology'],
    ['SNOMED breast', SCT, '254837009', 'example-cancer-centre', 'Breast oncology'],
    ['SNOMED left female breast (mCODE example)', SCT, '353431000119107', 'example-cancer-centre', 'Breast oncology'],
    ['SNOMED lung', SCT, '93880001', 'example-cancer-centre', 'Thoracic oncology'],
    ['SNOMED colon', SCT, '363406005', 'example-cancer-centre', 'Colorectal oncology'],
    ['SNOMED sarcoma', SCT, '424413001', 'example-sarcoma-centre', 'Sarcoma'],
    ['SNOMED leukaemia', SCT, '93143009', 'example-haematology-centre', 'Haemato-oncology (leukaemia)'],
    ['SNOMED ALL', SCT, '91857003', 'example-haematology-centre', 'Haemato-oncology (leukaemia)'],
    ['SNOMED cancer (general rule)', SCT, '363346000', 'example-cancer-centre', 'General oncology'],
  ])('%s (%s %s) -> %s', (_label, system, code, destination, specialty) => {
    expect(routeReferral(withDiagnosis(system, code), ALL)).toEqual({ destination, specialty });
  });

  test('range boundaries: C17 and C21 are not colorectal, C39 and C50 are not thoracic', () => {
    expect(routeReferral(withDiagnosis(ICD10CM, 'C17.9'), ALL)?.specialty).toBe('General oncology');
    expect(routeReferral(withDiagnosis(ICD10CM, 'C21.0'), ALL)?.specialty).toBe('General oncology');
    expect(routeReferral(withDiagnosis(ICD10CM, 'C32.0'), ALL)?.specialty).toBe('General oncology');
    expect(routeReferral(withDiagnosis(ICD10CM, 'C35'), ALL)?.specialty).toBe('General oncology');
    expect(routeReferral(withDiagnosis(ICD10CM, 'C42'), ALL)?.specialty).toBe('General oncology');
    expect(routeReferral(withDiagnosis(ICD10CM, 'C96.0'), ALL)?.specialty).toBe('General oncology');
  });

  test('codes no rule covers do not match any rule', () => {
    expect(matchingRules(withDiagnosis(ICD10CM, 'I10'))).toEqual([]);
    expect(matchingRules(withDiagnosis(ICD10CM, 'D10.0'))).toEqual([]);
    expect(matchingRules(withDiagnosis(SCT, '38341003'))).toEqual([]);
    expect(matchingRules(withDiagnosis('http://example.org/local-codes', 'C50'))).toEqual([]);
  });

  test('icd10Category extracts the three-character category', () => {
    expect(icd10Category('C50.912')).toBe('C50');
    expect(icd10Category('c34.11')).toBe('C34');
    expect(icd10Category('C4A.9')).toBe('C4A');
    expect(icd10Category('50.9')).toBeUndefined();
  });
});

describe('routeReferral: choosing among configured destinations', () => {
  test('an explicit destination wins over the rules when it is configured', () => {
    const r = referral((x) => {
      x.destination = 'sandbox';
    });
    expect(routeReferral(r, ALL)).toEqual({ destination: 'sandbox', specialty: 'Breast oncology' });
  });

  test('an explicit destination that is not configured gives undefined, even if a rule would match', () => {
    const r = referral((x) => {
      x.destination = 'nowhere';
    });
    expect(routeReferral(r, ALL)).toBeUndefined();
    expect(routeReferral(r, ['nowhere-else'])).toBeUndefined();
  });

  test('a rule whose destination is not configured is skipped for the next matching rule', () => {
    // Sarcoma rule names example-sarcoma-centre; without it the general rule's centre is used.
    const r = withDiagnosis(ICD10CM, 'C49.22');
    expect(routeReferral(r, ['example-cancer-centre', 'sandbox'])).toEqual({ destination: 'example-cancer-centre', specialty: 'General oncology' });
  });

  test('no matching rule destination and exactly one destination: that one, with the specialty of the first matching rule', () => {
    expect(routeReferral(withDiagnosis(ICD10CM, 'C50.912'), ['sandbox'])).toEqual({ destination: 'sandbox', specialty: 'Breast oncology' });
    expect(routeReferral(withDiagnosis(ICD10CM, 'C91.02'), ['default'])).toEqual({ destination: 'default', specialty: 'Haemato-oncology (leukaemia)' });
  });

  test('a single destination also takes referrals no rule matches (no specialty then)', () => {
    expect(routeReferral(withDiagnosis(SCT, '38341003'), ['sandbox'])).toEqual({ destination: 'sandbox' });
  });

  test('no matching rule destination and several destinations: undefined', () => {
    expect(routeReferral(withDiagnosis(ICD10CM, 'C50.912'), ['sandbox', 'default'])).toBeUndefined();
    expect(routeReferral(withDiagnosis(ICD10CM, 'C50.912'), [])).toBeUndefined();
  });

  test('it only ever returns a destination from the given list', () => {
    const lists = [[], ['sandbox'], ['example-cancer-centre'], ['example-sarcoma-centre', 'sandbox'], ALL];
    const codes = ['C50.912', 'C34.11', 'C18.7', 'C49.22', 'C91.02', 'C25.0', 'I10'];
    for (const list of lists) {
      for (const code of codes) {
        const route = routeReferral(withDiagnosis(ICD10CM, code), list);
        if (route) {
          expect(list).toContain(route.destination);
        }
      }
    }
  });

  test('every rule names a destination id in the destinations-file format', () => {
    for (const rule of routingRules()) {
      expect(rule.destination).toMatch(/^[a-z0-9][a-z0-9-]{0,62}$/);
      expect(rule.icd10.length + rule.snomed.length).toBeGreaterThan(0);
    }
  });
});

describe('checkCodes', () => {
  test.each([
    'breast-second-opinion',
    'lung-expert-opinion',
    'colorectal-second-opinion',
    'sarcoma-expert-opinion',
    'paediatric-leukaemia',
    'tumour-board-many-documents',
  ])('fixture %s has acceptable codes', (name) => {
    expect(checkCodes(referralSchema.parse(fixture(name)))).toEqual([]);
  });

  test('diagnosis must be an ICD-10 cancer code', () => {
    expect(checkCodes(withDiagnosis(ICD10CM, 'I10'))).toEqual([{ path: 'diagnosis.code.code', message: expect.stringMatching(/not an ICD-10-CM malignant/) }]);
    expect(checkCodes(withDiagnosis(ICD10CM, 'C50.9123X'))).toHaveLength(1);
    expect(checkCodes(withDiagnosis(ICD10CM, 'C97'))).toHaveLength(1);
    expect(checkCodes(withDiagnosis(ICD10CM, 'D10.0'))).toHaveLength(1);
    expect(checkCodes(withDiagnosis(ICD10CM, 'D09.0'))).toEqual([]);
    expect(checkCodes(withDiagnosis(ICD10CM, 'c50.912'))).toEqual([]);
    expect(checkCodes(withDiagnosis(ICD10CM, 'C7A.010'))).toEqual([]);
    expect(checkCodes(withDiagnosis(ICD10, 'C50.9'))).toEqual([]);
  });

  test('a SNOMED diagnosis must be a well-formed concept id', () => {
    expect(checkCodes(withDiagnosis(SCT, '254837009'))).toEqual([]);
    expect(checkCodes(withDiagnosis(SCT, '254837008'))).toEqual([
      { path: 'diagnosis.code.code', message: expect.stringMatching(/not a valid SNOMED CT concept id/) },
    ]);
    expect(checkCodes(withDiagnosis(SCT, 'C50.912'))).toHaveLength(1);
  });

  test('other diagnosis code systems are refused', () => {
    expect(checkCodes(withDiagnosis('http://example.org/local', 'BRCA'))).toEqual([
      { path: 'diagnosis.code.system', message: expect.stringContaining('http://hl7.org/fhir/sid/icd-10-cm') },
    ]);
  });

  test('the inactive histology code from the old contract example is refused with a replacement hint', () => {
    const r = referral((x) => {
      x.diagnosis.histology = { system: SCT, code: '413448000', display: 'Adenocarcinoma of breast' };
    });
    expect(checkCodes(r)).toEqual([{ path: 'diagnosis.histology.code', message: expect.stringMatching(/413448000 must not be used: inactive.*82711006/) }]);
  });

  test('281036007 is refused wherever a SNOMED code is accepted', () => {
    const r = referral((x) => {
      x.treatmentHistory = [{ type: 'other', description: 'consultation', code: { system: SCT, code: '281036007' } }];
    });
    expect(checkCodes(r)).toEqual([{ path: 'treatmentHistory[0].code.code', message: expect.stringMatching(/Follow-up consultation/) }]);
  });

  test('histology may be ICD-O-3 morphology; other systems are refused', () => {
    const ok = referral((x) => {
      x.diagnosis.histology = { system: 'http://terminology.hl7.org/CodeSystem/icd-o-3', code: '8500/3' };
    });
    expect(checkCodes(ok)).toEqual([]);
    const badFormat = referral((x) => {
      x.diagnosis.histology = { system: 'http://terminology.hl7.org/CodeSystem/icd-o-3', code: '8500-3' };
    });
    expect(checkCodes(badFormat)).toEqual([{ path: 'diagnosis.histology.code', message: expect.stringMatching(/ICD-O-3/) }]);
    const badSystem = referral((x) => {
      x.diagnosis.histology = { system: 'http://loinc.org', code: '123-4' };
    });
    expect(checkCodes(badSystem)[0].path).toBe('diagnosis.histology.system');
  });

  test('body site must be SNOMED', () => {
    const r = referral((x) => {
      x.diagnosis.bodySite = { system: 'http://terminology.hl7.org/CodeSystem/icd-o-3-topography', code: 'C50.9' };
    });
    expect(checkCodes(r)).toEqual([{ path: 'diagnosis.bodySite.system', message: expect.stringMatching(/SNOMED CT/) }]);
  });

  test('stage value must be a known AJCC stage group', () => {
    const bad = referral((x) => {
      x.diagnosis.stage = { system: 'AJCC-8', value: 'T2N1M0' };
    });
    expect(checkCodes(bad)).toEqual([
      { path: 'diagnosis.stage.value', message: expect.stringMatching(/"T2N1M0" is not an AJCC stage group \(one of 0, 0a, 0is, I,/) },
    ]);
    const lower = referral((x) => {
      x.diagnosis.stage = { system: 'AJCC-8', value: 'stage iiib' };
    });
    expect(checkCodes(lower)).toEqual([]);
  });

  test('a treatment ending before it starts is reported at its end date', () => {
    const r = referral((x) => {
      x.treatmentHistory = [{ type: 'chemotherapy', description: 'AC', start: '2026-05-01', end: '2026-04-01' }];
    });
    expect(checkCodes(r)).toEqual([{ path: 'treatmentHistory[0].end', message: 'end 2026-04-01 is before start 2026-05-01' }]);
  });

  test('duplicate patient identifiers are reported', () => {
    const r = referral((x) => {
      x.patient.identifiers = [x.patient.identifiers[0], { ...x.patient.identifiers[0] }];
    });
    expect(checkCodes(r)).toEqual([{ path: 'patient.identifiers[1]', message: expect.stringContaining('duplicate identifier') }]);
  });

  test('several problems are all reported at once', () => {
    const r = referral((x) => {
      x.diagnosis.code = { system: ICD10CM, code: 'I10' };
      x.diagnosis.bodySite = { system: SCT, code: '80248008' };
      x.diagnosis.stage = { system: 'AJCC-8', value: 'VI' };
    });
    expect(checkCodes(r).map((i) => i.path)).toEqual(['diagnosis.code.code', 'diagnosis.bodySite.code', 'diagnosis.stage.value']);
  });
});
