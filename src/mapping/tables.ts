import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { z } from 'zod';
import { dicomModalities, documentKinds, priorities, reasonCodes, referralKinds, treatmentTypes } from '../model';
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
    endpoint: url,
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

export const imagingSchema = z.strictObject({
  ...sourced,
  studyUidSystem: z.literal('urn:dicom:uid'),
  studyUidPrefix: z.literal('urn:oid:'),
  modalitySystem: url,
  modalities: z.record(z.enum(dicomModalities), z.string().min(1)),
  endpoint: z.strictObject({
    connectionType: codingSchema,
    payloadType: z.strictObject({ text: z.string().min(1) }),
    payloadMimeType: z.array(z.string().min(3)).min(1),
  }),
  studyPath: z.string().regex(/^\/[a-z]+\/$/),
});

export type ReferralCodesTable = z.output<typeof referralCodesSchema>;
export type DocumentKindsTable = z.output<typeof documentKindsSchema>;
export type IdentifierSystemsTable = z.output<typeof identifierSystemsSchema>;
export type RoutingTable = z.output<typeof routingSchema>;
export type StagingTable = z.output<typeof stagingSchema>;
export type TreatmentTypesTable = z.output<typeof treatmentTypesSchema>;
export type CancerConditionTable = z.output<typeof cancerConditionSchema>;
export type ImagingTable = z.output<typeof imagingSchema>;

/**
 * A table value as the lookups hand it out: deeply readonly. The tables are deep-frozen when they are
 * loaded, so writing to one throws (strict mode) instead of corrupting every later lookup.
 */
export type DeepReadonly<T> = T extends (infer U)[]
  ? ReadonlyArray<DeepReadonly<U>>
  : T extends ReadonlyArray<infer U>
    ? ReadonlyArray<DeepReadonly<U>>
    : T extends object
      ? { readonly [K in keyof T]: DeepReadonly<T[K]> }
      : T;

interface MutableTables {
  referralCodes: ReferralCodesTable;
  documentKinds: DocumentKindsTable;
  identifierSystems: IdentifierSystemsTable;
  routing: RoutingTable;
  staging: StagingTable;
  treatmentTypes: TreatmentTypesTable;
  cancerCondition: CancerConditionTable;
  imaging: ImagingTable;
}

/** Every table, validated and deep-frozen. */
export type MappingTables = DeepReadonly<MutableTables>;

const FILES: { [K in keyof MutableTables]: { file: string; schema: z.ZodType<MutableTables[K]> } } = {
  referralCodes: { file: 'referral-codes.json', schema: referralCodesSchema },
  documentKinds: { file: 'document-kinds.json', schema: documentKindsSchema },
  identifierSystems: { file: 'identifier-systems.json', schema: identifierSystemsSchema },
  routing: { file: 'routing.json', schema: routingSchema },
  staging: { file: 'staging.json', schema: stagingSchema },
  treatmentTypes: { file: 'treatment-types.json', schema: treatmentTypesSchema },
  cancerCondition: { file: 'cancer-condition.json', schema: cancerConditionSchema },
  imaging: { file: 'imaging.json', schema: imagingSchema },
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

function loadFile<K extends keyof MutableTables>(dir: string, key: K): MutableTables[K] {
  const { file, schema } = FILES[key];
  return parseFile(join(dir, file), schema);
}

/** Reads and validates one JSON file; throws with the file and (up to five) fields at fault. */
function parseFile<T>(path: string, schema: z.ZodType<T>): T {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new Error(`mapping table ${path}: ${(err as Error).message}`, { cause: err });
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issues = parsed.error.issues.slice(0, 5).map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`);
    throw new Error(`mapping table ${path} is invalid: ${issues.join('; ')}`);
  }
  return parsed.data;
}

/** Freezes a parsed JSON value and everything in it; returns it typed as readonly. */
function deepFreeze<T>(value: T): DeepReadonly<T> {
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    for (const v of Object.values(value)) {
      deepFreeze(v);
    }
    Object.freeze(value);
  }
  return value as DeepReadonly<T>;
}

/**
 * All tables, validated and deep-frozen. Loaded on first call and cached; throws with the file and
 * field at fault.
 */
export function loadTables(): MappingTables {
  if (!cached) {
    const dir = getMappingsDir();
    const tables: MutableTables = {
      referralCodes: loadFile(dir, 'referralCodes'),
      documentKinds: loadFile(dir, 'documentKinds'),
      identifierSystems: loadFile(dir, 'identifierSystems'),
      routing: loadFile(dir, 'routing'),
      staging: loadFile(dir, 'staging'),
      treatmentTypes: loadFile(dir, 'treatmentTypes'),
      cancerCondition: loadFile(dir, 'cancerCondition'),
      imaging: loadFile(dir, 'imaging'),
    };
    cached = deepFreeze(tables);
  }
  return cached;
}

/**
 * A table of mappings/ that only one module uses (e.g. fhir-intake.json, with the schema that module owns):
 * read from the same folder as loadTables() (getMappingsDir()), validated and deep-frozen like the shared
 * tables. Not cached: the caller keeps it, next to the loadTables() object it was loaded with.
 */
export function loadMappingFile<T>(file: string, schema: z.ZodType<T>): DeepReadonly<T> {
  return deepFreeze(parseFile(mappingFilePath(file), schema));
}

/** Where a mappings file is: in the folder the tables are read from (getMappingsDir). */
export function mappingFilePath(file: string): string {
  return join(getMappingsDir(), file);
}

/** A JSON table file at `path` checked with `schema`; throws naming the file and the first fields at fault. */
export function parseMappingFile<T>(path: string, schema: z.ZodType<T>): T {
  return parseFile(path, schema);
}

/** Drops the cache (tests, or after editing the files). */
export function resetTables(): void {
  cached = undefined;
}

// ----------------------------------------------------------------------------------------------
// Typed lookups. They hand out the cached, deep-frozen table objects themselves (no copies: lookups
// run for every resource of every bundle), typed readonly. A caller that needs to change a value
// copies just that value; the bundle mapper does not need to (compact() copies the whole resource
// tree into the bundle it returns, so a bundle never shares objects with the tables).

export interface CodingOut {
  readonly system: string;
  readonly code: string;
  readonly display?: string;
}
export interface ConceptOut {
  readonly coding?: ReadonlyArray<CodingOut>;
  readonly text?: string;
}

export type RoutingRule = DeepReadonly<RoutingTable['rules'][number]>;

function must<T>(value: T | undefined, what: string, key: string, file: string): T {
  if (value === undefined) {
    throw new Error(`no ${what} for "${key}" in mappings/${file}`);
  }
  return value;
}

/** Own entries only: the key comes from outside, so `toString` or `__proto__` must not find anything. */
function entry<T>(record: Readonly<Record<string, T>>, key: string): T | undefined {
  return Object.prototype.hasOwnProperty.call(record, key) ? record[key] : undefined;
}

/** ServiceRequest.category for every referral (SNOMED 3457005). */
export function referralCategory(): ConceptOut {
  return loadTables().referralCodes.category;
}

/** ServiceRequest.code for a referral kind. Throws for an unknown kind. */
export function referralKindCode(kind: string): ConceptOut {
  return must(entry<ConceptOut>(loadTables().referralCodes.kinds, kind), 'referral kind', kind, FILES.referralCodes.file);
}

/** The reasonCode every referral carries: v2-0336#S "Second Opinion". */
export function secondOpinionReason(): ConceptOut {
  return loadTables().referralCodes.secondOpinionReason;
}

/** ServiceRequest.reasonCode for a contract reason. Throws for an unknown reason. */
export function referralReasonCode(reason: string): ConceptOut {
  return must(entry<ConceptOut>(loadTables().referralCodes.reasons, reason), 'referral reason', reason, FILES.referralCodes.file);
}

/** FHIR request-priority code for a contract priority. Throws for an unknown priority. */
export function requestPriority(priority: string): 'routine' | 'urgent' | 'asap' | 'stat' {
  return must(entry<'routine' | 'urgent' | 'asap' | 'stat'>(loadTables().referralCodes.priorities, priority), 'priority', priority, FILES.referralCodes.file);
}

export function taskCodes(): MappingTables['referralCodes']['task'] {
  return loadTables().referralCodes.task;
}

export function consentCodes(): MappingTables['referralCodes']['consent'] {
  return loadTables().referralCodes.consent;
}

/** Why a SNOMED code must not be used, or undefined when it is not on the list. */
export function snomedDoNotUseReason(code: string): string | undefined {
  return entry(loadTables().referralCodes.snomedDoNotUse, code);
}

export interface DocumentKindCodes {
  readonly type: ConceptOut;
  readonly category: ConceptOut;
  readonly display: string;
}

/**
 * `compute(tables, key)`, memoised per key for the tables loaded now (tables loaded again start afresh).
 * A key `compute` throws for (unknown) is not remembered.
 */
function memoPerTables<V>(compute: (tables: MappingTables, key: string) => V): (key: string) => V {
  const cache = new WeakMap<MappingTables, Map<string, V>>();
  return (key) => {
    const tables = loadTables();
    let byKey = cache.get(tables);
    if (!byKey) {
      byKey = new Map();
      cache.set(tables, byKey);
    }
    let value = byKey.get(key);
    if (value === undefined) {
      value = compute(tables, key);
      byKey.set(key, value);
    }
    return value;
  };
}

/** DocumentReference.type (LOINC + local code + text) and category for a contract document kind. Throws for an unknown kind. */
export const documentKindCodes = memoPerTables<DocumentKindCodes>((tables, kind) => {
  const t = tables.documentKinds;
  const e = must(
    entry<DeepReadonly<DocumentKindsTable['kinds'][keyof DocumentKindsTable['kinds']]>>(t.kinds, kind),
    'document kind',
    kind,
    FILES.documentKinds.file
  );
  const coding: CodingOut[] = [];
  if (e.loinc) {
    coding.push({ system: 'http://loinc.org', code: e.loinc.code, display: e.loinc.display });
  }
  coding.push({ system: t.localSystem, code: kind, display: e.display });
  return deepFreeze<DocumentKindCodes>({ type: { coding, text: e.display }, category: t.category, display: e.display });
});

/** LOINC code a centre should use for its opinion report (11488-4 Consult note). */
export function opinionReportType(): CodingOut {
  const l = loadTables().documentKinds.opinionReport.loinc;
  return { system: 'http://loinc.org', code: l.code, display: l.display };
}

export function identifierSystems(): MappingTables['identifierSystems'] {
  return loadTables().identifierSystems;
}

/** The system under which a client's EHR externalId is kept. */
export function externalIdSystemFor(clientId: string): string {
  return loadTables().identifierSystems.externalIdSystemTemplate.replace('{clientId}', encodeURIComponent(clientId));
}

export function routingRules(): ReadonlyArray<RoutingRule> {
  return loadTables().routing.rules;
}

/** Observation.method / Condition.stage.type for a staging system. Throws for an unknown system. */
export function stagingSystem(system: string): ConceptOut {
  return must(entry<ConceptOut>(loadTables().staging.systems, system), 'staging system', system, FILES.staging.file);
}

/** Observation.code for the stage type (clinical, pathologic, or unspecified when absent). */
export function stageTypeCode(type: 'clinical' | 'pathologic' | undefined): ConceptOut {
  return loadTables().staging.stageTypes[type ?? 'unspecified'];
}

export interface StageGroup {
  /** Canonical spelling, e.g. "IIB". */
  readonly value: string;
  /** Verified SNOMED qualifier, when there is one. */
  readonly coding?: CodingOut;
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
  const coding = entry(t.stageGroupCodes, canonical);
  return coding ? { value: canonical, coding } : { value: canonical };
}

export function knownStageGroups(): string[] {
  return [...loadTables().staging.stageGroups];
}

export interface TreatmentTypeInfo {
  readonly resource: 'Procedure' | 'MedicationStatement';
  readonly category: ConceptOut;
}

/** Which resource a treatment type becomes, and its category codes. Throws for an unknown type. */
export const treatmentTypeInfo = memoPerTables<TreatmentTypeInfo>((tables, type) => {
  const t = tables.treatmentTypes;
  const e = must(
    entry<DeepReadonly<TreatmentTypesTable['types'][keyof TreatmentTypesTable['types']]>>(t.types, type),
    'treatment type',
    type,
    FILES.treatmentTypes.file
  );
  const info = deepFreeze<TreatmentTypeInfo>({
    resource: e.resource,
    category: { coding: [...(e.coding ?? []), { system: t.system, code: type, display: e.display }], text: e.display },
  });
  return info;
});

export function cancerConditionCodes(): MappingTables['cancerCondition'] {
  return loadTables().cancerCondition;
}

/** SNOMED laterality qualifier. Throws for an unknown laterality. */
export function lateralityCoding(laterality: string): CodingOut {
  return must(entry<CodingOut>(loadTables().cancerCondition.laterality, laterality), 'laterality', laterality, FILES.cancerCondition.file);
}

/** The imaging table (mappings/imaging.json): DICOM UID system, modality displays, the WADO-RS Endpoint's codes. */
export function imagingCodes(): MappingTables['imaging'] {
  return loadTables().imaging;
}

/** A DICOM modality code as a Coding (DCM). Throws for a code the table does not know (the schema and the table disagree). */
export function modalityCoding(code: string): CodingOut {
  const t = loadTables().imaging;
  const display = must(entry<string>(t.modalities, code), 'DICOM modality', code, FILES.imaging.file);
  return { system: t.modalitySystem, code, display };
}

/** The WADO-RS URL of a study: `<endpoint>/studies/<uid>` (a trailing slash of the endpoint is not doubled). */
export function studyUrl(endpoint: string, studyInstanceUid: string): string {
  return `${endpoint.replace(/\/+$/, '')}${loadTables().imaging.studyPath}${studyInstanceUid}`;
}
