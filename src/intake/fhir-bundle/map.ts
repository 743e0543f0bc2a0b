import { z } from 'zod';
import { type DeepReadonly, type MappingTables, loadMappingFile, loadTables, studyUrl } from '../../mapping';

/**
 * Reads a FHIR R4 referral Bundle, as a FHIR-capable EHR builds it (BSeR / Gravity style, domain.md sections 3.2,
 * 3.3, 6.1), into the gateway's own JSON referral (the body POST /referrals takes), before schema validation.
 *
 * The Bundle is a `transaction`, `batch`, `collection` or `message` (then its first entry is a MessageHeader whose
 * focus is the ServiceRequest, or a Task focusing it). From the ServiceRequest: identifier (externalId), code
 * (kind), priority, performer (destination, when it carries the gateway's destination identifier), reasonCode
 * (reasons, reasonText), note (questions), subject (Patient), requester (PractitionerRole, Practitioner or
 * Organization), reasonReference (the cancer Condition, with its stage Observation) and supportingInfo (Consent,
 * DocumentReferences, Procedures and MedicationStatements of the treatment history, the stage Observation).
 * Documents listed only in Task.input or pointing at the ServiceRequest from context.related are read too.
 *
 * It is the inverse of src/mapping/bundle.ts where that makes sense: the same code tables (mappings/*.json, read
 * from the same folder) and identifier systems are read back, so a bundle the gateway wrote reads back as the
 * referral it came from (except callbackUrl, which a bundle does not carry, and destination, which it always names).
 * What only the reverse direction needs is data in mappings/fhir-intake.json.
 *
 * References are resolved in every form a Bundle may use: `urn:uuid:` / `urn:oid:` fullUrls, relative `Type/id`
 * (against the referencing entry's base, then by type and id), absolute URLs equal to an entry's fullUrl, versioned
 * references (`/_history/n` ignored) and contained resources (`#id`). Pure; never throws for any input (a broken
 * mapping table, an installation fault, still throws).
 */
export interface BundleReading {
  /** ServiceRequest.identifier (the first, or the one whose system the table says is the EHR's placer id): the referral's externalId. */
  externalId: string | null;
  /** The referral as the gateway's JSON (what POST /referrals takes), before schema validation. Fields the bundle does not carry are left out, so the schema names them. */
  referral: Record<string, unknown>;
  /** Where a location of the JSON referral model (`patient.birthDate`, `patient.identifiers[0].value`, `documents[1].data`, `diagnosis.code`, `consent.patientAgreed`...) is in the submitted bundle, as a FHIRPath-style expression: `Bundle.entry[2].resource.birthDate`, `Bundle.entry[5].resource.content[0].attachment.data`. Fall back to the nearest resource (`Bundle.entry[2].resource`) or `Bundle` itself. */
  locate(modelPath: string): string;
  /** Problems only the bundle reader can see (no ServiceRequest; a reference that resolves to nothing in the bundle; two ServiceRequests), each with an expression into the bundle (e.g. `Bundle.entry[0].resource.subject`) and a readable message. */
  issues: Array<{ code: 'required' | 'structure' | 'invalid' | 'not-found'; message: string; expression: string }>;
}

export type BundleIssue = BundleReading['issues'][number];

// ------------------------------------------------------------------------------------------------
// Tables: the forward mapping's (mappings/*.json) and this reader's own (mappings/fhir-intake.json)

const codingFile = z.object({ system: z.string(), code: z.string(), display: z.string().optional() });

const fhirIntakeSchema = z.strictObject({
  _source: z.string().min(40),
  bundleTypes: z.array(z.string()).min(1),
  externalId: z.strictObject({ placerType: codingFile, neverTypes: z.array(codingFile) }),
  kindCodes: z.array(z.strictObject({ system: z.string(), code: z.string(), kind: z.string() })),
  kindWhenSecondOpinionReason: z.string(),
  questionNotePrefix: z.string(),
  diagnosisSystems: z.array(z.string()),
  histologySystems: z.array(z.string()),
  clinicalStatusCodes: z.record(z.string(), z.string()),
  stageTypeCodes: z.array(z.strictObject({ system: z.string(), code: z.string(), type: z.enum(['clinical', 'pathologic']) })),
  documentKindByLoinc: z.record(z.string(), z.string()),
  defaultDocumentKind: z.string(),
  defaultTreatmentType: z.string(),
  consentAgreed: z.strictObject({ status: z.array(z.string()), provisionType: z.array(z.string()) }),
});

/** The shared tables (src/mapping's loadTables(), validated and frozen there) and this reader's own. */
type RawTables = MappingTables & { readonly fhirIntake: DeepReadonly<z.output<typeof fhirIntakeSchema>> };

const LOINC = 'http://loinc.org';

/** The lookups the reader uses, built once from the tables: `system|code` keys to the contract's values. */
interface IntakeTables {
  raw: RawTables;
  kindByCoding: Map<string, string>;
  localKindSystem: string;
  reasonByCoding: Map<string, string>;
  localReasonSystem: string;
  secondOpinionReason: Set<string>;
  priorityByFhir: Map<string, string>;
  documentKindByLocal: Map<string, string>;
  documentKindByLoinc: Map<string, string>;
  localDocumentSystem: string;
  externalIdSystem: RegExp;
  stageSystemByCoding: Map<string, string>;
  stageSystemByText: Map<string, string>;
  stageTypeByCoding: Map<string, string>;
  stageTypeCodings: Set<string>;
  stageGroupByCoding: Map<string, string>;
  stageGroupByUpper: Map<string, string>;
  lateralityByCoding: Map<string, string>;
  clinicalStatusByCode: Map<string, string>;
  treatmentByCoding: Map<string, string>;
}

const key = (system: unknown, code: unknown): string => `${String(system)}|${String(code)}`;

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

let cachedTables: { shared: MappingTables; intake: IntakeTables } | undefined;

/**
 * The tables, loaded on first use and cached (built again when loadTables() hands out newly loaded tables). Throws (an
 * installation fault, not an input problem) when a file is missing or invalid.
 */
function intakeTables(): IntakeTables {
  const shared = loadTables();
  if (cachedTables?.shared === shared) return cachedTables.intake;
  const raw: RawTables = { ...shared, fhirIntake: loadMappingFile('fhir-intake.json', fhirIntakeSchema) };
  const rc = raw.referralCodes;
  const kindByCoding = new Map<string, string>();
  for (const [kind, concept] of Object.entries(rc.kinds)) {
    for (const c of concept.coding) if (!kindByCoding.has(key(c.system, c.code))) kindByCoding.set(key(c.system, c.code), kind);
  }
  for (const c of raw.fhirIntake.kindCodes) if (!kindByCoding.has(key(c.system, c.code))) kindByCoding.set(key(c.system, c.code), c.kind);
  const reasonByCoding = new Map<string, string>();
  for (const [reason, concept] of Object.entries(rc.reasons)) {
    for (const c of concept.coding) if (!reasonByCoding.has(key(c.system, c.code))) reasonByCoding.set(key(c.system, c.code), reason);
  }
  const dk = raw.documentKinds;
  const documentKindByLoinc = new Map<string, string>(Object.entries(raw.fhirIntake.documentKindByLoinc));
  for (const [kind, e] of Object.entries(dk.kinds)) if (e.loinc && !documentKindByLoinc.has(e.loinc.code)) documentKindByLoinc.set(e.loinc.code, kind);
  const st = raw.staging;
  const stageSystemByCoding = new Map<string, string>();
  const stageSystemByText = new Map<string, string>();
  for (const [system, concept] of Object.entries(st.systems)) {
    for (const c of concept.coding) stageSystemByCoding.set(key(c.system, c.code), system);
    if (concept.text) stageSystemByText.set(concept.text.toLowerCase(), system);
    stageSystemByText.set(system.toLowerCase(), system);
  }
  const stageTypeByCoding = new Map<string, string>();
  const stageTypeCodings = new Set<string>();
  for (const [type, concept] of Object.entries(st.stageTypes)) {
    for (const c of concept.coding) {
      stageTypeCodings.add(key(c.system, c.code));
      if (type !== 'unspecified') stageTypeByCoding.set(key(c.system, c.code), type);
    }
  }
  for (const c of raw.fhirIntake.stageTypeCodes) {
    stageTypeCodings.add(key(c.system, c.code));
    stageTypeByCoding.set(key(c.system, c.code), c.type);
  }
  const cc = raw.cancerCondition;
  const clinicalStatusByCode = new Map<string, string>(Object.entries(raw.fhirIntake.clinicalStatusCodes));
  for (const [status, c] of Object.entries(cc.clinicalStatus)) clinicalStatusByCode.set(c.code, status);
  const tt = raw.treatmentTypes;
  const treatmentByCoding = new Map<string, string>();
  for (const [type, e] of Object.entries(tt.types)) {
    treatmentByCoding.set(key(tt.system, type), type);
    for (const c of e.coding ?? []) if (!treatmentByCoding.has(key(c.system, c.code))) treatmentByCoding.set(key(c.system, c.code), type);
  }
  const template = raw.identifierSystems.externalIdSystemTemplate.split('{clientId}').map(escapeRegExp).join('[^/]+');
  const intake: IntakeTables = {
    raw,
    kindByCoding,
    localKindSystem: rc.localSystems.kind,
    reasonByCoding,
    localReasonSystem: rc.localSystems.reason,
    secondOpinionReason: new Set(rc.secondOpinionReason.coding.map((c) => key(c.system, c.code))),
    priorityByFhir: new Map(Object.entries(rc.priorities).map(([contract, fhir]) => [fhir, contract])),
    documentKindByLocal: new Map(Object.keys(dk.kinds).map((kind) => [key(dk.localSystem, kind), kind])),
    documentKindByLoinc,
    localDocumentSystem: dk.localSystem,
    externalIdSystem: new RegExp(`^${template}$`),
    stageSystemByCoding,
    stageSystemByText,
    stageTypeByCoding,
    stageTypeCodings,
    stageGroupByCoding: new Map(Object.entries(st.stageGroupCodes).map(([group, c]) => [key(c.system, c.code), group])),
    stageGroupByUpper: new Map(st.stageGroups.map((g) => [g.toUpperCase(), g])),
    lateralityByCoding: new Map(Object.entries(cc.laterality).map(([side, c]) => [key(c.system, c.code), side])),
    clinicalStatusByCode,
    treatmentByCoding,
  };
  cachedTables = { shared, intake };
  return intake;
}

// ------------------------------------------------------------------------------------------------
// Safe access to untrusted JSON

type Json = Record<string, unknown>;

function obj(v: unknown): Json | undefined {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : undefined;
}

function arr(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

/** A non-blank string, or undefined. */
function text(v: unknown): string | undefined {
  return typeof v === 'string' && v.trim() !== '' ? v : undefined;
}

/** Sets `out[k]` unless the value is undefined, so fields the bundle does not carry stay out. */
function put(out: Json, k: string, v: unknown): void {
  if (v !== undefined) out[k] = v;
}

/** A FHIR date or dateTime as the contract's date: the date part of a full date or dateTime; anything else as it is (the schema names it). */
function toDate(v: unknown): string | undefined {
  const s = str(v);
  if (s === undefined) return undefined;
  return /^\d{4}-\d{2}-\d{2}(T.*)?$/.test(s) ? s.slice(0, 10) : s;
}

function shown(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 60 ? `${v.slice(0, 60)}...` : v);
  if (Array.isArray(v)) return 'an array';
  return v === null ? 'null' : typeof v;
}

/** A resource found in the Bundle: a top-level entry's resource or one contained in it. */
interface Found {
  resource: Json;
  /** Its FHIRPath-style expression: `Bundle.entry[3].resource` or `Bundle.entry[3].resource.contained[0]`. */
  expr: string;
  /** The index of the top-level entry it is (or is contained in). */
  entry: number;
}

const RELATIVE_REFERENCE = /^([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})$/;
const ABSOLUTE_RESOURCE_URL = /^(https?:\/\/.+\/)[A-Z][A-Za-z]+\/[A-Za-z0-9\-.]{1,64}$/;

/** A reference or fullUrl as compared: without `/_history/n`, and urn:uuid / urn:oid in lower case. */
function urlKey(url: string): string {
  const u = url.replace(/\/_history\/[^/]*$/, '');
  return /^urn:(uuid|oid):/i.test(u) ? u.toLowerCase() : u;
}

/** The Bundle's resources, found by fullUrl, by type and id, and (from a resource) by contained `#id`. */
class BundleIndex {
  readonly entries: Array<Found | undefined> = [];
  private readonly fullUrls: Array<string | undefined> = [];
  private readonly byUrl = new Map<string, number>();
  private readonly byTypeId = new Map<string, number>();

  constructor(entries: unknown[], issue: (code: BundleIssue['code'], expression: string, message: string) => void) {
    entries.forEach((e, i) => {
      const entry = obj(e);
      const resource = obj(entry?.resource);
      const fullUrl = text(entry?.fullUrl);
      this.fullUrls.push(fullUrl);
      if (!resource) {
        this.entries.push(undefined);
        return;
      }
      this.entries.push({ resource, expr: `Bundle.entry[${i}].resource`, entry: i });
      if (fullUrl !== undefined) {
        const k = urlKey(fullUrl);
        const before = this.byUrl.get(k);
        if (before === undefined) {
          this.byUrl.set(k, i);
        } else {
          issue('invalid', `Bundle.entry[${i}].fullUrl`, `fullUrl ${shown(fullUrl)} is also the fullUrl of Bundle.entry[${before}]: each entry needs its own`);
        }
      }
      const type = text(resource.resourceType);
      const id = text(resource.id);
      if (type !== undefined && id !== undefined && !this.byTypeId.has(`${type}/${id}`)) this.byTypeId.set(`${type}/${id}`, i);
    });
  }

  /** The top-level resources of a type, in entry order. */
  ofType(type: string): Found[] {
    return this.entries.filter((f): f is Found => f?.resource.resourceType === type);
  }

  /** The resource a reference string names, seen from `from` (for contained `#id` and relative references). */
  resolve(reference: string, from: Found): Found | undefined {
    if (reference.startsWith('#')) {
      const container = this.entries[from.entry];
      if (!container) return undefined;
      if (reference === '#') return container;
      const id = reference.slice(1);
      const contained = arr(container.resource.contained);
      for (let j = 0; j < contained.length; j++) {
        const r = obj(contained[j]);
        if (r && r.id === id) return { resource: r, expr: `${container.expr}.contained[${j}]`, entry: from.entry };
      }
      return undefined;
    }
    const ref = urlKey(reference);
    const direct = this.byUrl.get(ref);
    if (direct !== undefined) return this.entries[direct];
    if (RELATIVE_REFERENCE.test(ref)) {
      // FHIR bundle rules: a relative reference is read against the referencing entry's base first.
      const base = ABSOLUTE_RESOURCE_URL.exec(this.fullUrls[from.entry] ?? '')?.[1];
      const againstBase = base === undefined ? undefined : this.byUrl.get(`${base}${ref}`);
      if (againstBase !== undefined) return this.entries[againstBase];
      const byId = this.byTypeId.get(ref);
      if (byId !== undefined) return this.entries[byId];
    }
    return undefined;
  }
}

// ------------------------------------------------------------------------------------------------
// The reader

type Coding = { system?: string; code?: string; display?: string };

/** Issues listed at most (as src/outcomes' zodIssues lists at most 100); the rest are counted in one more. */
const MAX_ISSUES = 100;

class Reader {
  readonly issues: BundleIssue[] = [];
  private readonly locations = new Map<string, string>();
  private index = new BundleIndex([], () => undefined);
  private fallback = 'Bundle';
  externalId: string | null = null;
  readonly referral: Json = {};
  /** Issues past MAX_ISSUES, counted rather than listed (a hostile bundle can have a problem per entry). */
  private unlisted = 0;

  constructor(private readonly t: IntakeTables) {}

  issue(code: BundleIssue['code'], expression: string, message: string): void {
    if (this.issues.length < MAX_ISSUES) {
      this.issues.push({ code, expression, message: `${expression}: ${message}` });
    } else {
      this.unlisted++;
    }
  }

  /** Closes the issue list: one more issue saying how many were left out, if any. */
  finish(): void {
    if (this.unlisted > 0) this.issues.push({ code: 'structure', expression: 'Bundle', message: `Bundle: ${this.unlisted} more problems not listed` });
  }

  /** Records where a model path comes from in the Bundle. */
  at(modelPath: string, expression: string): void {
    this.locations.set(modelPath, expression);
  }

  locate(modelPath: string): string {
    let p = modelPath.replace(/\.(\d+)(?=\.|\[|$)/g, '[$1]');
    for (;;) {
      const hit = this.locations.get(p);
      if (hit !== undefined) return hit;
      const cut = Math.max(p.lastIndexOf('.'), p.lastIndexOf('['));
      if (cut <= 0) return this.fallback;
      p = p.slice(0, cut);
    }
  }

  /**
   * Follows a Reference to a resource of one of `types`. An absent reference gives undefined quietly (the schema
   * names what is then missing); one that names nothing in the Bundle, or the wrong type, is an issue.
   */
  follow(refValue: unknown, refExpr: string, from: Found, types: readonly string[] | 'any', what: string): Found | undefined {
    const ref = obj(refValue);
    if (!ref) return undefined;
    const reference = text(ref.reference);
    if (reference === undefined) {
      if (ref.identifier !== undefined || ref.display !== undefined) {
        const wanted = types === 'any' ? 'resource' : types.join(' or ');
        this.issue('not-found', refExpr, `${what} names no entry of the Bundle (only an identifier or display): the Bundle must carry the ${wanted}`);
      }
      return undefined;
    }
    const found = this.index.resolve(reference, from);
    if (!found) {
      this.issue(
        'not-found',
        `${refExpr}.reference`,
        `${what} ${shown(reference)} resolves to nothing in the Bundle (no entry has that fullUrl or type and id)`
      );
      return undefined;
    }
    const type = str(found.resource.resourceType);
    if (type === undefined || (types !== 'any' && !types.includes(type))) {
      this.issue(
        'invalid',
        `${refExpr}.reference`,
        `${what} ${shown(reference)} is ${type ? `a ${type}` : 'not a resource'}, expected ${types === 'any' ? 'a resource' : types.join(' or ')}`
      );
      return undefined;
    }
    return found;
  }

  read(input: unknown): void {
    const bundle = obj(input);
    if (!bundle || bundle.resourceType !== 'Bundle') {
      const message = bundle
        ? `resourceType is ${shown(bundle.resourceType)}: a referral is sent as a FHIR Bundle`
        : `the body is ${shown(input)}: a referral is sent as a FHIR Bundle (a JSON object with resourceType Bundle)`;
      this.issue('structure', 'Bundle', message);
      return;
    }
    const type = str(bundle.type);
    if (type === undefined) {
      this.issue('required', 'Bundle.type', `Bundle.type is required (one of ${this.t.raw.fhirIntake.bundleTypes.join(', ')})`);
    } else if (!this.t.raw.fhirIntake.bundleTypes.includes(type)) {
      this.issue('invalid', 'Bundle.type', `a referral Bundle is a ${this.t.raw.fhirIntake.bundleTypes.join(', ')} Bundle, not ${shown(type)}`);
    }
    if (!Array.isArray(bundle.entry) || bundle.entry.length === 0) {
      this.issue('required', 'Bundle.entry', 'the Bundle has no entries: it must carry the ServiceRequest and the resources it refers to');
      return;
    }
    this.index = new BundleIndex(bundle.entry, (code, expression, message) => this.issue(code, expression, message));
    const sr = this.serviceRequest(type === 'message');
    if (!sr) return;
    this.fallback = sr.expr;
    this.readServiceRequest(sr);
  }

  /** The referral's ServiceRequest: the MessageHeader's focus (message Bundles), else the one ServiceRequest entry. */
  private serviceRequest(message: boolean): Found | undefined {
    if (message) {
      const header = this.index.entries[0];
      if (header?.resource.resourceType !== 'MessageHeader') {
        this.issue('structure', 'Bundle.entry[0]', 'a message Bundle starts with its MessageHeader');
      } else {
        const focus = arr(header.resource.focus);
        if (focus.length === 0) this.issue('required', `${header.expr}.focus`, 'the MessageHeader has no focus: it must point at the referral ServiceRequest');
        for (let k = 0; k < focus.length; k++) {
          const f = this.follow(focus[k], `${header.expr}.focus[${k}]`, header, ['ServiceRequest', 'Task'], 'MessageHeader.focus');
          if (f?.resource.resourceType === 'ServiceRequest') return f;
          if (f) {
            const fromTask = this.taskServiceRequest(f);
            if (fromTask) return fromTask;
          }
        }
      }
    }
    const all = this.index.ofType('ServiceRequest');
    if (all.length === 0) {
      this.issue('required', 'Bundle.entry', 'the Bundle holds no ServiceRequest: a referral Bundle carries one ServiceRequest, the referral');
      return undefined;
    }
    if (all.length > 1) {
      // A Task focusing exactly one of them says which is the referral.
      const candidates = new Set(all);
      const focused = new Set<Found>();
      for (const task of this.index.ofType('Task')) {
        const ref = text(obj(task.resource.focus)?.reference);
        const f = ref === undefined ? undefined : this.index.resolve(ref, task);
        if (f && candidates.has(f)) focused.add(f);
      }
      if (focused.size === 1) return [...focused][0];
      this.issue(
        'structure',
        all[1].expr,
        `the Bundle holds ${all.length} ServiceRequests (${all.map((f) => f.expr).join(', ')}): send one referral, with one ServiceRequest, per Bundle`
      );
    }
    return all[0];
  }

  /** The ServiceRequest a Task is about (focus, else basedOn). */
  private taskServiceRequest(task: Found): Found | undefined {
    if (task.resource.focus !== undefined) return this.follow(task.resource.focus, `${task.expr}.focus`, task, ['ServiceRequest'], 'Task.focus');
    const based = arr(task.resource.basedOn);
    return based.length > 0 ? this.follow(based[0], `${task.expr}.basedOn[0]`, task, ['ServiceRequest'], 'Task.basedOn') : undefined;
  }

  private readServiceRequest(sr: Found): void {
    const r = this.referral;
    const res = sr.resource;
    this.readExternalId(sr);
    put(r, 'externalId', this.externalId ?? undefined);
    put(r, 'kind', this.readKind(sr));
    this.at('priority', `${sr.expr}.priority`);
    const priority = str(res.priority);
    if (priority !== undefined) r.priority = this.t.priorityByFhir.get(priority) ?? priority;
    put(r, 'destination', this.readDestination(sr));
    this.readReasons(sr);
    this.readQuestions(sr);

    this.at('patient', `${sr.expr}.subject`);
    const patient = this.follow(res.subject, `${sr.expr}.subject`, sr, ['Patient'], 'ServiceRequest.subject');
    if (patient) r.patient = this.readPatient(patient);

    this.at('referrer', `${sr.expr}.requester`);
    const referrer = this.readReferrer(sr);
    if (referrer) r.referrer = referrer;

    const supporting = this.supportingInfo(sr);
    this.at('diagnosis', `${sr.expr}.reasonReference`);
    const diagnosis = this.readDiagnosis(sr, supporting);
    if (diagnosis) r.diagnosis = diagnosis;

    this.at('treatmentHistory', `${sr.expr}.supportingInfo`);
    const treatments = supporting.filter((f) => f.resource.resourceType === 'Procedure' || f.resource.resourceType === 'MedicationStatement');
    if (treatments.length > 0) r.treatmentHistory = treatments.map((f, n) => this.readTreatment(f, `treatmentHistory[${n}]`));

    this.at('documents', `${sr.expr}.supportingInfo`);
    const documents = this.documentReferences(sr, supporting);
    if (documents.length > 0) {
      r.documents = documents.map((f, n) =>
        f.resource.resourceType === 'ImagingStudy' ? this.readStudyDocument(f, `documents[${n}]`) : this.readDocument(f, `documents[${n}]`)
      );
    }

    this.at('consent', `${sr.expr}.supportingInfo`);
    const consent = supporting.find((f) => f.resource.resourceType === 'Consent') ?? this.index.ofType('Consent')[0];
    if (consent) r.consent = this.readConsent(consent);
  }

  /** The EHR's id: under the gateway's external-id system, else typed PLAC, else the first that is neither the gateway's own nor a filler's. */
  private readExternalId(sr: Found): void {
    this.at('externalId', `${sr.expr}.identifier`);
    const ids = arr(sr.resource.identifier).map((v) => obj(v));
    const gatewayReferral = this.t.raw.identifierSystems.systems.referral;
    const typed = (id: Json, c: Coding): boolean => arr(obj(id.type)?.coding).some((x) => obj(x)?.system === c.system && obj(x)?.code === c.code);
    const usable = (id: Json | undefined): id is Json =>
      id !== undefined &&
      text(id.value) !== undefined &&
      id.system !== gatewayReferral &&
      !this.t.raw.fhirIntake.externalId.neverTypes.some((c) => typed(id, c));
    const rules: Array<(id: Json) => boolean> = [
      (id) => typeof id.system === 'string' && this.t.externalIdSystem.test(id.system),
      (id) => typed(id, this.t.raw.fhirIntake.externalId.placerType),
      () => true,
    ];
    for (const rule of rules) {
      const i = ids.findIndex((id) => usable(id) && rule(id));
      if (i >= 0) {
        this.externalId = str(ids[i]?.value) ?? null;
        this.at('externalId', `${sr.expr}.identifier[${i}].value`);
        return;
      }
    }
  }

  /** ServiceRequest.code: the gateway's own kind code first, then the standard codes the kind table lists. */
  private readKind(sr: Found): string | undefined {
    this.at('kind', `${sr.expr}.code`);
    const codings = arr(obj(sr.resource.code)?.coding).map((c) => obj(c));
    const pick = (local: boolean): string | undefined => {
      for (let i = 0; i < codings.length; i++) {
        const c = codings[i];
        if (!c || (c.system === this.t.localKindSystem) !== local) continue;
        const kind = this.t.kindByCoding.get(key(c.system, c.code));
        if (kind !== undefined) {
          this.at('kind', `${sr.expr}.code.coding[${i}]`);
          return kind;
        }
      }
      return undefined;
    };
    const kind = pick(true) ?? pick(false);
    if (kind !== undefined) return kind;
    const reasons = arr(sr.resource.reasonCode);
    for (let i = 0; i < reasons.length; i++) {
      if (arr(obj(reasons[i])?.coding).some((c) => this.t.secondOpinionReason.has(key(obj(c)?.system, obj(c)?.code)))) {
        this.at('kind', `${sr.expr}.reasonCode[${i}]`);
        return this.t.raw.fhirIntake.kindWhenSecondOpinionReason;
      }
    }
    return undefined;
  }

  /** The centre, when the performer (or the Task's owner) carries the gateway's destination identifier; otherwise routing decides. */
  private readDestination(sr: Found): string | undefined {
    const system = this.t.raw.identifierSystems.systems.destination;
    const candidates: Array<{ ref: unknown; expr: string; from: Found }> = arr(sr.resource.performer).map((ref, i) => ({
      ref,
      expr: `${sr.expr}.performer[${i}]`,
      from: sr,
    }));
    for (const task of this.index.ofType('Task')) candidates.push({ ref: task.resource.owner, expr: `${task.expr}.owner`, from: task });
    for (const { ref, expr, from } of candidates) {
      const reference = text(obj(ref)?.reference);
      const org = reference === undefined ? undefined : this.index.resolve(reference, from);
      // A logical reference (identifier only) names the centre as well as a resolved Organization does.
      const [ids, base] =
        org?.resource.resourceType === 'Organization'
          ? [arr(org.resource.identifier), `${org.expr}.identifier`]
          : [[obj(ref)?.identifier], `${expr}.identifier`];
      for (let j = 0; j < ids.length; j++) {
        const id = obj(ids[j]);
        const value = text(id?.value);
        if (id?.system === system && value !== undefined) {
          this.at('destination', org ? `${base}[${j}].value` : `${base}.value`);
          return value;
        }
      }
    }
    return undefined;
  }

  /** reasonCode: the contract's reasons from their codings; v2-0336#S is the referral itself; the text of any other reason is reasonText. */
  private readReasons(sr: Found): void {
    const reasons: string[] = [];
    const texts: string[] = [];
    const list = arr(sr.resource.reasonCode);
    for (let i = 0; i < list.length; i++) {
      const concept = obj(list[i]);
      if (!concept) continue;
      const codings = arr(concept.coding).map((c) => obj(c));
      const local = codings.find((c) => c?.system === this.t.localReasonSystem && this.t.reasonByCoding.has(key(c.system, c.code)));
      const any = local ?? codings.find((c) => c !== undefined && this.t.reasonByCoding.has(key(c.system, c.code)));
      const reason = any ? this.t.reasonByCoding.get(key(any.system, any.code)) : undefined;
      if (reason !== undefined) {
        if (!reasons.includes(reason)) {
          this.at(`reasons[${reasons.length}]`, `${sr.expr}.reasonCode[${i}]`);
          reasons.push(reason);
        }
        continue;
      }
      if (codings.some((c) => this.t.secondOpinionReason.has(key(c?.system, c?.code)))) continue;
      const said = text(concept.text) ?? codings.map((c) => text(c?.display)).find((d) => d !== undefined);
      if (said !== undefined) {
        if (texts.length === 0) this.at('reasonText', `${sr.expr}.reasonCode[${i}].text`);
        texts.push(said);
      }
    }
    if (reasons.length > 0) this.referral.reasons = reasons;
    if (texts.length > 0) this.referral.reasonText = texts.join('\n');
  }

  /** note: the patient's questions (the forward mapping's prefix taken off). */
  private readQuestions(sr: Found): void {
    const prefix = this.t.raw.fhirIntake.questionNotePrefix;
    const questions: string[] = [];
    const notes = arr(sr.resource.note);
    for (let i = 0; i < notes.length; i++) {
      const note = text(obj(notes[i])?.text);
      if (note === undefined) continue;
      this.at(`questions[${questions.length}]`, `${sr.expr}.note[${i}].text`);
      questions.push(note.startsWith(prefix) ? note.slice(prefix.length) : note);
    }
    if (questions.length > 0) this.referral.questions = questions;
  }

  /** An identifier as the contract's {system, value}; `model` is where it goes. */
  private identifier(v: unknown, expr: string, model: string): Json {
    const id = obj(v) ?? {};
    this.at(model, expr);
    this.at(`${model}.system`, `${expr}.system`);
    this.at(`${model}.value`, `${expr}.value`);
    const out: Json = {};
    put(out, 'system', str(id.system));
    put(out, 'value', str(id.value));
    return out;
  }

  /** The identifiers with a system and a value (all of them as sent when none has both, so the schema names the gap). */
  private identifiers(list: unknown): Array<{ v: unknown; i: number }> {
    const all = arr(list).map((v, i) => ({ v, i }));
    const complete = all.filter(({ v }) => text(obj(v)?.system) !== undefined && text(obj(v)?.value) !== undefined);
    return complete.length > 0 ? complete : all;
  }

  /** A HumanName as the contract's {given, family, prefix}: the official one, else the usual one, else the first. */
  private name(list: unknown, expr: string, model: string): Json | undefined {
    const names = arr(list).map((n) => obj(n));
    let n = names.findIndex((x) => x?.use === 'official');
    if (n < 0) n = names.findIndex((x) => x?.use === 'usual');
    if (n < 0) n = names.findIndex((x) => x !== undefined && x.use !== 'old' && x.use !== 'maiden');
    this.at(model, `${expr}.name`);
    const name = n < 0 ? undefined : names[n];
    if (!name) return undefined;
    const at = `${expr}.name[${n}]`;
    this.at(model, at);
    const out: Json = {};
    const given = arr(name.given);
    this.at(`${model}.given`, `${at}.given`);
    const givenOut: string[] = [];
    given.forEach((g, k) => {
      if (typeof g !== 'string') return;
      this.at(`${model}.given[${givenOut.length}]`, `${at}.given[${k}]`);
      givenOut.push(g);
    });
    if (givenOut.length > 0) out.given = givenOut;
    this.at(`${model}.family`, `${at}.family`);
    put(out, 'family', str(name.family));
    const prefix = arr(name.prefix).filter((p): p is string => typeof p === 'string');
    this.at(`${model}.prefix`, `${at}.prefix`);
    if (prefix.length > 0) out.prefix = prefix;
    return out;
  }

  private readPatient(p: Found): Json {
    const res = p.resource;
    const out: Json = {};
    this.at('patient', p.expr);
    this.at('patient.identifiers', `${p.expr}.identifier`);
    out.identifiers = this.identifiers(res.identifier).map(({ v, i }, k) => this.identifier(v, `${p.expr}.identifier[${i}]`, `patient.identifiers[${k}]`));
    put(out, 'name', this.name(res.name, p.expr, 'patient.name'));
    this.at('patient.birthDate', `${p.expr}.birthDate`);
    put(out, 'birthDate', str(res.birthDate));
    this.at('patient.gender', `${p.expr}.gender`);
    put(out, 'gender', str(res.gender));
    const telecom = arr(res.telecom).map((c) => obj(c));
    for (const [system, field] of [
      ['phone', 'phone'],
      ['email', 'email'],
    ] as const) {
      const i = telecom.findIndex((c) => c?.system === system && text(c.value) !== undefined);
      if (i >= 0) {
        this.at(`patient.${field}`, `${p.expr}.telecom[${i}].value`);
        put(out, field, str(telecom[i]?.value));
      }
    }
    return out;
  }

  /** requester: a PractitionerRole (practitioner + organization), a Practitioner or an Organization (the other half from a PractitionerRole in the Bundle linking them). */
  private readReferrer(sr: Found): Json | undefined {
    const requester = this.follow(
      sr.resource.requester,
      `${sr.expr}.requester`,
      sr,
      ['PractitionerRole', 'Practitioner', 'Organization'],
      'ServiceRequest.requester'
    );
    if (!requester) return undefined;
    let practitioner: Found | undefined;
    let organization: Found | undefined;
    const roleLinks = (role: Found): { practitioner?: Found; organization?: Found } => ({
      practitioner: this.follow(role.resource.practitioner, `${role.expr}.practitioner`, role, ['Practitioner'], 'PractitionerRole.practitioner'),
      organization: this.follow(role.resource.organization, `${role.expr}.organization`, role, ['Organization'], 'PractitionerRole.organization'),
    });
    const quietly = (role: Found, field: 'practitioner' | 'organization'): Found | undefined => {
      const ref = text(obj(role.resource[field])?.reference);
      return ref === undefined ? undefined : this.index.resolve(ref, role);
    };
    switch (requester.resource.resourceType) {
      case 'PractitionerRole':
        this.at('referrer', requester.expr);
        ({ practitioner, organization } = roleLinks(requester));
        this.at('referrer.practitioner', `${requester.expr}.practitioner`);
        this.at('referrer.organization', `${requester.expr}.organization`);
        break;
      case 'Practitioner': {
        practitioner = requester;
        this.at('referrer.organization', `${sr.expr}.requester`);
        const role = this.index.ofType('PractitionerRole').find((r) => quietly(r, 'practitioner')?.resource === requester.resource);
        if (role) organization = roleLinks(role).organization;
        break;
      }
      default: {
        organization = requester;
        this.at('referrer.practitioner', `${sr.expr}.requester`);
        const role = this.index.ofType('PractitionerRole').find((r) => quietly(r, 'organization')?.resource === requester.resource);
        if (role) practitioner = roleLinks(role).practitioner;
      }
    }
    const out: Json = {};
    if (practitioner) {
      const p = practitioner;
      this.at('referrer.practitioner', p.expr);
      const pr: Json = {};
      const ids = this.identifiers(p.resource.identifier);
      this.at('referrer.practitioner.identifier', `${p.expr}.identifier`);
      if (ids.length > 0) pr.identifier = this.identifier(ids[0].v, `${p.expr}.identifier[${ids[0].i}]`, 'referrer.practitioner.identifier');
      put(pr, 'name', this.name(p.resource.name, p.expr, 'referrer.practitioner.name'));
      out.practitioner = pr;
    }
    if (organization) {
      const o = organization;
      this.at('referrer.organization', o.expr);
      const org: Json = {};
      const ids = this.identifiers(o.resource.identifier);
      this.at('referrer.organization.identifier', `${o.expr}.identifier`);
      if (ids.length > 0) org.identifier = this.identifier(ids[0].v, `${o.expr}.identifier[${ids[0].i}]`, 'referrer.organization.identifier');
      this.at('referrer.organization.name', `${o.expr}.name`);
      put(org, 'name', str(o.resource.name));
      out.organization = org;
    }
    return out;
  }

  /** supportingInfo, resolved (each reference that names nothing is an issue). */
  private supportingInfo(sr: Found): Found[] {
    const out: Found[] = [];
    const seen = new Set<Json>();
    arr(sr.resource.supportingInfo).forEach((ref, i) => {
      const f = this.follow(ref, `${sr.expr}.supportingInfo[${i}]`, sr, 'any', 'ServiceRequest.supportingInfo');
      if (f && !seen.has(f.resource)) {
        seen.add(f.resource);
        out.push(f);
      }
    });
    return out;
  }

  /** A coding as the contract's {system, code, display}; `conceptText` stands in for a missing display (when it is not just the code). */
  private coding(c: Json, expr: string, model: string, conceptText?: string): Json {
    this.at(model, expr);
    this.at(`${model}.system`, `${expr}.system`);
    this.at(`${model}.code`, `${expr}.code`);
    this.at(`${model}.display`, `${expr}.display`);
    const out: Json = {};
    put(out, 'system', str(c.system));
    put(out, 'code', str(c.code));
    const display = str(c.display) ?? (conceptText !== undefined && conceptText !== c.code ? conceptText : undefined);
    put(out, 'display', display);
    return out;
  }

  /** The coding of a CodeableConcept from the first preferred system that has one, else its first coding. */
  private preferredCoding(conceptValue: unknown, expr: string, model: string, systemKeys: readonly string[]): Json | undefined {
    const concept = obj(conceptValue);
    this.at(model, expr);
    if (!concept) return undefined;
    const codings = arr(concept.coding).map((c) => obj(c));
    const codeSystems: Readonly<Record<string, string | undefined>> = this.t.raw.cancerCondition.codeSystems;
    const systems = systemKeys.map((k) => codeSystems[k]).filter((s) => s !== undefined);
    let i = -1;
    for (const s of systems) {
      i = codings.findIndex((c) => c?.system === s);
      if (i >= 0) break;
    }
    if (i < 0) i = codings.findIndex((c) => c !== undefined);
    const c = i < 0 ? undefined : codings[i];
    return c ? this.coding(c, `${expr}.coding[${i}]`, model, str(concept.text)) : undefined;
  }

  /** The cancer Condition (reasonReference, else the Bundle's first Condition) in mCODE Primary Cancer Condition shape. */
  private readDiagnosis(sr: Found, supporting: Found[]): Json | undefined {
    const reasons = arr(sr.resource.reasonReference);
    let condition: Found | undefined;
    for (let i = 0; i < reasons.length && !condition; i++) {
      condition = this.follow(reasons[i], `${sr.expr}.reasonReference[${i}]`, sr, REASON_TYPES, 'ServiceRequest.reasonReference');
      if (condition?.resource.resourceType !== 'Condition') condition = undefined;
    }
    condition ??= this.index.ofType('Condition')[0];
    if (!condition) return undefined;
    const c = condition;
    const res = c.resource;
    const cc = this.t.raw.cancerCondition;
    const intake = this.t.raw.fhirIntake;
    const out: Json = {};
    this.at('diagnosis', c.expr);

    put(out, 'code', this.preferredCoding(res.code, `${c.expr}.code`, 'diagnosis.code', intake.diagnosisSystems));

    const site = obj(arr(res.bodySite)[0]);
    const siteExpr = `${c.expr}.bodySite[0]`;
    if (site) {
      const snomed = ['snomed'];
      const coded = arr(site.coding).some((x) => obj(x) !== undefined);
      if (coded) put(out, 'bodySite', this.preferredCoding(site, siteExpr, 'diagnosis.bodySite', snomed));
    }
    // Laterality: the mCODE qualifier extension on the body site (or, tolerated, on the Condition).
    const lateralityExts = [
      ...arr(site?.extension).map((e, i) => ({ e: obj(e), expr: `${siteExpr}.extension[${i}]` })),
      ...arr(res.extension).map((e, i) => ({ e: obj(e), expr: `${c.expr}.extension[${i}]` })),
    ].filter(({ e }) => e?.url === cc.extensions.laterality);
    for (const { e, expr } of lateralityExts) {
      const codings = arr(obj(e?.valueCodeableConcept)?.coding);
      for (let k = 0; k < codings.length; k++) {
        const side = this.t.lateralityByCoding.get(key(obj(codings[k])?.system, obj(codings[k])?.code));
        if (side !== undefined && out.laterality === undefined) {
          this.at('diagnosis.laterality', `${expr}.valueCodeableConcept.coding[${k}]`);
          out.laterality = side;
        }
      }
    }

    const extensions = arr(res.extension).map((e) => obj(e));
    const histology = extensions.findIndex((e) => e?.url === cc.extensions.histology);
    if (histology >= 0) {
      const hExpr = `${c.expr}.extension[${histology}].valueCodeableConcept`;
      put(out, 'histology', this.preferredCoding(extensions[histology]?.valueCodeableConcept, hExpr, 'diagnosis.histology', intake.histologySystems));
    }

    const stage = this.readStage(c, supporting);
    if (stage) out.stage = stage;

    const status = arr(obj(res.clinicalStatus)?.coding).map((x) => obj(x));
    const si = status.findIndex((x) => typeof x?.code === 'string');
    if (si >= 0) {
      const code = String(status[si]?.code);
      this.at('diagnosis.clinicalStatus', `${c.expr}.clinicalStatus.coding[${si}].code`);
      out.clinicalStatus = this.t.clinicalStatusByCode.get(code) ?? code;
    }

    const asserted = extensions.findIndex((e) => e?.url === cc.extensions.assertedDate && typeof e.valueDateTime === 'string');
    if (asserted >= 0) {
      this.at('diagnosis.diagnosedOn', `${c.expr}.extension[${asserted}].valueDateTime`);
      put(out, 'diagnosedOn', toDate(extensions[asserted]?.valueDateTime));
    } else if (typeof res.onsetDateTime === 'string') {
      this.at('diagnosis.diagnosedOn', `${c.expr}.onsetDateTime`);
      put(out, 'diagnosedOn', toDate(res.onsetDateTime));
    } else if (typeof res.recordedDate === 'string') {
      this.at('diagnosis.diagnosedOn', `${c.expr}.recordedDate`);
      put(out, 'diagnosedOn', toDate(res.recordedDate));
    }
    return out;
  }

  /** Whether an Observation is coded as a stage group (Observation.code in the staging table's stage types). */
  private isStageObservation(f: Found): boolean {
    return (
      f.resource.resourceType === 'Observation' && arr(obj(f.resource.code)?.coding).some((c) => this.t.stageTypeCodings.has(key(obj(c)?.system, obj(c)?.code)))
    );
  }

  /** The stage: Condition.stage.assessment's Observation, else a stage Observation in supportingInfo or about the Condition, else Condition.stage.summary. */
  private readStage(condition: Found, supporting: Found[]): Json | undefined {
    const stage0 = obj(arr(condition.resource.stage)[0]);
    const stageExpr = `${condition.expr}.stage[0]`;
    let obs: Found | undefined;
    const assessments = arr(stage0?.assessment);
    for (let i = 0; i < assessments.length && !obs; i++) {
      obs = this.follow(
        assessments[i],
        `${stageExpr}.assessment[${i}]`,
        condition,
        ['Observation', 'ClinicalImpression', 'DiagnosticReport'],
        'Condition.stage.assessment'
      );
      if (obs?.resource.resourceType !== 'Observation') obs = undefined;
    }
    obs ??= supporting.find((f) => this.isStageObservation(f));
    obs ??= this.index
      .ofType('Observation')
      .find(
        (f) =>
          this.isStageObservation(f) && arr(f.resource.focus).some((r) => this.index.resolve(text(obj(r)?.reference) ?? '', f)?.resource === condition.resource)
      );
    const summary = obj(stage0?.summary);
    if (!obs && !summary) return undefined;
    const out: Json = {};
    const base = obs?.expr ?? stageExpr;
    this.at('diagnosis.stage', base);

    // The staging system: Observation.method, else Condition.stage.type.
    const [method, methodExpr] = obs?.resource.method !== undefined ? [obj(obs.resource.method), `${base}.method`] : [obj(stage0?.type), `${stageExpr}.type`];
    this.at('diagnosis.stage.system', methodExpr);
    if (method) {
      const codings = arr(method.coding).map((c) => obj(c));
      const system =
        codings.map((c) => this.t.stageSystemByCoding.get(key(c?.system, c?.code))).find((s) => s !== undefined) ??
        this.t.stageSystemByText.get((text(method.text) ?? '').trim().toLowerCase());
      // An unknown staging system is passed on as sent, so the schema refuses it rather than the reader calling it AJCC 8th.
      put(out, 'system', system ?? text(method.text) ?? codings.map((c) => text(c?.code)).find((s) => s !== undefined));
    }

    if (obs) {
      this.at('diagnosis.stage.type', `${base}.code`);
      const type = arr(obj(obs.resource.code)?.coding)
        .map((c) => this.t.stageTypeByCoding.get(key(obj(c)?.system, obj(c)?.code)))
        .find((s) => s !== undefined);
      put(out, 'type', type);
    }

    const valueSource: Array<[unknown, string]> = obs
      ? [
          [obs.resource.valueCodeableConcept, `${base}.valueCodeableConcept`],
          [obs.resource.valueString, `${base}.valueString`],
        ]
      : [];
    valueSource.push([summary, `${stageExpr}.summary`]);
    for (const [v, expr] of valueSource) {
      const value = this.stageValue(v);
      if (value !== undefined) {
        this.at('diagnosis.stage.value', expr);
        out.value = value;
        break;
      }
    }
    return out;
  }

  /** A stage group from a coded value (the table's SNOMED qualifiers), a text such as `Stage IIB (AJCC 8th edition)`, or a string. */
  private stageValue(v: unknown): string | undefined {
    const concept = obj(v);
    const codings = arr(concept?.coding).map((c) => obj(c));
    const coded = codings.map((c) => this.t.stageGroupByCoding.get(key(c?.system, c?.code))).find((s) => s !== undefined);
    if (coded !== undefined) return coded;
    const candidates = [
      typeof v === 'string' ? v : undefined,
      str(concept?.text),
      ...codings.map((c) => str(c?.display)),
      ...codings.map((c) => str(c?.code)),
    ].filter((s): s is string => s !== undefined && s.trim() !== '');
    for (const s of candidates) {
      const bare = s
        .trim()
        .replace(/\s*\([^)]*\)\s*$/, '')
        .replace(/^.*\bstage\s+/i, '')
        .trim()
        .toUpperCase();
      const group = this.t.stageGroupByUpper.get(bare);
      if (group !== undefined) return group;
    }
    return candidates[0];
  }

  /** A Procedure or MedicationStatement of the treatment history. */
  private readTreatment(f: Found, model: string): Json {
    const res = f.resource;
    const out: Json = {};
    this.at(model, f.expr);
    const categories = [res.category, ...arr(res.category)].map((c) => obj(c)).filter((c) => c !== undefined);
    this.at(`${model}.type`, `${f.expr}.category`);
    const type = categories
      .flatMap((c) => arr(c.coding))
      .map((c) => this.t.treatmentByCoding.get(key(obj(c)?.system, obj(c)?.code)))
      .find((s) => s !== undefined);
    out.type = type ?? this.t.raw.fhirIntake.defaultTreatmentType;
    const codeField = res.resourceType === 'MedicationStatement' ? 'medicationCodeableConcept' : 'code';
    const code = obj(res[codeField]);
    const codings = arr(code?.coding).map((c) => obj(c));
    const first = codings.findIndex((c) => c !== undefined);
    this.at(`${model}.description`, `${f.expr}.${codeField}.text`);
    put(out, 'description', text(code?.text) ?? (first >= 0 ? text(codings[first]?.display) : undefined));
    const firstCoding = first >= 0 ? codings[first] : undefined;
    if (firstCoding) out.code = this.coding(firstCoding, `${f.expr}.${codeField}.coding[${first}]`, `${model}.code`);
    const [when, period] = res.resourceType === 'MedicationStatement' ? ['effective', 'effectivePeriod'] : ['performed', 'performedPeriod'];
    if (typeof res[`${when}DateTime`] === 'string') {
      this.at(`${model}.start`, `${f.expr}.${when}DateTime`);
      put(out, 'start', toDate(res[`${when}DateTime`]));
    } else {
      const p = obj(res[period]);
      this.at(`${model}.start`, `${f.expr}.${period}.start`);
      this.at(`${model}.end`, `${f.expr}.${period}.end`);
      put(out, 'start', toDate(p?.start));
      put(out, 'end', toDate(p?.end));
    }
    return out;
  }

  /**
   * The documents: DocumentReferences and ImagingStudies of supportingInfo, then of Task.input, then the
   * DocumentReferences whose context.related names the ServiceRequest; each once. An ImagingStudy that one of these
   * DocumentReferences names in context.related is read with that document (its DICOM bytes or its WADO-RS URL), not
   * as a document of its own.
   */
  private documentReferences(sr: Found, supporting: Found[]): Found[] {
    const isDocument = (f: Found | undefined): f is Found => f?.resource.resourceType === 'DocumentReference' || f?.resource.resourceType === 'ImagingStudy';
    const docs = supporting.filter(isDocument);
    const seen = new Set<Json>(docs.map((d) => d.resource));
    const add = (f: Found | undefined): void => {
      if (isDocument(f) && !seen.has(f.resource)) {
        seen.add(f.resource);
        docs.push(f);
      }
    };
    for (const task of this.index.ofType('Task')) {
      const ref = text(obj(task.resource.focus)?.reference) ?? text(obj(arr(task.resource.basedOn)[0])?.reference);
      if (ref === undefined || this.index.resolve(ref, task)?.resource !== sr.resource) continue;
      arr(task.resource.input).forEach((input, i) => {
        const value = obj(input)?.valueReference;
        if (value !== undefined) add(this.follow(value, `${task.expr}.input[${i}].valueReference`, task, 'any', 'Task.input'));
      });
    }
    for (const doc of this.index.ofType('DocumentReference')) {
      const related = arr(obj(doc.resource.context)?.related);
      if (related.some((r) => this.index.resolve(text(obj(r)?.reference) ?? '', doc)?.resource === sr.resource)) add(doc);
    }
    const described = new Set<Json>();
    for (const d of docs) {
      const study = d.resource.resourceType === 'DocumentReference' ? this.relatedStudy(d) : undefined;
      if (study) described.add(study.resource);
    }
    return docs.filter((d) => d.resource.resourceType !== 'ImagingStudy' || !described.has(d.resource));
  }

  /** The ImagingStudy a DocumentReference names in context.related (the first), if the Bundle holds it. */
  private relatedStudy(doc: Found): Found | undefined {
    for (const r of arr(obj(doc.resource.context)?.related)) {
      const f = this.index.resolve(text(obj(r)?.reference) ?? '', doc);
      if (f?.resource.resourceType === 'ImagingStudy') return f;
    }
    return undefined;
  }

  /**
   * An ImagingStudy as a document's `study`: the Study Instance UID (identifier urn:dicom:uid, urn:oid:<uid>),
   * modalities (DCM codings of modality, else of the series), series and instance counts, description, start, and the
   * address of its first Endpoint.
   */
  private readStudy(f: Found, model: string): Json {
    const res = f.resource;
    const im = this.t.raw.imaging;
    const out: Json = {};
    this.at(model, f.expr);
    const ids = arr(res.identifier).map((v) => obj(v));
    const i = ids.findIndex((id) => id?.system === im.studyUidSystem && text(id.value) !== undefined);
    this.at(`${model}.studyInstanceUid`, i >= 0 ? `${f.expr}.identifier[${i}].value` : `${f.expr}.identifier`);
    const uid = i >= 0 ? text(ids[i]?.value) : undefined;
    put(out, 'endpoint', this.studyEndpoint(f, model));
    put(out, 'studyInstanceUid', uid?.startsWith(im.studyUidPrefix) ? uid.slice(im.studyUidPrefix.length) : uid);
    const series = arr(res.series).map((s) => obj(s));
    const dcm = (c: Json | undefined): string | undefined => (c?.system === im.modalitySystem ? str(c.code) : undefined);
    let modalities = arr(res.modality).map((c) => dcm(obj(c)));
    this.at(`${model}.modalities`, `${f.expr}.modality`);
    if (!modalities.some((m) => m !== undefined)) {
      modalities = series.map((s) => dcm(obj(s?.modality)));
      this.at(`${model}.modalities`, `${f.expr}.series`);
    }
    const codes = [...new Set(modalities.filter((m): m is string => m !== undefined))];
    if (codes.length > 0) out.modalities = codes;
    this.at(`${model}.seriesCount`, `${f.expr}.numberOfSeries`);
    // numberOfSeries, else the series the study lists (none listed: left out, so the schema names it).
    put(out, 'seriesCount', typeof res.numberOfSeries === 'number' ? res.numberOfSeries : series.length || undefined);
    this.at(`${model}.instanceCount`, `${f.expr}.numberOfInstances`);
    put(out, 'instanceCount', typeof res.numberOfInstances === 'number' ? res.numberOfInstances : undefined);
    this.at(`${model}.description`, `${f.expr}.description`);
    put(out, 'description', text(res.description));
    this.at(`${model}.started`, `${f.expr}.started`);
    put(out, 'started', str(res.started));
    return out;
  }

  /** The address of the ImagingStudy's first Endpoint in the Bundle (a DICOMweb base), if any. */
  private studyEndpoint(f: Found, model: string): string | undefined {
    const refs = arr(f.resource.endpoint);
    if (refs.length === 0) return undefined;
    const endpoint = this.follow(refs[0], `${f.expr}.endpoint[0]`, f, ['Endpoint'], 'ImagingStudy.endpoint');
    if (!endpoint) return undefined;
    this.at(`${model}.endpoint`, `${endpoint.expr}.address`);
    return str(endpoint.resource.address);
  }

  /** An ImagingStudy listed on its own (no DocumentReference): a DICOMweb reference, as an imaging-study document. */
  private readStudyDocument(f: Found, model: string): Json {
    const study = this.readStudy(f, `${model}.study`);
    const out: Json = { kind: 'imaging-study' };
    this.at(model, f.expr);
    this.at(`${model}.kind`, f.expr);
    this.at(`${model}.title`, `${f.expr}.description`);
    put(out, 'title', text(f.resource.description) ?? this.t.raw.documentKinds.kinds['imaging-study'].display);
    this.at(`${model}.date`, `${f.expr}.started`);
    put(out, 'date', toDate(f.resource.started));
    this.at(`${model}.contentType`, f.expr);
    out.contentType = 'application/dicom';
    out.study = study;
    return out;
  }

  /** A DocumentReference: kind from its type, the first attachment with data or a url; a url naming a Binary of the Bundle gives that Binary's data. */
  private readDocument(f: Found, model: string): Json {
    const res = f.resource;
    const out: Json = {};
    this.at(model, f.expr);
    out.kind = this.documentKind(f, model);
    const contents = arr(res.content).map((c) => obj(obj(c)?.attachment));
    let ci = contents.findIndex((a) => a !== undefined && (text(a.data) !== undefined || text(a.url) !== undefined));
    if (ci < 0) ci = contents.findIndex((a) => a !== undefined);
    const attachment = ci < 0 ? undefined : contents[ci];
    const aExpr = `${f.expr}.content[${ci < 0 ? 0 : ci}].attachment`;
    this.at(`${model}.data`, aExpr);
    this.at(`${model}.url`, aExpr);

    const typeText =
      text(obj(res.type)?.text) ??
      arr(obj(res.type)?.coding)
        .map((c) => text(obj(c)?.display))
        .find((d) => d !== undefined);
    const titles: Array<[string | undefined, string]> = [
      [text(attachment?.title), `${aExpr}.title`],
      [text(res.description), `${f.expr}.description`],
      [typeText, `${f.expr}.type`],
    ];
    const title = titles.find(([v]) => v !== undefined);
    this.at(`${model}.title`, title?.[1] ?? `${aExpr}.title`);
    put(out, 'title', title?.[0]);

    const period = obj(obj(res.context)?.period);
    if (attachment?.creation !== undefined) {
      this.at(`${model}.date`, `${aExpr}.creation`);
      put(out, 'date', toDate(attachment.creation));
    } else if (period?.start !== undefined) {
      this.at(`${model}.date`, `${f.expr}.context.period.start`);
      put(out, 'date', toDate(period.start));
    }
    this.at(`${model}.contentType`, `${aExpr}.contentType`);
    put(out, 'contentType', str(attachment?.contentType));
    this.at(`${model}.language`, `${aExpr}.language`);
    put(out, 'language', str(attachment?.language));

    const data = str(attachment?.data);
    const url = str(attachment?.url);
    const related = this.relatedStudy(f);
    const study = related ? this.readStudy(related, `${model}.study`) : undefined;
    if (study) {
      out.study = study;
      // A document about an ImagingStudy is an imaging study, unless the gateway's own document-kind code says otherwise.
      const local = arr(obj(res.type)?.coding).some((c) => obj(c)?.system === this.t.localDocumentSystem);
      if (!local) out.kind = 'imaging-study';
    }
    if (data !== undefined) {
      this.at(`${model}.data`, `${aExpr}.data`);
      out.data = data;
    } else if (
      url !== undefined &&
      !(study && typeof study.endpoint === 'string' && typeof study.studyInstanceUid === 'string' && url === studyUrl(study.endpoint, study.studyInstanceUid))
    ) {
      // (A url that is the study's own WADO-RS URL is the DICOMweb reference itself: `study` alone says it.)
      this.readAttachmentUrl(f, url, aExpr, model, out);
    }
    return out;
  }

  private documentKind(f: Found, model: string): string {
    const codings = arr(obj(f.resource.type)?.coding).map((c) => obj(c));
    this.at(`${model}.kind`, `${f.expr}.type`);
    const local = codings.findIndex((c) => this.t.documentKindByLocal.has(key(c?.system, c?.code)));
    if (local >= 0) {
      this.at(`${model}.kind`, `${f.expr}.type.coding[${local}]`);
      return this.t.documentKindByLocal.get(key(codings[local]?.system, codings[local]?.code)) ?? this.t.raw.fhirIntake.defaultDocumentKind;
    }
    for (let i = 0; i < codings.length; i++) {
      const c = codings[i];
      const kind = c?.system === LOINC && typeof c.code === 'string' ? this.t.documentKindByLoinc.get(c.code) : undefined;
      if (kind !== undefined) {
        this.at(`${model}.kind`, `${f.expr}.type.coding[${i}]`);
        return kind;
      }
    }
    return this.t.raw.fhirIntake.defaultDocumentKind;
  }

  /** attachment.url: a Binary in the Bundle (its data and contentType), an http(s) URL kept as the document's url, or an issue. */
  private readAttachmentUrl(f: Found, url: string, aExpr: string, model: string, out: Json): void {
    const binary = this.index.resolve(url, f);
    if (binary) {
      if (binary.resource.resourceType !== 'Binary') {
        this.issue('invalid', `${aExpr}.url`, `attachment.url ${shown(url)} is a ${String(binary.resource.resourceType)}, expected a Binary or an http(s) URL`);
        return;
      }
      this.at(`${model}.data`, `${binary.expr}.data`);
      put(out, 'data', str(binary.resource.data));
      if (out.contentType === undefined) {
        this.at(`${model}.contentType`, `${binary.expr}.contentType`);
        put(out, 'contentType', str(binary.resource.contentType));
      }
      return;
    }
    this.at(`${model}.url`, `${aExpr}.url`);
    if (!/^https?:\/\//i.test(url) && (url.startsWith('#') || /^urn:/i.test(url) || RELATIVE_REFERENCE.test(urlKey(url)))) {
      this.issue('not-found', `${aExpr}.url`, `attachment.url ${shown(url)} names no Binary of the Bundle`);
    }
    out.url = url;
  }

  /** Consent: agreed when its status and provision.type say so (active, permit); its dateTime is the consent date. */
  private readConsent(f: Found): Json {
    const res = f.resource;
    const rule = this.t.raw.fhirIntake.consentAgreed;
    const out: Json = {};
    this.at('consent', f.expr);
    const statusOk = rule.status.includes(String(res.status));
    const provisionOk = rule.provisionType.includes(String(obj(res.provision)?.type));
    this.at('consent.patientAgreed', statusOk ? `${f.expr}.provision.type` : `${f.expr}.status`);
    out.patientAgreed = statusOk && provisionOk;
    this.at('consent.date', `${f.expr}.dateTime`);
    put(out, 'date', toDate(res.dateTime));
    return out;
  }
}

/** What ServiceRequest.reasonReference may name in R4. */
const REASON_TYPES = ['Condition', 'Observation', 'DiagnosticReport', 'DocumentReference'];

/**
 * Reads a FHIR R4 referral Bundle into the gateway's JSON referral (see the file comment). Never throws for any
 * input; the referral is not validated here (referralSchema does that, and `locate` says where each of its paths is).
 */
export function readReferralBundle(bundle: unknown): BundleReading {
  const reader = new Reader(intakeTables());
  try {
    reader.read(bundle);
  } catch (err) {
    // A gap in the reader, never the sender's fault in a way we can name: say so without quoting the content.
    const message = `the Bundle could not be read (${err instanceof Error ? err.name : 'error'})`;
    reader.issues.push({ code: 'structure', expression: 'Bundle', message: `Bundle: ${message}` });
  }
  reader.finish();
  return {
    externalId: reader.externalId,
    referral: reader.referral,
    locate: (modelPath) => {
      try {
        return reader.locate(String(modelPath));
      } catch {
        return 'Bundle';
      }
    },
    issues: reader.issues,
  };
}
