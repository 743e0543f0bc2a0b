import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { z } from 'zod';
import { documentKinds, priorities, reasonCodes, referralKinds, treatmentTypes } from '../referral/schema';
import { isSnomedConceptId } from './snomed';

/**
 * The mapping tables in mappings/*.json, loaded and validated once (lazily, on first use) and exposed
 * through typed lookups. Lookups keyed by a value the referral schema already restricts (kind, reason,
 * document kind, ...) throw when the table has no entry, because that means the table and the schema
 * are out of step. Lookups keyed by free input (stage group, diagnosis code) return undefined.
 */

const SNOMED = 'http://snomed.info/sct';

const codingSchema = z.strictObject({
  system: z.string().min(1),
  code: z.string().min(1),
  display: z.string().min(1).optional(),
});

/** SNOMED codes in the tables must at least be well-formed concept ids (catches typos via the check digit). */
const checkedCoding = codingSchema.refine((c) => c.system !== SNOMED || isSnomedConceptId(c.code), {
  message: 'SNOMED CT code is not a valid concept id (check digit or partition)',
});

const conceptSchema = z.strictObject({
  coding: z.array(checkedCoding).min(1),
  text: z.string().min(1),
});

const url = z.string().regex(/^https?:\/\/\S+$/, 'must be an http(s) URL');

const sourced = { _source: z.string().min(20, 'say where the codes come from') };

export const referralCodesSchema = z.strictObject({
  ...sourced,
  localSystems: z.strictObject({ kind: url, reason: url, taskInputType: url }),
  category: conceptSchema,
  kinds: z.record(z.enum(referralKinds), conceptSchema),
  secondOpinionReason: conceptSchema,
  reasons: z.record(z.enum(reasonCodes), conceptSchema),
  priorities: z.record(z.enum(priorities), z.enum(['routine', 'urgent', 'asap', 'stat'])),
  task: z.strictObject({ code: conceptSchema, inputType: conceptSchema }),
  consent: z.strictObject({ scope: conceptSchema, category: conceptSchema, policyRule: conceptSchema, recipientRole: conceptSchema }),
  snomedDoNotUse: z.record(z.string().regex(/^\d{6,18}$/), z.string().min(1)),
});

export const documentKindsSchema = z.strictObject({
  ...sourced,
  localSystem: url,
  category: conceptSchema,
  kinds: z.record(
    z.enum(documentKinds),
    z.strictObject({
      loinc: z.strictObject({ code: z.string().regex(/^\d{1,7}-\d$/, 'must be a LOINC code'), display: z.string().min(1) }).optional(),
      display: z.string().min(1),
    })
  ),
  opinionReport: z.strictObject({ loinc: z.strictObject({ code: z.string().regex(/^\d{1,7}-\d$/), display: z.string().min(1) }) }),
});

export const identifierSystemsSchema = z.strictObject({
  ...sourced,
  base: url,
  placerType: codingSchema,
  medicalRecordType: codingSchema,
  systems: z.strictObject({
    referral: url,
    condition: url,
    observation: url,
    consent: url,
    procedure: url,
    medicationStatement: url,
    document: url,
    practitionerRole: url,
    destination: url,
  }),
  externalIdSystemTemplate: url.refine((s) => s.includes('{clientId}'), 'must contain {clientId}'),
  tag: codingSchema,
});

const icd10Category = /^[A-Z][0-9][0-9A-Z]$/;
const icd10Pattern = z
  .string()
  .refine((p) => icd10Category.test(p) || /^[A-Z]\d\d-[A-Z]\d\d$/.test(p), 'must be an ICD-10 category (C50) or range (C33-C34)')
  .refine((p) => !p.includes('-') || (p[0] === p[4] && p.slice(1, 3) <= p.slice(5, 7)), 'range must be ascending within one letter');

export const routingSchema = z.strictObject({
  ...sourced,
  rules: z
    .array(
      z.strictObject({
        id: z.string().regex(/^[a-z0-9-]+$/),
        specialty: z.string().min(1),
        destination: z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/),
        icd10: z.array(icd10Pattern).default([]),
        snomed: z.array(z.string().refine(isSnomedConceptId, 'not a valid SNOMED CT concept id')).default([]),
      })
    )
    .min(1),
});

export const stagingSchema = z.strictObject({
  ...sourced,
  systems: z.strictObject({ 'AJCC-8': conceptSchema, 'AJCC-7': conceptSchema, 'AJCC-9': conceptSchema }),
  stageTypes: z.strictObject({ clinical: conceptSchema, pathologic: conceptSchema, unspecified: conceptSchema }),
  stageGroups: z.array(z.string().regex(/^[0-9IVXABCDisa]+$/)).min(1),
  stageGroupCodes: z.record(z.string(), checkedCoding),
});

export const treatmentTypesSchema = z.strictObject({
  ...sourced,
  system: url,
  types: z.record(
    z.enum(treatmentTypes),
    z.strictObject({
      resource: z.enum(['Procedure', 'MedicationStatement']),
      display: z.string().min(1),
      coding: z.array(checkedCoding).optional(),
    })
  ),
});

export const cancerConditionSchema = z.strictObject({
  ...sourced,
  extensions: z.strictObject({ histology: url, laterality: url, assertedDate: url }),
  laterality: z.strictObject({ left: checkedCoding, right: checkedCoding, bilateral: checkedCoding }),
  clinicalStatus: z.strictObject({ active: codingSchema, recurrence: codingSchema, remission: codingSchema }),
  verificationStatus: codingSchema,
  category: codingSchema,
  codeSystems: z.strictObject({ icd10cm: url, icd10: url, snomed: url, icdo3: url }),
});

export type ReferralCodesTable = z.output<typeof referralCodesSchema>;
export type DocumentKindsTable = z.output<typeof documentKindsSchema>;
export type IdentifierSystemsTable = z.output<typeof identifierSystemsSchema>;
export type RoutingTable = z.output<typeof routingSchema>;
export type RoutingRule = RoutingTable['rules'][number];
export type StagingTable = z.output<typeof stagingSchema>;
export type TreatmentTypesTable = z.output<typeof treatmentTypesSchema>;
export type CancerConditionTable = z.output<typeof cancerConditionSchema>;

export interface MappingTables {
  referralCodes: ReferralCodesTable;
  documentKinds: DocumentKindsTable;
  identifierSystems: IdentifierSystemsTable;
  routing: RoutingTable;
  staging: StagingTable;
  treatmentTypes: TreatmentTypesTable;
  cancerCondition: CancerConditionTable;
}

const FILES: { [K in keyof MappingTables]: { file: string; schema: z.ZodType<MappingTables[K]> } } = {
  referralCodes: { file: 'referral-codes.json', schema: referralCodesSchema },
  documentKinds: { file: 'document-kinds.json', schema: documentKindsSchema },
  identifierSystems: { file: 'identifier-systems.json', schema: identifierSystemsSchema },
  routing: { file: 'routing.json', schema: routingSchema },
  staging: { file: 'staging.json', schema: stagingSchema },
  treatmentTypes: { file: 'treatment-types.json', schema: treatmentTypesSchema },
  cancerCondition: { file: 'cancer-condition.json', schema: cancerConditionSchema },
};

let mappingsDir: string | undefined;
let cached: MappingTables | undefined;

/**
 * Where the tables live. By default the nearest `mappings/` folder above this module holding
 * referral-codes.json (works from src/ under tsx/jest and from dist/ after a build).
 */
export function setMappingsDir(dir: string | undefined): void {
  mappingsDir = dir === undefined ? undefined : resolve(dir);
  cached = undefined;
}

export function getMappingsDir(): string {
  if (mappingsDir) {
    return mappingsDir;
  }
  let dir = __dirname;
  for (;;) {
    const candidate = join(dir, 'mappings');
    if (existsSync(join(candidate, FILES.referralCodes.file))) {
      return candidate;
    }
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error(`mapping tables not found: no mappings/${FILES.referralCodes.file} above ${__dirname}; call setMappingsDir()`);
    }
    dir = parent;
  }
}

function loadFile<K extends keyof MappingTables>(dir: string, key: K): MappingTables[K] {
  const { file, schema } = FILES[key];
  const path = join(dir, file);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`mapping table ${path}: ${(err as Error).message}`);
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.slice(0, 5).map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`);
    throw new Error(`mapping table ${path} is invalid: ${issues.join('; ')}`);
  }
  return parsed.data;
}

/** All tables, validated. Loaded on first call and cached; throws with the file and field at fault. */
export function loadTables(): MappingTables {
  if (!cached) {
    const dir = getMappingsDir();
    cached = {
      referralCodes: loadFile(dir, 'referralCodes'),
      documentKinds: loadFile(dir, 'documentKinds'),
      identifierSystems: loadFile(dir, 'identifierSystems'),
      routing: loadFile(dir, 'routing'),
      staging: loadFile(dir, 'staging'),
      treatmentTypes: loadFile(dir, 'treatmentTypes'),
      cancerCondition: loadFile(dir, 'cancerCondition'),
    };
  }
  return cached;
}

/** Drops the cache (tests, or after editing the files). */
export function resetTables(): void {
  cached = undefined;
}

// ----------------------------------------------------------------------------------------------
// Typed lookups. All return fresh copies so callers can never mutate the cached tables.

export interface CodingOut {
  system: string;
  code: string;
  display?: string;
}
export interface ConceptOut {
  coding?: CodingOut[];
  text?: string;
}

const copy = <T>(v: T): T => structuredClone(v);

function must<T>(value: T | undefined, what: string, key: string, file: string): T {
  if (value === undefined) {
    throw new Error(`no ${what} for "${key}" in mappings/${file}`);
  }
  return copy(value);
}

/** ServiceRequest.category for every referral (SNOMED 3457005). */
export function referralCategory(): ConceptOut {
  return copy(loadTables().referralCodes.category);
}

/** ServiceRequest.code for a referral kind. Throws for an unknown kind. */
export function referralKindCode(kind: string): ConceptOut {
  return must((loadTables().referralCodes.kinds as Record<string, ConceptOut>)[kind], 'referral kind', kind, FILES.referralCodes.file);
}

/** The reasonCode every referral carries: v2-0336#S "Second Opinion". */
export function secondOpinionReason(): ConceptOut {
  return copy(loadTables().referralCodes.secondOpinionReason);
}

/** ServiceRequest.reasonCode for a contract reason. Throws for an unknown reason. */
export function referralReasonCode(reason: string): ConceptOut {
  return must((loadTables().referralCodes.reasons as Record<string, ConceptOut>)[reason], 'referral reason', reason, FILES.referralCodes.file);
}

/** FHIR request-priority code for a contract priority. Throws for an unknown priority. */
export function requestPriority(priority: string): 'routine' | 'urgent' | 'asap' | 'stat' {
  return must(
    (loadTables().referralCodes.priorities as Record<string, 'routine' | 'urgent' | 'asap' | 'stat'>)[priority],
    'priority',
    priority,
    FILES.referralCodes.file
  );
}

export function taskCodes(): ReferralCodesTable['task'] {
  return copy(loadTables().referralCodes.task);
}

export function consentCodes(): ReferralCodesTable['consent'] {
  return copy(loadTables().referralCodes.consent);
}

/** Why a SNOMED code must not be used, or undefined when it is not on the list. */
export function snomedDoNotUseReason(code: string): string | undefined {
  return loadTables().referralCodes.snomedDoNotUse[code];
}

export interface DocumentKindCodes {
  type: ConceptOut;
  category: ConceptOut;
  display: string;
}

/** DocumentReference.type (LOINC + local code + text) and category for a contract document kind. Throws for an unknown kind. */
export function documentKindCodes(kind: string): DocumentKindCodes {
  const t = loadTables().documentKinds;
  const entry = must((t.kinds as Record<string, DocumentKindsTable['kinds'][keyof DocumentKindsTable['kinds']]>)[kind], 'document kind', kind, FILES.documentKinds.file);
  const coding: CodingOut[] = [];
  if (entry.loinc) {
    coding.push({ system: 'http://loinc.org', code: entry.loinc.code, display: entry.loinc.display });
  }
  coding.push({ system: t.localSystem, code: kind, display: entry.display });
  return { type: { coding, text: entry.display }, category: copy(t.category), display: entry.display };
}

/** LOINC code a centre should use for its opinion report (11488-4 Consult note). */
export function opinionReportType(): CodingOut {
  const l = loadTables().documentKinds.opinionReport.loinc;
  return { system: 'http://loinc.org', code: l.code, display: l.display };
}

export function identifierSystems(): IdentifierSystemsTable {
  return copy(loadTables().identifierSystems);
}

/** The system under which a client's EHR externalId is kept. */
export function externalIdSystemFor(clientId: string): string {
  return loadTables().identifierSystems.externalIdSystemTemplate.replace('{clientId}', encodeURIComponent(clientId));
}

export function routingRules(): RoutingRule[] {
  return copy(loadTables().routing.rules);
}

/** Observation.method / Condition.stage.type for a staging system. Throws for an unknown system. */
export function stagingSystem(system: string): ConceptOut {
  return must((loadTables().staging.systems as Record<string, ConceptOut>)[system], 'staging system', system, FILES.staging.file);
}

/** Observation.code for the stage type (clinical, pathologic, or unspecified when absent). */
export function stageTypeCode(type: 'clinical' | 'pathologic' | undefined): ConceptOut {
  return copy(loadTables().staging.stageTypes[type ?? 'unspecified']);
}

export interface StageGroup {
  /** Canonical spelling, e.g. "IIB". */
  value: string;
  /** Verified SNOMED qualifier, when there is one. */
  coding?: CodingOut;
}

/** Normalises an AJCC stage group ("stage iib" -> "IIB"); undefined when it is not a known stage group. */
export function findStageGroup(value: string): StageGroup | undefined {
  const t = loadTables().staging;
  const wanted = value
    .trim()
    .replace(/^stage\s+/i, '')
    .toUpperCase();
  const canonical = t.stageGroups.find((g) => g.toUpperCase() === wanted);
  if (!canonical) {
    return undefined;
  }
  const coding = t.stageGroupCodes[canonical];
  return coding ? { value: canonical, coding: copy(coding) } : { value: canonical };
}

export function knownStageGroups(): string[] {
  return [...loadTables().staging.stageGroups];
}

export interface TreatmentTypeInfo {
  resource: 'Procedure' | 'MedicationStatement';
  category: ConceptOut;
}

/** Which resource a treatment type becomes, and its category codes. Throws for an unknown type. */
export function treatmentTypeInfo(type: string): TreatmentTypeInfo {
  const t = loadTables().treatmentTypes;
  const entry = must((t.types as Record<string, TreatmentTypesTable['types'][keyof TreatmentTypesTable['types']]>)[type], 'treatment type', type, FILES.treatmentTypes.file);
  return {
    resource: entry.resource,
    category: { coding: [...(entry.coding ?? []), { system: t.system, code: type, display: entry.display }], text: entry.display },
  };
}

export function cancerConditionCodes(): CancerConditionTable {
  return copy(loadTables().cancerCondition);
}

/** SNOMED laterality qualifier. Throws for an unknown laterality. */
export function lateralityCoding(laterality: string): CodingOut {
  return must((loadTables().cancerCondition.laterality as Record<string, CodingOut>)[laterality], 'laterality', laterality, FILES.cancerCondition.file);
}
