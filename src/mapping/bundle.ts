import { createHash } from 'node:crypto';
import type {
  Attachment,
  Bundle,
  BundleEntry,
  CodeableConcept,
  Coding,
  Condition,
  ConditionStage,
  Consent,
  DocumentReference,
  Endpoint,
  Extension,
  HumanName,
  Identifier,
  ImagingStudy,
  MedicationStatement,
  Meta,
  Observation,
  Organization,
  Patient,
  Period,
  Practitioner,
  PractitionerRole,
  Procedure,
  Reference,
  Resource,
  ServiceRequest,
  Task,
} from '@medplum/fhirtypes';
import type { Destination } from '../config';
import type { Referral, ReferralDocument } from '../model';
import {
  type ConceptOut,
  cancerConditionCodes,
  consentCodes,
  documentKindCodes,
  externalIdSystemFor,
  findStageGroup,
  identifierSystems,
  imagingCodes,
  lateralityCoding,
  modalityCoding,
  referralCategory,
  referralKindCode,
  referralReasonCode,
  requestPriority,
  secondOpinionReason,
  stageTypeCode,
  stagingSystem,
  studyUrl,
  taskCodes,
  treatmentTypeInfo,
} from './tables';
import { documentIdentifierValue } from './constants';
import { matchingRules } from './routing';
import { entryFullUrl } from './uuid';

/**
 * Maps a validated referral to one FHIR R4 transaction Bundle for the receiving cancer centre
 * (domain.md section 6.1). Pure and deterministic: the same input always gives the same JSON, so a
 * resend is byte-identical, and every entry is a conditional create (`ifNoneExist` on a business
 * identifier) so a resend creates nothing new.
 */
export interface MapReferralInput {
  referralId: string;
  clientId: string;
  referral: Referral;
  destination: Destination;
  /** ISO instant the gateway accepted the referral (ServiceRequest/Task.authoredOn). */
  createdAt: string;
  /**
   * URLs to send instead of inline base64, keyed by the document's index in `referral.documents`
   * (e.g. `Binary/123` after uploading a file bigger than `destination.maxInlineBytes`). Size and hash
   * are still computed from the inline data. A document whose bytes are in the blob store (`blob`, no `data`)
   * is only ever sent by URL: its size and SHA-1 are the ones `blob` recorded.
   */
  attachmentUrls?: Readonly<Record<number, string>>;
  /**
   * Specialty label sent as ServiceRequest.performerType.text. Defaults to the specialty of the first
   * routing rule (mappings/routing.json) that matches the diagnosis; none when no rule matches.
   */
  specialty?: string;
}

export interface MapAddedDocumentsInput {
  referralId: string;
  referral: Referral;
  /** The new documents only. */
  documents: ReferralDocument[];
  /** How many documents the referral already had; the first new one is number startIndex + 1. */
  startIndex: number;
  /** The centre's ServiceRequest, e.g. `ServiceRequest/123`. */
  serviceRequestRef: string;
  /** The centre's Patient, e.g. `Patient/45`. */
  patientRef: string;
  destination: Destination;
  /** As in MapReferralInput, keyed by index in `documents`. */
  attachmentUrls?: Readonly<Record<number, string>>;
  /** ISO instant the gateway accepted the documents (DocumentReference.date); omitted when absent. */
  addedAt?: string;
}

/** Entry roles; each becomes part of the entry's deterministic urn:uuid. */
export const ENTRY_ROLES = {
  patient: 'patient',
  practitioner: 'practitioner',
  referrerOrganization: 'organization/referrer',
  practitionerRole: 'practitioner-role',
  destinationOrganization: 'organization/destination',
  condition: 'condition',
  stageObservation: 'observation/stage',
  consent: 'consent',
  treatment: (n: number): string => `treatment/${n}`,
  document: (n: number): string => `document/${n}`,
  imagingStudy: (n: number): string => `imaging-study/${n}`,
  endpoint: (n: number): string => `endpoint/${n}`,
  serviceRequest: 'service-request',
  task: 'task',
} as const;

// ------------------------------------------------------------------------------------------------
// Small helpers

/** Escapes a token search value (FHIR search: `\`, `|`, `,` and `$` are escaped with `\`). */
function escapeToken(s: string): string {
  return s.replace(/[\\|,$]/g, (c) => `\\${c}`);
}

/** URL-encodes a search value but keeps the characters that are legal in a query and common in systems. */
function encodeQueryValue(s: string): string {
  return encodeURIComponent(s).replace(/%3A/gi, ':').replace(/%2F/gi, '/').replace(/%40/g, '@');
}

/** Characters that escapeToken() and encodeQueryValue() both leave as they are. */
const QUERY_SAFE = /^[A-Za-z0-9\-_.!~*'():/@]*$/;

/** escapeToken() then encodeQueryValue(); most systems and values need neither, and are returned as they are. */
function queryToken(s: string): string {
  return QUERY_SAFE.test(s) ? s : encodeQueryValue(escapeToken(s));
}

/** `identifier=system|value` for Bundle.entry.request.ifNoneExist. */
export function identifierQuery(system: string, value: string): string {
  return `identifier=${queryToken(system)}|${queryToken(value)}`;
}

function placerIdentifier(system: string, value: string): Identifier {
  const { placerType } = identifierSystems();
  return { type: { coding: [placerType] }, system, value };
}

function gatewayMeta(): Meta {
  return { tag: [identifierSystems().tag] };
}

function humanName(n: Referral['patient']['name']): HumanName {
  return { use: 'official', family: n.family, given: [...n.given], prefix: n.prefix ? [...n.prefix] : undefined };
}

function coding(c: { system: string; code: string; display?: string }): Coding {
  return { system: c.system, code: c.code, display: c.display };
}

function concept(c: { system: string; code: string; display?: string }): CodeableConcept {
  return { coding: [coding(c)], text: c.display ?? c.code };
}

/**
 * A concept from the mapping tables (deep-frozen, shared by every bundle) placed as it is in a resource under
 * construction. It is not copied here: EntryCollector.bundle() copies every resource (compact) into the bundle
 * it returns, so no bundle shares or exposes table objects, and nothing writes to a resource before that.
 */
function tableConcept(c: ConceptOut): CodeableConcept {
  return c as CodeableConcept;
}

function period(start?: string, end?: string): Period | undefined {
  return start || end ? { start, end } : undefined;
}

/**
 * Removes undefined properties and empty arrays so the JSON is clean and stable. Returns a deep copy: the
 * bundle shares no object with the caller's referral or with the (frozen) mapping tables. Only plain JSON
 * data (object literals, arrays) is passed in, so `for...in` sees exactly the own keys, in order.
 */
function compact<T>(value: T): T {
  if (value === null || typeof value !== 'object') {
    return value;
  }
  if (Array.isArray(value)) {
    const out: unknown[] = [];
    for (let i = 0; i < value.length; i++) {
      out.push(compact(value[i] as unknown));
    }
    return out as T;
  }
  const out: Record<string, unknown> = {};
  for (const k in value) {
    const v = (value as Record<string, unknown>)[k];
    if (v === undefined || (Array.isArray(v) && v.length === 0)) {
      continue;
    }
    out[k] = compact(v);
  }
  return out as T;
}

/** Decoded size in bytes of a base64 string, without decoding it. */
export function base64ByteLength(data: string): number {
  return (data.length / 4) * 3 - base64Padding(data);
}

/** The number of `=` padding characters that end a base64 string (0, 1 or 2). */
function base64Padding(data: string): number {
  if (data.endsWith('==')) return 2;
  return data.endsWith('=') ? 1 : 0;
}

/** Base64 characters decoded per step when hashing a document: 4 MiB (a multiple of 4, so slices decode alone). */
const HASH_SLICE_CHARS = 4 * 1024 * 1024;

/**
 * Attachment.size and the base64 SHA-1 Attachment.hash of base64 `data`, without decoding the whole
 * document into one Buffer: at most 4 MiB of base64 is decoded at a time, into one reused buffer of 3 MiB.
 * Equal to decoding `data` whole (Buffer.from(data, 'base64')): every slice but the last is a multiple of
 * 4 characters, and a slice whose decoded length is not what canonical base64 gives (whitespace, padding
 * before the end, a length that is not a multiple of 4; the referral schema refuses all of these) sends the
 * whole document down that old path instead.
 */
export function attachmentSizeAndHash(data: string): { size: number; hash: string } {
  if (data.length <= HASH_SLICE_CHARS) {
    const bytes = Buffer.from(data, 'base64');
    return { size: bytes.length, hash: createHash('sha1').update(bytes).digest('base64') };
  }
  const hash = createHash('sha1');
  const scratch = Buffer.allocUnsafe((HASH_SLICE_CHARS / 4) * 3);
  for (let start = 0; start < data.length; start += HASH_SLICE_CHARS) {
    const slice = data.slice(start, start + HASH_SLICE_CHARS);
    const written = scratch.write(slice, 'base64');
    const last = start + HASH_SLICE_CHARS >= data.length;
    if (written !== (last ? base64ByteLength(slice) : (slice.length / 4) * 3)) {
      const bytes = Buffer.from(data, 'base64');
      return { size: bytes.length, hash: createHash('sha1').update(bytes).digest('base64') };
    }
    hash.update(scratch.subarray(0, written));
  }
  return { size: base64ByteLength(data), hash: hash.digest('base64') };
}

/**
 * Indexes of documents carried inline whose decoded size is above `maxInlineBytes`: upload those
 * first (e.g. as Binary) and pass their URLs in `attachmentUrls`.
 */
export function inlineDocumentsOverLimit(documents: ReadonlyArray<ReferralDocument>, maxInlineBytes: number): number[] {
  const over: number[] = [];
  documents.forEach((d, i) => {
    const size = documentByteLength(d);
    if (size !== undefined && size > maxInlineBytes) {
      over.push(i);
    }
  });
  return over;
}

/**
 * The size in bytes of a document whose bytes the gateway sends: inline `data` (decoded size) or, for a document
 * whose bytes are in the blob store (`blob`, no `data`), its recorded size. Undefined for a document sent by URL.
 */
export function documentByteLength(d: ReferralDocument): number | undefined {
  if (d.data !== undefined) return base64ByteLength(d.data);
  return d.blob?.bytes;
}

/** Collects entries, gives each a deterministic urn:uuid, and never adds the same conditional create twice. */
class EntryCollector {
  readonly entries: BundleEntry[] = [];
  private readonly byCondition = new Map<string, string>();
  private readonly fullUrls = new Map<string, string>();

  constructor(private readonly referralId: string) {}

  fullUrl(role: string): string {
    let url = this.fullUrls.get(role);
    if (url === undefined) {
      url = entryFullUrl(this.referralId, role);
      this.fullUrls.set(role, url);
    }
    return url;
  }

  /** Adds a conditional create; returns a reference to it (or to the equal entry already added). */
  add<T extends Resource>(role: string, resource: T, ifNoneExist: string, display?: string): Reference<T> {
    const key = `${resource.resourceType}?${ifNoneExist}`;
    const existing = this.byCondition.get(key);
    if (existing) {
      return { reference: existing, display };
    }
    const fullUrl = this.fullUrl(role);
    if (this.entries.some((e) => e.fullUrl === fullUrl)) {
      throw new Error(`bundle entry role ${role} used twice`);
    }
    this.entries.push({ fullUrl, resource, request: { method: 'POST', url: resource.resourceType, ifNoneExist } });
    this.byCondition.set(key, fullUrl);
    return { reference: fullUrl, display };
  }

  bundle(): Bundle {
    return compact<Bundle>({ resourceType: 'Bundle', type: 'transaction', entry: this.entries });
  }
}

// ------------------------------------------------------------------------------------------------
// Resource builders (each cites the shape it follows)

function addReferrerOrganization(c: EntryCollector, referral: Referral): Reference<Organization> {
  const org = referral.referrer.organization;
  const resource: Organization = { resourceType: 'Organization', identifier: [{ ...org.identifier }], active: true, name: org.name };
  return c.add(ENTRY_ROLES.referrerOrganization, resource, identifierQuery(org.identifier.system, org.identifier.value), org.name);
}

function addDestinationOrganization(c: EntryCollector, destination: Destination): Reference<Organization> {
  const id = destination.organization;
  const resource: Organization = { resourceType: 'Organization', identifier: [{ system: id.system, value: id.value }], active: true, name: destination.name };
  return c.add(ENTRY_ROLES.destinationOrganization, resource, identifierQuery(id.system, id.value), destination.name);
}

/** US Core clinical-note DocumentReference (domain.md 6.1, 6.4): LOINC type, inline data with size + SHA-1, or a URL. */
function documentReference(args: {
  referralId: string;
  doc: ReferralDocument;
  n: number;
  createdAt?: string;
  subject: Reference<Patient>;
  author: Reference<Organization>;
  serviceRequest: Reference<ServiceRequest>;
  urlOverride?: string;
  /** The ImagingStudy the document's `study` became (context.related names it too). */
  imagingStudy?: Reference<ImagingStudy>;
}): DocumentReference {
  const { doc } = args;
  const kind = documentKindCodes(doc.kind);
  const attachment: Attachment = { contentType: doc.contentType, language: doc.language };
  if (doc.data !== undefined) {
    const { size, hash } = attachmentSizeAndHash(doc.data);
    if (args.urlOverride) {
      attachment.url = args.urlOverride;
    } else {
      attachment.data = doc.data;
    }
    attachment.size = size;
    attachment.hash = hash;
  } else if (doc.blob) {
    // Bytes in the blob store (a streamed document): size and SHA-1 as hashed when they arrived, never read here.
    // The URL is where delivery put them (a Binary); without one (e.g. validating the content) there is none yet.
    attachment.url = args.urlOverride;
    attachment.size = doc.blob.bytes;
    attachment.hash = doc.blob.sha1;
  } else if (doc.url !== undefined) {
    attachment.url = doc.url;
  } else if (doc.study?.endpoint !== undefined && doc.file === undefined && doc.upload === undefined) {
    // A DICOMweb reference: the study's WADO-RS URL, where the centre retrieves it (the ImagingStudy says more).
    attachment.url = studyUrl(doc.study.endpoint, doc.study.studyInstanceUid);
  } else {
    attachment.url = args.urlOverride;
  }
  attachment.title = doc.title;
  attachment.creation = doc.date;
  return {
    resourceType: 'DocumentReference',
    meta: gatewayMeta(),
    identifier: [placerIdentifier(identifierSystems().systems.document, documentIdentifierValue(args.referralId, args.n))],
    status: 'current',
    docStatus: 'final',
    type: tableConcept(kind.type),
    category: [tableConcept(kind.category)],
    subject: { reference: args.subject.reference },
    date: args.createdAt,
    author: [args.author],
    custodian: args.author,
    description: doc.title,
    content: [{ attachment }],
    context: {
      period: period(doc.date),
      related: [{ reference: args.serviceRequest.reference }, ...(args.imagingStudy ? [{ reference: args.imagingStudy.reference }] : [])],
    },
  };
}

/**
 * The FHIR R4 Endpoint of a DICOMweb server (connectionType dicom-wado-rs, mappings/imaging.json), identified by its
 * WADO-RS base URL under the gateway's endpoint system: one Endpoint per PACS at the centre, shared by referrals.
 */
function wadoEndpoint(address: string, managingOrganization: Reference<Organization>): Endpoint {
  const t = imagingCodes().endpoint;
  return {
    resourceType: 'Endpoint',
    identifier: [placerIdentifier(identifierSystems().systems.endpoint, address)],
    status: 'active',
    connectionType: t.connectionType as Coding,
    managingOrganization,
    payloadType: [t.payloadType as CodeableConcept],
    payloadMimeType: [...t.payloadMimeType],
    address,
  };
}

/** The FHIR R4 ImagingStudy of a document's `study`: identified by its Study Instance UID (urn:dicom:uid, urn:oid:<uid>). */
function imagingStudy(study: NonNullable<ReferralDocument['study']>, subject: Reference<Patient>, endpoint?: Reference<Endpoint>): ImagingStudy {
  const t = imagingCodes();
  return {
    resourceType: 'ImagingStudy',
    meta: gatewayMeta(),
    identifier: [{ system: t.studyUidSystem, value: `${t.studyUidPrefix}${study.studyInstanceUid}` }],
    status: 'available',
    modality: study.modalities.map((m) => modalityCoding(m) as Coding),
    subject: { reference: subject.reference },
    started: study.started,
    endpoint: endpoint ? [{ reference: endpoint.reference }] : undefined,
    numberOfSeries: study.seriesCount,
    numberOfInstances: study.instanceCount,
    description: study.description,
  };
}

/** ifNoneExist of a study's ImagingStudy: its Study Instance UID. */
function studyQuery(studyInstanceUid: string): string {
  const t = imagingCodes();
  return identifierQuery(t.studyUidSystem, `${t.studyUidPrefix}${studyInstanceUid}`);
}

/**
 * One DocumentReference per document, and for a document with a `study` its ImagingStudy (and the Endpoint of its
 * DICOMweb server) before it. Returns, in document order, what ServiceRequest.supportingInfo and Task.input list:
 * each DocumentReference, followed by its ImagingStudy.
 */
function addDocuments(args: {
  c: EntryCollector;
  referralId: string;
  documents: ReadonlyArray<ReferralDocument>;
  startIndex: number;
  createdAt?: string;
  subject: Reference<Patient>;
  author: Reference<Organization>;
  serviceRequest: Reference<ServiceRequest>;
  attachmentUrls?: Readonly<Record<number, string>>;
}): Reference[] {
  const systems = identifierSystems().systems;
  const listed = new Set<string | undefined>();
  return args.documents.flatMap((doc, i) => {
    const n = args.startIndex + i + 1;
    let study: Reference<ImagingStudy> | undefined;
    if (doc.study) {
      const address = doc.study.endpoint;
      const endpoint = address
        ? args.c.add(ENTRY_ROLES.endpoint(n), wadoEndpoint(address, args.author), identifierQuery(systems.endpoint, address))
        : undefined;
      study = args.c.add(
        ENTRY_ROLES.imagingStudy(n),
        imagingStudy(doc.study, args.subject, endpoint),
        studyQuery(doc.study.studyInstanceUid),
        doc.study.description ?? doc.title
      );
    }
    const resource = documentReference({
      referralId: args.referralId,
      doc,
      n,
      createdAt: args.createdAt,
      subject: args.subject,
      author: args.author,
      serviceRequest: args.serviceRequest,
      urlOverride: args.attachmentUrls?.[i],
      imagingStudy: study,
    });
    const document = args.c.add(ENTRY_ROLES.document(n), resource, identifierQuery(systems.document, documentIdentifierValue(args.referralId, n)), doc.title);
    // Two documents of one study (its DICOM bytes and its DICOMweb reference) share one ImagingStudy, listed once.
    const out = study && !listed.has(study.reference) ? [document, study] : [document];
    for (const r of out) listed.add(r.reference);
    return out;
  });
}

/** mCODE Primary Cancer Condition shape (domain.md 3.9): code, histology extension, body site + laterality, stage summary. */
function cancerCondition(args: {
  referralId: string;
  referral: Referral;
  subject: Reference<Patient>;
  stage?: { summary: CodeableConcept; type: CodeableConcept; assessment: Reference<Observation> };
}): Condition {
  const dx = args.referral.diagnosis;
  const cc = cancerConditionCodes();
  const extension: Extension[] = [];
  if (dx.diagnosedOn) {
    extension.push({ url: cc.extensions.assertedDate, valueDateTime: dx.diagnosedOn });
  }
  if (dx.histology) {
    extension.push({ url: cc.extensions.histology, valueCodeableConcept: concept(dx.histology) });
  }
  let bodySite: CodeableConcept[] | undefined;
  if (dx.bodySite || dx.laterality) {
    const site: CodeableConcept = dx.bodySite ? concept(dx.bodySite) : { text: `${dx.laterality} (site not given)` };
    if (dx.laterality) {
      site.extension = [{ url: cc.extensions.laterality, valueCodeableConcept: concept(lateralityCoding(dx.laterality)) }];
    }
    bodySite = [site];
  }
  const stage: ConditionStage[] | undefined = args.stage
    ? [{ summary: args.stage.summary, assessment: [args.stage.assessment], type: args.stage.type }]
    : undefined;
  return {
    resourceType: 'Condition',
    meta: gatewayMeta(),
    extension,
    identifier: [placerIdentifier(identifierSystems().systems.condition, args.referralId)],
    clinicalStatus: { coding: [coding(cc.clinicalStatus[dx.clinicalStatus])] },
    verificationStatus: { coding: [coding(cc.verificationStatus)] },
    category: [{ coding: [coding(cc.category)] }],
    code: concept(dx.code),
    bodySite,
    subject: { reference: args.subject.reference },
    onsetDateTime: dx.diagnosedOn,
    recordedDate: dx.diagnosedOn,
    stage,
  };
}

interface StageParts {
  value: CodeableConcept;
  method: CodeableConcept;
  code: CodeableConcept;
}

function stageParts(stage: NonNullable<Referral['diagnosis']['stage']>): StageParts {
  const method = stagingSystem(stage.system);
  const group = findStageGroup(stage.value);
  const shown = group?.value ?? stage.value.trim();
  const text = `Stage ${shown} (${method.text})`;
  const value: CodeableConcept = group?.coding ? { coding: [coding(group.coding)], text } : { text };
  return { value, method: tableConcept(method), code: tableConcept(stageTypeCode(stage.type)) };
}

/** mCODE TNM stage-group Observation (domain.md 3.9): code = stage type, method = staging system, focus = Condition. */
function stageObservation(args: {
  referralId: string;
  referral: Referral;
  parts: StageParts;
  subject: Reference<Patient>;
  condition: Reference<Condition>;
}): Observation {
  return {
    resourceType: 'Observation',
    meta: gatewayMeta(),
    identifier: [placerIdentifier(identifierSystems().systems.observation, `${args.referralId}/stage`)],
    status: 'final',
    code: args.parts.code,
    subject: { reference: args.subject.reference },
    focus: [{ reference: args.condition.reference }],
    effectiveDateTime: args.referral.diagnosis.diagnosedOn,
    valueCodeableConcept: args.parts.value,
    method: args.parts.method,
  };
}

/** Consent to share records with the centre (domain.md 6.1; BSeR SR.supportingInfo slice). */
function consentResource(args: {
  referralId: string;
  referral: Referral;
  patient: Reference<Patient>;
  referrerOrg: Reference<Organization>;
  destinationOrg: Reference<Organization>;
}): Consent {
  const codes = consentCodes();
  return {
    resourceType: 'Consent',
    meta: gatewayMeta(),
    identifier: [placerIdentifier(identifierSystems().systems.consent, args.referralId)],
    status: 'active',
    scope: tableConcept(codes.scope),
    category: [tableConcept(codes.category)],
    patient: { reference: args.patient.reference },
    ...(args.referral.consent.date ? { dateTime: args.referral.consent.date } : {}),
    performer: [{ reference: args.patient.reference }],
    organization: [args.referrerOrg],
    policyRule: tableConcept(codes.policyRule),
    provision: { type: 'permit', actor: [{ role: tableConcept(codes.recipientRole), reference: args.destinationOrg }] },
  };
}

/** Treatment history: Procedure for surgery/radiotherapy/transplant/other, MedicationStatement for drug therapies. Never dropped. */
function treatmentResource(args: {
  referralId: string;
  treatment: Referral['treatmentHistory'][number];
  n: number;
  createdAt: string;
  subject: Reference<Patient>;
  condition: Reference<Condition>;
  informant: Reference<PractitionerRole>;
}): Procedure | MedicationStatement {
  const t = args.treatment;
  const info = treatmentTypeInfo(t.type);
  const systems = identifierSystems().systems;
  const code: CodeableConcept = t.code ? { coding: [coding(t.code)], text: t.description } : { text: t.description };
  if (info.resource === 'Procedure') {
    const pointInTime = t.start !== undefined && t.end === undefined && t.type === 'surgery';
    return {
      resourceType: 'Procedure',
      meta: gatewayMeta(),
      identifier: [placerIdentifier(systems.procedure, `${args.referralId}/treatment/${args.n}`)],
      // A reported past surgery is done; for longer treatments only an end date says so.
      status: t.end !== undefined || t.type === 'surgery' ? 'completed' : 'unknown',
      category: tableConcept(info.category),
      code,
      subject: { reference: args.subject.reference },
      performedDateTime: pointInTime ? t.start : undefined,
      performedPeriod: pointInTime ? undefined : period(t.start, t.end),
      reasonReference: [{ reference: args.condition.reference }],
    };
  }
  return {
    resourceType: 'MedicationStatement',
    meta: gatewayMeta(),
    identifier: [placerIdentifier(systems.medicationStatement, `${args.referralId}/treatment/${args.n}`)],
    status: t.end !== undefined ? 'completed' : 'unknown',
    category: tableConcept(info.category),
    medicationCodeableConcept: code,
    subject: { reference: args.subject.reference },
    effectivePeriod: period(t.start, t.end),
    dateAsserted: args.createdAt,
    informationSource: { reference: args.informant.reference },
    reasonReference: [{ reference: args.condition.reference }],
  };
}

// ------------------------------------------------------------------------------------------------
// Public mappers

/**
 * The transaction Bundle for a new referral: Patient, referring Practitioner, Organization and
 * PractitionerRole, the centre's Organization, the cancer Condition (+ stage Observation), Consent,
 * treatment history, one DocumentReference per document, the ServiceRequest and the Task.
 */
export function mapReferralToBundle(input: MapReferralInput): Bundle {
  const { referralId, clientId, referral, destination, createdAt } = input;
  const systems = identifierSystems();
  const c = new EntryCollector(referralId);
  const serviceRequestRef: Reference<ServiceRequest> = { reference: c.fullUrl(ENTRY_ROLES.serviceRequest) };
  const kind = referralKindCode(referral.kind);
  const priority = requestPriority(referral.priority);
  const specialty = input.specialty ?? matchingRules(referral)[0]?.specialty;

  // Patient: conditional create on the EHR's first identifier; all identifiers typed MR.
  const p = referral.patient;
  const patientResource: Patient = {
    resourceType: 'Patient',
    identifier: p.identifiers.map((i) => ({ type: { coding: [systems.medicalRecordType] }, system: i.system, value: i.value })),
    active: true,
    name: [humanName(p.name)],
    telecom: [...(p.phone ? [{ system: 'phone' as const, value: p.phone }] : []), ...(p.email ? [{ system: 'email' as const, value: p.email }] : [])],
    gender: p.gender,
    birthDate: p.birthDate,
  };
  const patient = c.add(ENTRY_ROLES.patient, patientResource, identifierQuery(p.identifiers[0].system, p.identifiers[0].value));

  // Referrer: Practitioner, Organization, and the PractitionerRole that links them (BSeR/Gravity requester).
  const pr = referral.referrer.practitioner;
  const practitionerName = [...pr.name.given, pr.name.family].join(' ');
  const practitioner = c.add(
    ENTRY_ROLES.practitioner,
    { resourceType: 'Practitioner', identifier: [{ ...pr.identifier }], active: true, name: [humanName(pr.name)] } satisfies Practitioner,
    identifierQuery(pr.identifier.system, pr.identifier.value),
    practitionerName
  );
  const referrerOrg = addReferrerOrganization(c, referral);
  const oi = referral.referrer.organization.identifier;
  const roleValue = createHash('sha1').update(`${pr.identifier.system}|${pr.identifier.value}@${oi.system}|${oi.value}`).digest('hex');
  const practitionerRole = c.add(
    ENTRY_ROLES.practitionerRole,
    {
      resourceType: 'PractitionerRole',
      identifier: [placerIdentifier(systems.systems.practitionerRole, roleValue)],
      active: true,
      practitioner: { reference: practitioner.reference, display: practitionerName },
      organization: { reference: referrerOrg.reference, display: referral.referrer.organization.name },
    } satisfies PractitionerRole,
    identifierQuery(systems.systems.practitionerRole, roleValue),
    `${practitionerName}, ${referral.referrer.organization.name}`
  );

  // The receiving centre's Organization (conditional: exists at the centre in the normal case).
  const destinationOrg = addDestinationOrganization(c, destination);

  // Cancer condition and, when staged, the stage-group Observation that points back at it.
  const conditionRef: Reference<Condition> = { reference: c.fullUrl(ENTRY_ROLES.condition) };
  const stage = referral.diagnosis.stage;
  const parts = stage ? stageParts(stage) : undefined;
  const stageRef: Reference<Observation> | undefined = parts ? { reference: c.fullUrl(ENTRY_ROLES.stageObservation) } : undefined;
  const condition = c.add(
    ENTRY_ROLES.condition,
    cancerCondition({
      referralId,
      referral,
      subject: patient,
      stage: parts && stageRef ? { summary: parts.value, type: parts.method, assessment: stageRef } : undefined,
    }),
    identifierQuery(systems.systems.condition, referralId),
    referral.diagnosis.code.display ?? referral.diagnosis.code.code
  );
  if (conditionRef.reference !== condition.reference) {
    throw new Error('condition entry was merged with another entry');
  }
  const supportingInfo: Reference[] = [];
  if (parts && stageRef) {
    supportingInfo.push(
      c.add(
        ENTRY_ROLES.stageObservation,
        stageObservation({ referralId, referral, parts, subject: patient, condition }),
        identifierQuery(systems.systems.observation, `${referralId}/stage`),
        parts.value.text
      )
    );
  }

  supportingInfo.unshift(
    c.add(
      ENTRY_ROLES.consent,
      consentResource({ referralId, referral, patient, referrerOrg, destinationOrg }),
      identifierQuery(systems.systems.consent, referralId),
      'Patient consent to share records'
    )
  );

  referral.treatmentHistory.forEach((treatment, i) => {
    const n = i + 1;
    const resource = treatmentResource({ referralId, treatment, n, createdAt, subject: patient, condition, informant: practitionerRole });
    const system = resource.resourceType === 'Procedure' ? systems.systems.procedure : systems.systems.medicationStatement;
    supportingInfo.push(c.add(ENTRY_ROLES.treatment(n), resource, identifierQuery(system, `${referralId}/treatment/${n}`), treatment.description));
  });

  const documents = addDocuments({
    c,
    referralId,
    documents: referral.documents,
    startIndex: 0,
    createdAt,
    subject: patient,
    author: referrerOrg,
    serviceRequest: serviceRequestRef,
    attachmentUrls: input.attachmentUrls,
  });
  supportingInfo.push(...documents);

  // ServiceRequest: the referral itself (BSeR Referral ServiceRequest shape).
  const reasons = [...new Set(referral.reasons)];
  const serviceRequest: ServiceRequest = {
    resourceType: 'ServiceRequest',
    meta: gatewayMeta(),
    identifier: [
      placerIdentifier(systems.systems.referral, referralId),
      { type: { text: 'EHR referral id' }, system: externalIdSystemFor(clientId), value: referral.externalId },
    ],
    status: 'active',
    intent: 'order',
    category: [tableConcept(referralCategory())],
    priority,
    code: tableConcept(kind),
    subject: { reference: patient.reference },
    authoredOn: createdAt,
    requester: practitionerRole,
    performerType: specialty ? { text: specialty } : undefined,
    performer: [destinationOrg],
    reasonCode: [
      tableConcept(secondOpinionReason()),
      ...reasons.map((r) => tableConcept(referralReasonCode(r))),
      ...(referral.reasonText ? [{ text: referral.reasonText }] : []),
    ],
    reasonReference: [condition],
    supportingInfo,
    note: referral.questions.map((q) => ({ text: `Question from the patient: ${q}` })),
  };
  const sr = c.add(ENTRY_ROLES.serviceRequest, serviceRequest, identifierQuery(systems.systems.referral, referralId), kind.text);
  if (sr.reference !== serviceRequestRef.reference) {
    throw new Error('service request entry was merged with another entry');
  }

  // Task: the status channel the centre updates (Gravity / BSeR referral Task, FHIR workflow option G).
  const codes = taskCodes();
  const task: Task = {
    resourceType: 'Task',
    meta: gatewayMeta(),
    identifier: [placerIdentifier(systems.systems.referral, referralId)],
    basedOn: [{ reference: sr.reference }],
    status: 'requested',
    intent: 'order',
    priority,
    code: tableConcept(codes.code),
    description: `${kind.text} requested by ${referral.referrer.organization.name}`,
    focus: { reference: sr.reference },
    for: { reference: patient.reference },
    authoredOn: createdAt,
    lastModified: createdAt,
    requester: practitionerRole,
    owner: destinationOrg,
    input: documents.map((d) => ({ type: tableConcept(codes.inputType), valueReference: d })),
  };
  c.add(ENTRY_ROLES.task, task, identifierQuery(systems.systems.referral, referralId));

  return c.bundle();
}

/**
 * A transaction for documents added to a referral that the centre already has: one conditional-create
 * DocumentReference per document (context.related -> the existing ServiceRequest), plus a conditional
 * create of the referring Organization so the documents can name their author. Nothing is updated.
 */
export function mapAddedDocumentsToBundle(input: MapAddedDocumentsInput): Bundle {
  if (!Number.isInteger(input.startIndex) || input.startIndex < 0) {
    throw new Error(`startIndex must be a non-negative integer, got ${input.startIndex}`);
  }
  if (!/^ServiceRequest\/[A-Za-z0-9\-.]{1,64}$/.test(input.serviceRequestRef)) {
    throw new Error(`serviceRequestRef must look like ServiceRequest/<id>, got ${input.serviceRequestRef}`);
  }
  if (!/^Patient\/[A-Za-z0-9\-.]{1,64}$/.test(input.patientRef)) {
    throw new Error(`patientRef must look like Patient/<id>, got ${input.patientRef}`);
  }
  const c = new EntryCollector(input.referralId);
  const author = addReferrerOrganization(c, input.referral);
  addDocuments({
    c,
    referralId: input.referralId,
    documents: input.documents,
    startIndex: input.startIndex,
    createdAt: input.addedAt,
    subject: { reference: input.patientRef },
    author,
    serviceRequest: { reference: input.serviceRequestRef },
    attachmentUrls: input.attachmentUrls,
  });
  return c.bundle();
}

/**
 * The centre's ServiceRequest with `supportingInfo` references to documents added later, each once.
 * Undefined when it already lists them all (nothing to write). Pure.
 */
export function serviceRequestWithDocuments(sr: ServiceRequest, documentRefs: ReadonlyArray<string>): ServiceRequest | undefined {
  const have = new Set((sr.supportingInfo ?? []).map((r) => r.reference));
  const missing = [...new Set(documentRefs)].filter((r) => !have.has(r));
  if (missing.length === 0) return undefined;
  return { ...sr, supportingInfo: [...(sr.supportingInfo ?? []), ...missing.map((reference) => ({ reference }))] };
}

/**
 * The centre's Task with one `input` per document added later (typed as the submission's inputs are), each
 * once, and `lastModified` set to `at` when given. Undefined when it already lists them all. Everything else
 * the centre set on the Task is kept. Pure.
 */
export function taskWithDocuments(task: Task, documentRefs: ReadonlyArray<string>, at?: string): Task | undefined {
  const have = new Set((task.input ?? []).map((i) => i.valueReference?.reference).filter(Boolean));
  const missing = [...new Set(documentRefs)].filter((r) => !have.has(r));
  if (missing.length === 0) return undefined;
  const type = tableConcept(taskCodes().inputType);
  return {
    ...task,
    ...(at ? { lastModified: at } : {}),
    input: [...(task.input ?? []), ...missing.map((reference) => ({ type, valueReference: { reference } }))],
  };
}
