import type { Coding, Referral } from '../model';
import { isSnomedConceptId } from './snomed';
import { cancerConditionCodes, findStageGroup, knownStageGroups, snomedDoNotUseReason } from './tables';

export interface CodeIssue {
  /** Field path in the submitted referral, e.g. `diagnosis.code.code` or `treatmentHistory[0].end`. */
  path: string;
  message: string;
}

/** ICD-10(-CM) malignant (C00-C96, incl. CM's C4A/C7A/C7B) and in-situ (D00-D09) neoplasm codes. */
const ICD10_CANCER = /^(C(?:[0-8]\d|9[0-6]|4A|7A|7B)|D0\d)(?:\.[0-9A-Z]{1,4})?$/;

/** ICD-O-3 morphology: 4 digits, slash, behaviour code (0 benign, 1 uncertain, 2 in situ, 3 malignant, 6 metastatic, 9 uncertain primary/metastatic). */
const ICDO3_MORPHOLOGY = /^\d{4}\/[012369]$/;

function checkSnomed(path: string, c: Coding, issues: CodeIssue[]): void {
  const code = c.code.trim();
  if (!isSnomedConceptId(code)) {
    issues.push({ path: `${path}.code`, message: `"${code}" is not a valid SNOMED CT concept id (6-18 digits with a valid check digit)` });
    return;
  }
  const reason = snomedDoNotUseReason(code);
  if (reason) {
    issues.push({ path: `${path}.code`, message: `SNOMED CT ${code} must not be used: ${reason}` });
  }
}

/**
 * Checks the codes in a schema-valid referral against the mapping tables and code formats. Returns
 * one issue per problem (empty when everything is acceptable); the API answers 422 with them.
 */
export function checkCodes(referral: Referral): CodeIssue[] {
  const issues: CodeIssue[] = [];
  const sys = cancerConditionCodes().codeSystems;
  const dx = referral.diagnosis;

  // Diagnosis: ICD-10-CM / ICD-10 cancer code, or a SNOMED CT concept.
  if (dx.code.system === sys.icd10cm || dx.code.system === sys.icd10) {
    if (!ICD10_CANCER.test(dx.code.code.trim().toUpperCase())) {
      issues.push({
        path: 'diagnosis.code.code',
        message: `"${dx.code.code}" is not an ICD-10-CM malignant (C00-C96) or in-situ (D00-D09) neoplasm code such as C50.912`,
      });
    }
  } else if (dx.code.system === sys.snomed) {
    checkSnomed('diagnosis.code', dx.code, issues);
  } else {
    issues.push({ path: 'diagnosis.code.system', message: `must be ${sys.icd10cm}, ${sys.icd10} or ${sys.snomed}` });
  }

  if (dx.bodySite) {
    if (dx.bodySite.system === sys.snomed) {
      checkSnomed('diagnosis.bodySite', dx.bodySite, issues);
    } else {
      issues.push({ path: 'diagnosis.bodySite.system', message: `body site must be coded in SNOMED CT (${sys.snomed})` });
    }
  }

  if (dx.histology) {
    if (dx.histology.system === sys.snomed) {
      checkSnomed('diagnosis.histology', dx.histology, issues);
    } else if (dx.histology.system === sys.icdo3) {
      if (!ICDO3_MORPHOLOGY.test(dx.histology.code.trim())) {
        issues.push({ path: 'diagnosis.histology.code', message: `"${dx.histology.code}" is not an ICD-O-3 morphology code such as 8500/3` });
      }
    } else {
      issues.push({ path: 'diagnosis.histology.system', message: `histology must be a SNOMED CT morphology (${sys.snomed}) or ICD-O-3 (${sys.icdo3}) code` });
    }
  }

  if (dx.stage && !findStageGroup(dx.stage.value)) {
    issues.push({
      path: 'diagnosis.stage.value',
      message: `"${dx.stage.value}" is not an AJCC stage group (one of ${knownStageGroups().join(', ')})`,
    });
  }

  referral.treatmentHistory.forEach((t, i) => {
    if (t.code?.system === sys.snomed) {
      checkSnomed(`treatmentHistory[${i}].code`, t.code, issues);
    }
    if (t.start && t.end && t.end < t.start) {
      issues.push({ path: `treatmentHistory[${i}].end`, message: `end ${t.end} is before start ${t.start}` });
    }
  });

  const seen = new Set<string>();
  referral.patient.identifiers.forEach((id, i) => {
    const key = `${id.system}|${id.value}`;
    if (seen.has(key)) {
      issues.push({ path: `patient.identifiers[${i}]`, message: `duplicate identifier ${key}` });
    }
    seen.add(key);
  });

  return issues;
}
