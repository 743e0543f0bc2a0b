// HL7 v2 referral messages (REF^I12/I13/I14, OMG^O19 as 360X sends it) read into the gateway's JSON referral: the
// body POST /referrals takes, before the schema checks it. Parsing is @medplum/core's Hl7Message; this module only
// reads it. The code tables are data (mappings/hl7v2.json); what the message does not carry is left out, so that
// referralSchema names it and locate() says where in the message it should have been.
import type { Hl7Field, Hl7Message, Hl7Segment } from '@medplum/core';
import { z } from 'zod';
import { mappingFilePath, parseMappingFile } from '../../mapping';
import { documentKinds, priorities, reasonCodes, referralKinds } from '../../model';
import type { IssueCode } from '../../outcomes';
import { DEFAULT_DELIMITERS, decodeHl7Text, type Hl7Delimiters } from './escape';

// ---------------------------------------------------------------------------------------------------------------
// Public surface

export type V2Action = 'new' | 'modify' | 'cancel';

/**
 * A problem only the HL7 v2 reader can see (the schema cannot): an unsupported OBX-2 value type, an ED encoding it
 * cannot decode, an unknown message type or order control code, an identifier whose system could not be resolved
 * and was left out. `expression` is an HL7 location (see V2Reading.locate). Severity `error`: the message cannot be
 * taken as sent (a document would be lost, the message type is not a referral); where a field of the referral is
 * affected the reader has also left it out, so schema validation fails there too. `warning`: something was ignored
 * or a default was used; the referral may still be valid. Code `exception` means the reader itself failed (a bug):
 * what it read up to then is returned.
 */
export interface V2Issue {
  code: IssueCode;
  severity: 'error' | 'warning';
  message: string;
  expression: string;
}

export interface V2Reading {
  /** 'new' for REF^I12 and OMG^O19 with ORC-1 NW; 'modify' for REF^I13 (documents added) and ORC-1 XO; 'cancel' for REF^I14 and OMG^O19 with ORC-1 CA or DC. An unknown message type or order control reads as 'new' with an error issue. */
  action: V2Action;
  /** MSH-9 as `REF^I12` etc.; MSH-10 control id; MSH-3/MSH-4 sending application/facility (first component); MSH-12 version. */
  messageType: string;
  controlId: string;
  sendingFacility: string;
  sendingApplication: string;
  version: string;
  /** RF1-6 (originating referral identifier) or, for OMG, ORC-2 placer order number (else OBR-2): the referral's externalId. */
  externalId: string | null;
  /** The referral as the gateway's JSON (what POST /referrals takes), before schema validation. Fields the message does not carry are left out, so the schema names them. */
  referral: Record<string, unknown>;
  /** For 'cancel': the reason (ORC-16 text, else the referral's NTE notes) if any. */
  cancelReason?: string;
  /** Problems the schema cannot see (see V2Issue); empty for a clean message. */
  issues: V2Issue[];
  /**
   * Where a location of the JSON referral model (`patient.birthDate`, `patient.identifiers[0].value`,
   * `documents[1].data`, `diagnosis.code`; `documents.1.data` is read the same) is in the message, as an HL7 error
   * location (ERR-2, type ERL): `SEG^sequence` then, as far as known, `^field^field repetition^component`, e.g.
   * `PID^1^7`, `OBX^2^5`, `PID^1^3^2^4` (the second PID-3 repetition's assigning authority). The sequence counts
   * segments of that name from 1 in message order. A path the message has no place for answers the nearest
   * segment known, or `MSH^1^9` (the message as a whole).
   */
  locate(modelPath: string): string;
}

// ---------------------------------------------------------------------------------------------------------------
// Tables (mappings/hl7v2.json)

const uri = z.string().regex(/^(https?:\/\/\S+|urn:(oid|uuid):\S+)$/, 'must be a URI (http(s)://, urn:oid: or urn:uuid:)');
const sources = z.string().min(20, 'say where the codes come from');
const destinationId = z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/, 'must be a destination id');
const mimeToken = z.string().regex(/^[\w.+-]+$/, 'must be a MIME type or subtype token');

/** A code table: keys are matched trimmed and case-insensitively. */
function codeTable<T extends z.ZodType>(value: T) {
  return z.record(z.string(), value).transform((record) => {
    const map = new Map<string, z.output<T>>();
    for (const [key, v] of Object.entries(record)) map.set(key.trim().toUpperCase(), v);
    return map as ReadonlyMap<string, z.output<T>>;
  });
}

const upperList = z.array(z.string().min(1)).transform((list) => new Set(list.map((s) => s.trim().toUpperCase())) as ReadonlySet<string>);
const kindSchema = z.enum(referralKinds);
const noteTarget = z.enum(['question', 'reasonText', 'ignore']);

export const v2TablesSchema = z.object({
  _source: z.string().min(40, 'say where the tables come from'),
  messageTypes: z.strictObject({ sources, map: codeTable(z.enum(['new', 'modify', 'cancel', 'order-control'])) }),
  orderControl: z.strictObject({ sources, map: codeTable(z.enum(['new', 'modify', 'cancel'])) }),
  codingSystems: z.strictObject({ sources, map: codeTable(uri), local: upperList }),
  assigningAuthorities: z.strictObject({
    sources,
    byOid: codeTable(uri),
    byNamespace: codeTable(uri),
    byIdentifierType: codeTable(uri),
    bySendingFacility: codeTable(uri),
    default: uri.nullable(),
  }),
  sex: z.strictObject({ sources, map: codeTable(z.enum(['male', 'female', 'other', 'unknown'])) }),
  priorities: z.strictObject({ sources, map: codeTable(z.enum(priorities)) }),
  kinds: z.strictObject({
    sources,
    referralType: codeTable(kindSchema),
    disposition: codeTable(kindSchema),
    referralReason: codeTable(kindSchema),
    serviceRequested: codeTable(kindSchema),
    default: kindSchema.nullable(),
  }),
  reasons: z.strictObject({ sources, map: codeTable(z.enum(reasonCodes).nullable()) }),
  noteTypes: z.strictObject({ sources, map: codeTable(noteTarget), default: noteTarget }),
  documentKinds: z.strictObject({
    sources,
    loinc: codeTable(z.enum(documentKinds)),
    dicom: z.partialRecord(z.enum(documentKinds), z.enum(documentKinds)),
    titles: z.record(z.enum(documentKinds), z.string().min(1).max(300)),
  }),
  contentTypes: z.strictObject({ sources, types: codeTable(mimeToken), subtypes: codeTable(mimeToken), defaultSubtypes: codeTable(mimeToken) }),
  observations: z.strictObject({ sources, map: codeTable(z.enum(['stage', 'stage-clinical', 'stage-pathologic', 'histology', 'bodySite', 'laterality'])) }),
  stagingSystems: z.strictObject({ sources, map: codeTable(z.enum(['AJCC-8', 'AJCC-7', 'AJCC-9'])) }),
  lateralities: z.strictObject({ sources, map: codeTable(z.enum(['left', 'right', 'bilateral'])) }),
  destinations: z.strictObject({ sources, byIdentifier: codeTable(destinationId), byName: codeTable(destinationId), unmatched: destinationId.nullable() }),
  consent: z.strictObject({
    sources,
    types: upperList,
    statuses: codeTable(z.boolean()),
    whenAbsent: z.strictObject({ facilities: upperList, patientAgreed: z.literal(true) }).nullable(),
  }),
});

/** The HL7 v2 code tables as read (mappings/hl7v2.json): code keys upper-cased into maps. */
export type V2Tables = z.output<typeof v2TablesSchema>;
/** The tables as written in the JSON file. */
export type V2TablesInput = z.input<typeof v2TablesSchema>;

const TABLES_FILE = 'hl7v2.json';

/** The tables in `json` (the content of mappings/hl7v2.json), checked; throws naming the first bad fields. */
export function parseV2Tables(json: unknown): V2Tables {
  const parsed = v2TablesSchema.safeParse(json);
  if (!parsed.success) {
    const issues = parsed.error.issues.slice(0, 5).map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`);
    throw new Error(`HL7 v2 mapping tables are invalid: ${issues.join('; ')}`);
  }
  return parsed.data;
}

/** Reads and checks a tables file (default: mappings/hl7v2.json). Throws with the file and the fields at fault. */
export function loadV2Tables(file: string = mappingFilePath(TABLES_FILE)): V2Tables {
  return parseMappingFile(file, v2TablesSchema);
}

let defaultTables: V2Tables | undefined;

/** mappings/hl7v2.json, loaded on first use and kept. */
export function defaultV2Tables(): V2Tables {
  defaultTables ??= loadV2Tables();
  return defaultTables;
}

// ---------------------------------------------------------------------------------------------------------------
// Reading the message

/** One segment with where it is: its name and its sequence among segments of that name (1-based). */
interface Seg {
  readonly name: string;
  readonly seq: number;
  readonly segment: Hl7Segment;
}

/** A coded element (CE, CWE, CNE) as read. */
interface V2Coding {
  code: string;
  text: string;
  system: string;
  originalText: string;
}

/** A hierarchic designator (HD): namespace^universal id^universal id type. */
interface Hd {
  namespace: string;
  universalId: string;
}

const OID = /^[0-2](\.(0|[1-9]\d*))+$/;
const URI_LIKE = /^(https?:\/\/\S+|urn:[a-z0-9][a-z0-9-]*:\S+)$/i;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Trimmed, with the HL7 explicit null `""` read as empty. */
function clean(s: string): string {
  const t = s.trim();
  return t === '""' ? '' : t;
}

/** Read access to a parsed message that never throws: missing segments, fields, repetitions and components read as ''. */
class Reader {
  readonly segments: Seg[] = [];
  readonly delimiters: Hl7Delimiters;
  readonly #byName = new Map<string, Seg[]>();

  constructor(message: Hl7Message) {
    this.delimiters = delimitersOf(message);
    const counts = new Map<string, number>();
    for (const segment of message.segments) {
      const name = typeof segment.name === 'string' ? segment.name.trim().toUpperCase() : '';
      const seq = (counts.get(name) ?? 0) + 1;
      counts.set(name, seq);
      const seg: Seg = { name, seq, segment };
      this.segments.push(seg);
      const list = this.#byName.get(name);
      if (list) list.push(seg);
      else this.#byName.set(name, [seg]);
    }
  }

  all(name: string): Seg[] {
    return this.#byName.get(name) ?? [];
  }

  first(name: string): Seg | undefined {
    return this.#byName.get(name)?.[0];
  }

  /** The repetitions of a field, each a list of raw components. */
  reps(seg: Seg | undefined, field: number): string[][] {
    if (!seg) return [];
    let f: Hl7Field | undefined;
    try {
      f = seg.segment.getField(field) as Hl7Field | undefined;
    } catch {
      return [];
    }
    const components = f?.components;
    return Array.isArray(components) ? components : [];
  }

  /** A component as sent (not decoded): 1-based component, 0-based repetition. */
  raw(seg: Seg | undefined, field: number, component = 1, rep = 0): string {
    const value = this.reps(seg, field)[rep]?.[component - 1];
    return typeof value === 'string' ? value : '';
  }

  /** A whole repetition as sent, its components joined again (for text types that should have none). */
  rawRep(seg: Seg | undefined, field: number, rep = 0): string {
    return (this.reps(seg, field)[rep] ?? []).join(this.delimiters.componentSeparator);
  }

  /** A component as text: escape sequences decoded, trimmed, `""` empty. Subcomponent separators are kept as sent. */
  text(seg: Seg | undefined, field: number, component = 1, rep = 0): string {
    return clean(this.decode(this.raw(seg, field, component, rep)));
  }

  /** A subcomponent (1-based) as text. */
  sub(seg: Seg | undefined, field: number, component: number, subcomponent: number, rep = 0): string {
    const parts = this.raw(seg, field, component, rep).split(this.delimiters.subcomponentSeparator);
    return clean(this.decode(parts[subcomponent - 1] ?? ''));
  }

  decode(raw: string): string {
    return decodeHl7Text(raw, this.delimiters);
  }

  /** A CE/CWE/CNE component group; the alternate triplet when the first has no code. */
  coding(seg: Seg | undefined, field: number, rep = 0): V2Coding {
    const t = (c: number): string => this.text(seg, field, c, rep);
    const first = { code: t(1), text: t(2), system: t(3) };
    const alternate = { code: t(4), text: t(5), system: t(6) };
    const chosen = first.code || !alternate.code ? first : alternate;
    return { ...chosen, text: chosen.text || first.text, originalText: t(9) };
  }

  /** An HD inside a component (CX-4, XCN-9, XON-6, RP-2): its subcomponents. */
  hd(seg: Seg | undefined, field: number, component: number, rep = 0): Hd {
    return { namespace: this.sub(seg, field, component, 1, rep), universalId: this.sub(seg, field, component, 2, rep) };
  }

  /** An HD that is a whole field (MSH-4, MSH-6): its components. */
  hdField(seg: Seg | undefined, field: number): Hd {
    return { namespace: this.text(seg, field, 1), universalId: this.text(seg, field, 2) };
  }
}

/** The message's delimiters; an escape character that is missing or collides with a separator disables decoding. */
export function delimitersOf(message: Hl7Message): Hl7Delimiters {
  const c = message.context as Partial<Hl7Delimiters> | undefined;
  const one = (s: unknown, fallback: string): string => (typeof s === 'string' && s.length === 1 ? s : fallback);
  const d = {
    fieldSeparator: one(c?.fieldSeparator, DEFAULT_DELIMITERS.fieldSeparator),
    componentSeparator: one(c?.componentSeparator, DEFAULT_DELIMITERS.componentSeparator),
    repetitionSeparator: one(c?.repetitionSeparator, DEFAULT_DELIMITERS.repetitionSeparator),
    subcomponentSeparator: one(c?.subcomponentSeparator, DEFAULT_DELIMITERS.subcomponentSeparator),
    escapeCharacter: typeof c?.escapeCharacter === 'string' ? c.escapeCharacter : '',
  };
  const separators = [d.fieldSeparator, d.componentSeparator, d.repetitionSeparator, d.subcomponentSeparator];
  if (d.escapeCharacter.length !== 1 || separators.includes(d.escapeCharacter) || /[\w\s]/.test(d.escapeCharacter)) d.escapeCharacter = '';
  return d;
}

/** An HL7 DTM/DT as YYYY-MM-DD; a partial date as YYYY or YYYY-MM, anything else as sent (the schema names both). */
function v2Date(value: string): string | undefined {
  const s = clean(value);
  if (!s) return undefined;
  const m = /^(\d{4})(\d{2})?(\d{2})?(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?)?(?:[+-]\d{4})?$/.exec(s);
  if (!m) return s;
  return [m[1], m[2], m[3]].filter((p) => p !== undefined).join('-');
}

/** ERL location text: SEG^seq[^field[^repetition[^component]]] (a component without a repetition is in the first). */
function erl(seg: Seg, field?: number, rep?: number, component?: number): string {
  const repetition = rep ?? (component === undefined ? undefined : 1);
  return [seg.name, seg.seq, field, repetition, component].filter((p) => p !== undefined).join('^');
}

const MESSAGE = 'MSH^1^9';

/** What is being built: the reading's fields, the referral, the locations and the issues. */
class Draft {
  action: V2Action = 'new';
  messageType = '';
  controlId = '';
  sendingFacility = '';
  sendingApplication = '';
  version = '';
  externalId: string | null = null;
  readonly referral: Record<string, unknown> = {};
  cancelReason?: string;
  readonly issues: V2Issue[] = [];
  readonly locations = new Map<string, string>();

  /** Records where a model path is in the message (the first answer for a path stands). */
  at(path: string, location: string | undefined): void {
    if (location !== undefined && !this.locations.has(path)) this.locations.set(path, location);
  }

  issue(severity: V2Issue['severity'], code: IssueCode, expression: string, message: string): void {
    if (this.issues.length < 200) this.issues.push({ code, severity, expression, message: `${expression}: ${message}` });
  }

  reading(): V2Reading {
    const locations = this.locations;
    return {
      action: this.action,
      messageType: this.messageType,
      controlId: this.controlId,
      sendingFacility: this.sendingFacility,
      sendingApplication: this.sendingApplication,
      version: this.version,
      externalId: this.externalId,
      referral: this.referral,
      ...(this.cancelReason === undefined ? {} : { cancelReason: this.cancelReason }),
      issues: this.issues,
      locate: (modelPath: string) => locate(locations, modelPath),
    };
  }
}

/** `documents.1.data` and `$.documents[1].data` as `documents[1].data`. */
function normalisePath(path: string): string {
  return String(path)
    .trim()
    .replace(/^\$\.?/, '')
    .replace(/\.(\d+)(?=\.|\[|$)/g, '[$1]');
}

function locate(locations: ReadonlyMap<string, string>, modelPath: string): string {
  let path = normalisePath(modelPath);
  while (path) {
    const found = locations.get(path);
    if (found) return found;
    const cut = path.endsWith(']') ? path.lastIndexOf('[') : path.lastIndexOf('.');
    path = cut > 0 ? path.slice(0, cut) : '';
  }
  return MESSAGE;
}

/** Sets `obj[key]` only when the value is there (not undefined, not an empty string or array). */
function put(obj: Record<string, unknown>, key: string, value: unknown): void {
  if (value === undefined || value === '' || (Array.isArray(value) && value.length === 0)) return;
  obj[key] = value;
}

// ---------------------------------------------------------------------------------------------------------------
// Codes and systems

class Codes {
  constructor(
    readonly tables: V2Tables,
    readonly facility: Hd
  ) {}

  /** A v2 coding system name (table 0396), URI or OID as a FHIR system URI; undefined when unknown. */
  systemUri(name: string): string | undefined {
    if (!name) return undefined;
    const mapped = this.tables.codingSystems.map.get(name.toUpperCase());
    if (mapped) return mapped;
    if (URI_LIKE.test(name)) return name;
    if (OID.test(name)) return `urn:oid:${name}`;
    return undefined;
  }

  isLocal(system: string): boolean {
    return this.tables.codingSystems.local.has(system.toUpperCase()) || /^99[A-Z0-9]{3}$/i.test(system);
  }

  /** The keys a coding is looked up by in a table: `<system URI>|code`, `<v2 system>|code`, `L|code` for a local system, and the code alone. */
  keys(c: V2Coding, withBareCode = true): string[] {
    if (!c.code) return [];
    const keys: string[] = [];
    const system = this.systemUri(c.system);
    if (system) keys.push(`${system}|${c.code}`);
    if (c.system) keys.push(`${c.system}|${c.code}`);
    if (c.system && this.isLocal(c.system)) keys.push(`L|${c.code}`);
    if (withBareCode) keys.push(c.code);
    return keys.map((k) => k.toUpperCase());
  }

  /** The FHIR coding of a v2 coding: an unknown system is kept as sent, so the schema refuses it where it is. */
  coding(c: V2Coding): Record<string, unknown> | undefined {
    if (!c.code) return undefined;
    const out: Record<string, unknown> = {};
    put(out, 'system', this.systemUri(c.system) ?? c.system);
    out.code = c.code;
    put(out, 'display', c.text || c.originalText);
    return out;
  }

  /**
   * The identifier system for an assigning authority (HD) and identifier type: byOid, byNamespace, the universal id
   * itself (OID, URI, UUID), byIdentifierType, bySendingFacility, default.
   */
  identifierSystem(authority: Hd, identifierType: string): string | undefined {
    const a = this.tables.assigningAuthorities;
    const uid = authority.universalId;
    const ns = authority.namespace;
    const fromTable = (uid && a.byOid.get(uid.toUpperCase())) || (ns && a.byNamespace.get(ns.toUpperCase()));
    if (fromTable) return fromTable;
    for (const candidate of [uid, ns]) {
      if (OID.test(candidate)) return `urn:oid:${candidate}`;
      if (URI_LIKE.test(candidate)) return candidate;
      if (UUID.test(candidate)) return `urn:uuid:${candidate.toLowerCase()}`;
    }
    return (
      (identifierType && a.byIdentifierType.get(identifierType.toUpperCase())) ||
      (this.facility.namespace && a.bySendingFacility.get(this.facility.namespace.toUpperCase())) ||
      (this.facility.universalId && a.bySendingFacility.get(this.facility.universalId.toUpperCase())) ||
      a.default ||
      undefined
    );
  }

  /** A MIME type from ED/RP type of data (table 0191) and subtype (table 0291). */
  mimeType(type: string, subtype: string): string | undefined {
    if (!type && !subtype) return undefined;
    if (type.includes('/')) return type.toLowerCase();
    const t = this.tables.contentTypes;
    const top = type ? (t.types.get(type.toUpperCase()) ?? type.toLowerCase()) : 'application';
    const sub = subtype ? (t.subtypes.get(subtype.toUpperCase()) ?? subtype.toLowerCase()) : t.defaultSubtypes.get(top.toUpperCase());
    return sub ? `${top}/${sub}` : top;
  }
}

function lookup<T>(map: ReadonlyMap<string, T>, keys: readonly string[]): T | undefined {
  for (const key of keys) {
    if (map.has(key)) return map.get(key);
  }
  return undefined;
}

/** The contract's own value used as a (local) code. */
function own<T extends string>(values: readonly T[], code: string): T | undefined {
  const lower = code.trim().toLowerCase();
  return values.find((v) => v === lower);
}

// ---------------------------------------------------------------------------------------------------------------
// The mapping

/** Segments whose notes (the NTE segments right after them) are about the referral as a whole. */
const REFERRAL_NOTE_PARENTS = new Set([
  '',
  'MSH',
  'SFT',
  'UAC',
  'RF1',
  'AUT',
  'CTD',
  'PRD',
  'PID',
  'PD1',
  'PV1',
  'PV2',
  'DG1',
  'DRG',
  'ORC',
  'TQ1',
  'TQ2',
  'OBR',
  'CON',
]);

/** OBX-11 result statuses whose observation is not to be used: D deleted, W wrong (post original as wrong), X cannot be obtained. */
const SKIPPED_RESULT_STATUSES = new Set(['D', 'W', 'X']);

/**
 * Reads an HL7 v2 referral (REF^I12/I13/I14, OMG^O19) into the gateway's JSON referral, with where each part of it
 * is in the message. Throws nothing for any message: what it cannot read is left out of `referral` (the caller
 * validates it with referralSchema and reports each issue at `locate(path)`), and problems the schema cannot see
 * are in `issues`. Z-segments are ignored. `tables` defaults to mappings/hl7v2.json (loading them may throw when
 * the file is broken: that is configuration, not input).
 */
export function readV2Referral(message: Hl7Message, tables: V2Tables = defaultV2Tables()): V2Reading {
  const draft = new Draft();
  try {
    read(new Reader(message), tables, draft);
  } catch (err) {
    draft.issue('error', 'exception', MESSAGE, `the message could not be read completely (${err instanceof Error ? err.name : 'error'})`);
  }
  return draft.reading();
}

function read(r: Reader, tables: V2Tables, d: Draft): void {
  const msh = r.first('MSH');
  header(r, msh, tables, d);
  const codes = new Codes(tables, r.hdField(msh, 4));
  const ctx: Ctx = { r, tables, codes, d, order: isOrder(r, tables, d), reasonTexts: [] };
  request(ctx);
  patient(ctx);
  referrer(ctx);
  destination(ctx);
  diagnosis(ctx);
  observations(ctx);
  notes(ctx);
  consent(ctx, msh);
}

interface Ctx {
  r: Reader;
  tables: V2Tables;
  codes: Codes;
  d: Draft;
  /** OMG^O19 style: ORC/OBR carry the order (else REF: RF1 carries the referral). */
  order: boolean;
  /** Reason texts from RF1-10 / OBR-31 repetitions without a mapped code: reasonText starts with them. */
  reasonTexts: string[];
}

function isOrder(r: Reader, tables: V2Tables, d: Draft): boolean {
  return tables.messageTypes.map.get(d.messageType.toUpperCase()) === 'order-control' || (!r.first('RF1') && r.first('ORC') !== undefined);
}

/** MSH: message type, control id, sender, version; and the action the message type (or ORC-1) means. */
function header(r: Reader, msh: Seg | undefined, tables: V2Tables, d: Draft): void {
  const code = r.text(msh, 9, 1);
  const trigger = r.text(msh, 9, 2);
  d.messageType = trigger ? `${code}^${trigger}` : code;
  d.controlId = r.text(msh, 10);
  d.sendingApplication = r.text(msh, 3, 1);
  d.sendingFacility = r.text(msh, 4, 1);
  d.version = r.text(msh, 12, 1);
  const meaning = tables.messageTypes.map.get(d.messageType.toUpperCase());
  if (meaning === undefined) {
    d.issue(
      'error',
      'not-supported',
      MESSAGE,
      `message type ${d.messageType || '(none)'} is not a referral this gateway takes (REF^I12, REF^I13, REF^I14, OMG^O19)`
    );
    return;
  }
  if (meaning !== 'order-control') {
    d.action = meaning;
    return;
  }
  const orc = r.first('ORC');
  const control = r.text(orc, 1).toUpperCase();
  const action = tables.orderControl.map.get(control);
  if (action) d.action = action;
  else d.issue('error', 'not-supported', orc ? erl(orc, 1) : MESSAGE, `order control ${control || '(none)'} is not one this gateway takes (NW, CA, DC, XO)`);
}

/** The referral itself: externalId, kind, priority, reasons (RF1 for REF; ORC/OBR/TQ1 for OMG). */
function request(ctx: Ctx): void {
  const { r, d, tables } = ctx;
  const rf1 = r.first('RF1');
  const orc = r.first('ORC');
  const obr = r.first('OBR');

  // externalId
  let externalId: string;
  if (ctx.order) {
    externalId = r.text(orc, 2, 1);
    d.at('externalId', orc ? erl(orc, 2) : undefined);
    if (!externalId && obr) {
      externalId = r.text(obr, 2, 1);
      if (externalId) d.locations.set('externalId', erl(obr, 2));
    }
  } else {
    externalId = r.text(rf1, 6, 1);
    d.at('externalId', rf1 ? erl(rf1, 6) : undefined);
  }
  d.externalId = externalId || null;
  put(d.referral, 'externalId', externalId);

  referralKind(ctx, rf1, obr);
  priority(ctx, rf1, orc, obr);

  // reasons: RF1-10 (REF) or OBR-31 (OMG)
  const [seg, field] = ctx.order ? [obr, 31] : [rf1, 10];
  const reasons: string[] = [];
  const texts: string[] = [];
  if (seg) {
    d.at('reasons', erl(seg, field));
    r.reps(seg, field).forEach((_, rep) => {
      const c = r.coding(seg, field, rep);
      const text = c.text || c.originalText;
      if (c.code) {
        const key = c.code.toUpperCase();
        const mapped = tables.reasons.map.has(key) ? tables.reasons.map.get(key) : own(reasonCodes, c.code);
        if (mapped) {
          if (!reasons.includes(mapped)) {
            d.at(`reasons[${reasons.length}]`, erl(seg, field, rep + 1));
            reasons.push(mapped);
          }
          return;
        }
        if (mapped === null || lookup(tables.kinds.referralReason, [key]) !== undefined || own(referralKinds, c.code)) return;
        if (!text) {
          d.issue('warning', 'code-invalid', erl(seg, field, rep + 1), `referral reason code ${c.code} is not in the reasons table and has no text; ignored`);
          return;
        }
      }
      if (text) {
        d.at('reasonText', erl(seg, field, rep + 1));
        texts.push(text);
      }
    });
  }
  put(d.referral, 'reasons', reasons);
  ctx.reasonTexts.push(...texts);
}

/** The referral kind: RF1-3, RF1-4, RF1-10 (REF) or OBR-4 (OMG), each through its table or as the contract's own value. */
function referralKind(ctx: Ctx, rf1: Seg | undefined, obr: Seg | undefined): void {
  const { r, d, tables, codes } = ctx;
  const candidates: Array<{ seg: Seg; field: number; table: ReadonlyMap<string, string> }> = [];
  if (ctx.order) {
    if (obr) candidates.push({ seg: obr, field: 4, table: tables.kinds.serviceRequested });
  } else if (rf1) {
    candidates.push({ seg: rf1, field: 3, table: tables.kinds.referralType });
    candidates.push({ seg: rf1, field: 4, table: tables.kinds.disposition });
    candidates.push({ seg: rf1, field: 10, table: tables.kinds.referralReason });
  }
  for (const { seg, field, table } of candidates) {
    const reps = r.reps(seg, field).length;
    for (let rep = 0; rep < reps; rep++) {
      const c = r.coding(seg, field, rep);
      const found = lookup(table, codes.keys(c)) ?? own(referralKinds, c.code);
      if (found) {
        d.referral.kind = found;
        d.at('kind', erl(seg, field, rep + 1));
        return;
      }
    }
  }
  const where = candidates[0];
  d.at('kind', where ? erl(where.seg, where.field) : undefined);
  put(d.referral, 'kind', tables.kinds.default ?? undefined);
}

/** The priority: RF1-2 (REF); TQ1-9, ORC-7.6, OBR-27.6, OBR-5 (OMG). An unknown code is kept, so the schema names it. */
function priority(ctx: Ctx, rf1: Seg | undefined, orc: Seg | undefined, obr: Seg | undefined): void {
  const { r, d, tables } = ctx;
  const tq1 = r.first('TQ1');
  const places: Array<[Seg | undefined, number, number]> = ctx.order
    ? [
        [tq1, 9, 1],
        [orc, 7, 6],
        [obr, 27, 6],
        [obr, 5, 1],
      ]
    : [[rf1, 2, 1]];
  for (const [seg, field, component] of places) {
    if (!seg) continue;
    const code = r.text(seg, field, component) || (component === 1 ? r.text(seg, field, 2) : '');
    if (!code) continue;
    d.referral.priority = tables.priorities.map.get(code.toUpperCase()) ?? code;
    d.at('priority', erl(seg, field, undefined, component === 1 ? undefined : component));
    return;
  }
  const expected = places.find(([seg]) => seg !== undefined);
  d.at('priority', expected?.[0] ? erl(expected[0], expected[1]) : undefined);
}

/** A person's name (XPN from `component`, or the name part of an XCN), with where its parts are. */
function personName(r: Reader, seg: Seg, field: number, rep: number, first: number): Record<string, unknown> {
  const name: Record<string, unknown> = {};
  const surname = r.sub(seg, field, first, 1, rep);
  const surnamePrefix = r.sub(seg, field, first, 2, rep);
  put(name, 'family', [surnamePrefix, surname].filter(Boolean).join(' '));
  put(
    name,
    'given',
    [r.text(seg, field, first + 1, rep), r.text(seg, field, first + 2, rep)].filter((g) => g !== '')
  );
  const prefix = r.text(seg, field, first + 4, rep);
  put(name, 'prefix', prefix ? [prefix] : []);
  return name;
}

/** The XPN repetition to use: legal name (type L) first, else the first with a family or given name. */
function chooseName(r: Reader, seg: Seg, field: number): number {
  const reps = r.reps(seg, field);
  const filled = (rep: number): boolean => r.sub(seg, field, 1, 1, rep) !== '' || r.text(seg, field, 2, rep) !== '';
  const legal = reps.findIndex((_, rep) => r.text(seg, field, 7, rep).toUpperCase() === 'L' && filled(rep));
  if (legal >= 0) return legal;
  const any = reps.findIndex((_, rep) => filled(rep));
  return any >= 0 ? any : 0;
}

function registerName(d: Draft, base: string, seg: Seg, field: number, rep: number, nameComponent = 1): void {
  d.at(base, erl(seg, field, rep + 1));
  d.at(`${base}.family`, erl(seg, field, rep + 1, nameComponent));
  d.at(`${base}.given`, erl(seg, field, rep + 1, nameComponent + 1));
  d.at(`${base}.prefix`, erl(seg, field, rep + 1, nameComponent + 4));
}

/** PID: identifiers (PID-3), name (PID-5), birth date (PID-7), sex (PID-8), phone and e-mail (PID-13, 14, 40). */
function patient(ctx: Ctx): void {
  const { r, d, tables, codes } = ctx;
  const pid = r.first('PID');
  if (!pid) return;
  const p: Record<string, unknown> = {};
  d.referral.patient = p;
  d.at('patient', erl(pid));

  // PID-3: every repetition with a value; those whose system cannot be resolved are dropped when others resolve.
  const found: Array<{ value: string; system?: string; rep: number }> = [];
  r.reps(pid, 3).forEach((_, rep) => {
    const value = r.text(pid, 3, 1, rep);
    if (!value) return;
    const system = codes.identifierSystem(r.hd(pid, 3, 4, rep), r.text(pid, 3, 5, rep));
    found.push({ value, ...(system ? { system } : {}), rep: rep + 1 });
  });
  const resolved = found.filter((i) => i.system !== undefined);
  const kept = resolved.length > 0 ? resolved : found;
  for (const dropped of found.filter((i) => !kept.includes(i))) {
    d.issue(
      'warning',
      'code-invalid',
      erl(pid, 3, dropped.rep, 4),
      'identifier left out: its assigning authority (CX-4) is not one the gateway can name a system for'
    );
  }
  d.at('patient.identifiers', erl(pid, 3));
  kept.forEach((i, n) => {
    d.at(`patient.identifiers[${n}]`, erl(pid, 3, i.rep));
    d.at(`patient.identifiers[${n}].value`, erl(pid, 3, i.rep, 1));
    d.at(`patient.identifiers[${n}].system`, erl(pid, 3, i.rep, 4));
  });
  put(
    p,
    'identifiers',
    kept.map((i) => (i.system ? { system: i.system, value: i.value } : { value: i.value }))
  );

  const nameRep = chooseName(r, pid, 5);
  const name = personName(r, pid, 5, nameRep, 1);
  registerName(d, 'patient.name', pid, 5, nameRep);
  if (Object.keys(name).length > 0) p.name = name;

  d.at('patient.birthDate', erl(pid, 7));
  put(p, 'birthDate', v2Date(r.text(pid, 7, 1)));

  d.at('patient.gender', erl(pid, 8));
  const sex = r.text(pid, 8, 1);
  put(p, 'gender', sex ? (tables.sex.map.get(sex.toUpperCase()) ?? sex) : undefined);

  telecom(ctx, pid, p);
}

/** The first telephone number and the first e-mail address among PID-13 (home), PID-14 (business), PID-40 (telecom). */
function telecom(ctx: Ctx, pid: Seg, p: Record<string, unknown>): void {
  const { r, d } = ctx;
  d.at('patient.phone', erl(pid, 13));
  d.at('patient.email', erl(pid, 13));
  for (const field of [13, 14, 40]) {
    r.reps(pid, field).forEach((_, rep) => {
      const use = r.text(pid, field, 2, rep).toUpperCase();
      const equipment = r.text(pid, field, 3, rep).toUpperCase();
      const email = r.text(pid, field, 4, rep);
      if (use === 'NET' || equipment === 'INTERNET' || equipment === 'X.400' || (email && !r.text(pid, field, 1, rep))) {
        if (email && p.email === undefined) {
          p.email = email;
          d.locations.set('patient.email', erl(pid, field, rep + 1, 4));
        }
        return;
      }
      if (p.phone !== undefined || equipment === 'FX' || equipment === 'BP') return;
      const parts = [r.text(pid, field, 5, rep), r.text(pid, field, 6, rep), r.text(pid, field, 7, rep)];
      const composed = parts[2] ? `${parts[0] ? `+${parts[0]} ` : ''}${parts[1] ? `${parts[1]} ` : ''}${parts[2]}` : '';
      const extension = r.text(pid, field, 8, rep);
      const number = r.text(pid, field, 12, rep) || r.text(pid, field, 1, rep) || (composed && extension ? `${composed} x${extension}` : composed);
      if (number) {
        p.phone = number;
        d.locations.set('patient.phone', erl(pid, field, rep + 1));
      }
    });
  }
}

/** An identifier read from a PRD-7 repetition: PLN (id^type^state^expiry) or, when component 4 is an assigning authority, CX. */
function providerIdentifier(ctx: Ctx, seg: Seg, field: number, rep: number): { value: string; system?: string; systemComponent: number } | undefined {
  const { r, codes } = ctx;
  const value = r.text(seg, field, 1, rep);
  if (!value) return undefined;
  const fourth = r.raw(seg, field, 4, rep);
  if (fourth && !/^\d{8}/.test(fourth.trim())) {
    const system = codes.identifierSystem(r.hd(seg, field, 4, rep), r.text(seg, field, 5, rep));
    return { value, ...(system ? { system } : {}), systemComponent: 4 };
  }
  const type = r.text(seg, field, 2, rep);
  const authority: Hd = OID.test(type) || URI_LIKE.test(type) ? { namespace: '', universalId: type } : { namespace: type, universalId: '' };
  const system = codes.identifierSystem(authority, type);
  return { value, ...(system ? { system } : {}), systemComponent: 2 };
}

/** An organization (XON): name XON-1, identifier XON-10 (else XON-3) in the system of XON-6 / XON-7. */
function organization(ctx: Ctx, seg: Seg, field: number, base: string): Record<string, unknown> | undefined {
  const { r, d, codes } = ctx;
  const name = r.text(seg, field, 1);
  const value = r.text(seg, field, 10) || r.text(seg, field, 3);
  if (!name && !value) return undefined;
  const org: Record<string, unknown> = {};
  d.at(base, erl(seg, field));
  d.at(`${base}.name`, erl(seg, field, 1, 1));
  d.at(`${base}.identifier`, erl(seg, field, 1));
  d.at(`${base}.identifier.value`, erl(seg, field, 1, r.text(seg, field, 10) ? 10 : 3));
  d.at(`${base}.identifier.system`, erl(seg, field, 1, 6));
  if (value) {
    const system = codes.identifierSystem(r.hd(seg, field, 6), r.text(seg, field, 7));
    org.identifier = system ? { system, value } : { value };
  }
  put(org, 'name', name);
  return org;
}

/** Whether a PRD has a provider role (PRD-1, table 0286, repeating). */
function hasRole(r: Reader, prd: Seg, role: string): boolean {
  return r.reps(prd, 1).some((_, rep) => r.text(prd, 1, 1, rep).toUpperCase() === role);
}

/** The referring clinician and organization: PRD with role RP, else ORC-12 / OBR-16 / PV1-8 (XCN); organization PRD-10, ORC-21 or MSH-4. */
function referrer(ctx: Ctx): void {
  const { r, d, codes } = ctx;
  const rp = r.all('PRD').find((prd) => hasRole(r, prd, 'RP'));
  const ref: Record<string, unknown> = {};
  const practitioner: Record<string, unknown> = {};
  let org: Record<string, unknown> | undefined;

  if (rp) {
    d.at('referrer', erl(rp));
    d.at('referrer.practitioner', erl(rp, 2));
    const nameRep = chooseName(r, rp, 2);
    const name = personName(r, rp, 2, nameRep, 1);
    registerName(d, 'referrer.practitioner.name', rp, 2, nameRep);
    if (Object.keys(name).length > 0) practitioner.name = name;
    const ids = r
      .reps(rp, 7)
      .map((_, rep) => ({ rep, id: providerIdentifier(ctx, rp, 7, rep) }))
      .filter((x) => x.id !== undefined);
    const chosen = ids.find((x) => x.id?.system !== undefined) ?? ids[0];
    d.at('referrer.practitioner.identifier', erl(rp, 7, chosen ? chosen.rep + 1 : undefined));
    if (chosen?.id) {
      const { value, system, systemComponent } = chosen.id;
      practitioner.identifier = system ? { system, value } : { value };
      d.at('referrer.practitioner.identifier.value', erl(rp, 7, chosen.rep + 1, 1));
      d.at('referrer.practitioner.identifier.system', erl(rp, 7, chosen.rep + 1, systemComponent));
    }
    org = organization(ctx, rp, 10, 'referrer.organization');
  } else {
    const candidates: Array<[Seg | undefined, number]> = [
      [r.first('ORC'), 12],
      [r.first('OBR'), 16],
      [r.first('PV1'), 8],
    ];
    const found = candidates.find(([seg, field]) => seg !== undefined && (r.text(seg, field, 1) !== '' || r.sub(seg, field, 2, 1) !== ''));
    const [seg, field] = found ?? [undefined, 0];
    if (seg) {
      d.at('referrer', erl(seg, field));
      d.at('referrer.practitioner', erl(seg, field));
      const name = personName(r, seg, field, 0, 2);
      registerName(d, 'referrer.practitioner.name', seg, field, 0, 2);
      if (Object.keys(name).length > 0) practitioner.name = name;
      const value = r.text(seg, field, 1);
      d.at('referrer.practitioner.identifier', erl(seg, field, 1));
      d.at('referrer.practitioner.identifier.value', erl(seg, field, 1, 1));
      d.at('referrer.practitioner.identifier.system', erl(seg, field, 1, 9));
      if (value) {
        const system = codes.identifierSystem(r.hd(seg, field, 9), r.text(seg, field, 13));
        practitioner.identifier = system ? { system, value } : { value };
      }
    }
  }

  const orc = r.first('ORC');
  if (!org && orc) org = organization(ctx, orc, 21, 'referrer.organization');
  if (!org) {
    // The sending facility (MSH-4) names the organization but not its name: the schema will ask for the name there.
    const msh = r.first('MSH');
    const hd = r.hdField(msh, 4);
    if (msh && hd.namespace) {
      const system = codes.identifierSystem({ namespace: '', universalId: hd.universalId }, '');
      org = { identifier: system ? { system, value: hd.namespace } : { value: hd.namespace } };
      d.at('referrer.organization', erl(msh, 4));
    }
  }
  if (Object.keys(practitioner).length === 0 && !org && !rp) return;
  if (Object.keys(practitioner).length > 0 || rp) ref.practitioner = practitioner;
  if (org) ref.organization = org;
  d.referral.referrer = ref;
}

/** The destination: PRD with role RT through the destinations table; else MSH-6 when the table knows it; else left to routing. */
function destination(ctx: Ctx): void {
  const { r, d, tables, codes } = ctx;
  const t = tables.destinations;
  const rt = r.all('PRD').find((prd) => hasRole(r, prd, 'RT'));
  if (rt) {
    const keys: string[] = [];
    r.reps(rt, 7).forEach((_, rep) => {
      const id = providerIdentifier(ctx, rt, 7, rep);
      if (id?.system) keys.push(`${id.system}|${id.value}`);
      if (id) keys.push(id.value);
    });
    const orgId = r.text(rt, 10, 10) || r.text(rt, 10, 3);
    if (orgId) {
      const system = codes.identifierSystem(r.hd(rt, 10, 6), r.text(rt, 10, 7));
      if (system) keys.push(`${system}|${orgId}`);
      keys.push(orgId);
    }
    const names = [r.text(rt, 10, 1), r.sub(rt, 2, 1, 1)].filter(Boolean);
    const found =
      lookup(
        t.byIdentifier,
        keys.map((k) => k.toUpperCase())
      ) ??
      lookup(
        t.byName,
        names.map((n) => n.toUpperCase())
      );
    const where = erl(rt, r.text(rt, 10, 1) !== '' || orgId !== '' ? 10 : 7);
    d.at('destination', where);
    if (found) {
      d.referral.destination = found;
      return;
    }
    if (t.unmatched) {
      d.referral.destination = t.unmatched;
      d.issue('warning', 'not-found', where, `the referred-to provider is not in the destinations table; sent to ${t.unmatched}`);
    } else {
      d.issue('warning', 'not-found', where, 'the referred-to provider is not in the destinations table; the routing rules choose the destination');
    }
    return;
  }
  const msh = r.first('MSH');
  const hd = r.hdField(msh, 6);
  const found = lookup(
    t.byIdentifier,
    [hd.namespace, hd.universalId].filter(Boolean).map((k) => k.toUpperCase())
  );
  d.at('destination', msh ? erl(msh, 6) : undefined);
  if (found) d.referral.destination = found;
}

/** The diagnosis: the primary DG1 (DG1-15 = 1, else the first with a code), DG1-3 code, DG1-5 date; a DG1 in ICD-O-3 is the histology. */
function diagnosis(ctx: Ctx): void {
  const { r, d, codes } = ctx;
  const dg1s = r.all('DG1').filter((seg) => r.coding(seg, 3).code !== '');
  const isHistology = (seg: Seg): boolean => codes.systemUri(r.coding(seg, 3).system) === 'http://terminology.hl7.org/CodeSystem/icd-o-3';
  const diagnoses = dg1s.filter((seg) => !isHistology(seg));
  const primary = diagnoses.find((seg) => r.text(seg, 15) === '1') ?? diagnoses[0] ?? r.all('DG1').find((seg) => !isHistology(seg));
  const histology = dg1s.find(isHistology);
  if (!primary && !histology) return;
  const dx = diagnosisOf(d);
  if (primary) {
    d.at('diagnosis', erl(primary));
    d.at('diagnosis.code', erl(primary, 3));
    d.at('diagnosis.code.code', erl(primary, 3, 1, 1));
    d.at('diagnosis.code.system', erl(primary, 3, 1, 3));
    d.at('diagnosis.code.display', erl(primary, 3, 1, 2));
    d.at('diagnosis.diagnosedOn', erl(primary, 5));
    const c = r.coding(primary, 3);
    put(dx, 'code', codes.coding({ ...c, text: c.text || r.text(primary, 4) }));
    put(dx, 'diagnosedOn', v2Date(r.text(primary, 5, 1)));
  }
  if (histology) {
    d.at('diagnosis.histology', erl(histology, 3));
    put(dx, 'histology', codes.coding(r.coding(histology, 3)));
  }
}

function diagnosisOf(d: Draft): Record<string, unknown> {
  const existing = d.referral.diagnosis;
  if (existing && typeof existing === 'object') return existing as Record<string, unknown>;
  const dx: Record<string, unknown> = {};
  d.referral.diagnosis = dx;
  return dx;
}

/** The document kind of a coding: LOINC through the table, or the contract's own value as a (local) code. */
function documentKind(ctx: Ctx, c: V2Coding): (typeof documentKinds)[number] | undefined {
  if (!c.code) return undefined;
  const system = ctx.codes.systemUri(c.system);
  if (!c.system || system === 'http://loinc.org') {
    const found = ctx.tables.documentKinds.loinc.get(c.code.toUpperCase());
    if (found) return found;
  }
  return own(documentKinds, c.code);
}

interface TextDocument {
  doc: Record<string, unknown>;
  lines: string[];
  code: string;
  subId: string;
}

/** OBX: documents (ED embedded, RP reference, TX/FT/ST text with a document code) and the diagnosis observations. */
function observations(ctx: Ctx): void {
  const { r, d, tables, codes } = ctx;
  const documents: Array<Record<string, unknown>> = [];
  let obr: Seg | undefined;
  let text: TextDocument | undefined;
  let lastSegment = -1;

  r.segments.forEach((seg, index) => {
    if (seg.name === 'OBR') obr = seg;
    if (seg.name !== 'OBX') return;
    const previous = lastSegment;
    lastSegment = index;
    if (SKIPPED_RESULT_STATUSES.has(r.text(seg, 11).toUpperCase())) return;
    const valueType = r.text(seg, 2).toUpperCase();
    const c = r.coding(seg, 3);

    const target = lookup(tables.observations.map, codes.keys(c, false));
    if (target && valueType !== 'ED' && valueType !== 'RP') {
      diagnosisObservation(ctx, seg, target, valueType);
      return;
    }

    const kind = documentKind(ctx, c) ?? (obr ? documentKind(ctx, r.coding(obr, 4)) : undefined);
    const n = documents.length;
    const base = `documents[${n}]`;
    const register = (contentComponent?: number): void => {
      d.at(base, erl(seg));
      d.at(`${base}.kind`, erl(seg, 3));
      d.at(`${base}.title`, erl(seg, 3));
      d.at(`${base}.date`, erl(seg, 14));
      d.at(`${base}.data`, erl(seg, 5));
      d.at(`${base}.url`, erl(seg, 5));
      d.at(`${base}.contentType`, erl(seg, 5, contentComponent === undefined ? undefined : 1, contentComponent));
    };
    const start = (k: (typeof documentKinds)[number]): Record<string, unknown> => {
      const doc: Record<string, unknown> = { kind: k, title: c.originalText || c.text || tables.documentKinds.titles[k] };
      put(doc, 'date', v2Date(r.text(seg, 14, 1)) ?? v2Date(r.text(seg, 19, 1)));
      documents.push(doc);
      return doc;
    };

    switch (valueType) {
      case 'ED': {
        text = undefined;
        register(2);
        dicomKind(ctx, edDocument(ctx, seg, start(kind ?? 'other')));
        break;
      }
      case 'RP': {
        text = undefined;
        register(3);
        dicomKind(ctx, rpDocument(ctx, seg, start(kind ?? 'other')));
        break;
      }
      case 'TX':
      case 'FT':
      case 'ST': {
        if (!kind) {
          text = undefined;
          break;
        }
        const lines = r.reps(seg, 5).map((_, rep) => r.decode(r.rawRep(seg, 5, rep)));
        const subId = r.text(seg, 4);
        if (text && previous === index - 1 && text.code === c.code && text.subId === subId) {
          text.lines.push(...lines);
        } else {
          register();
          const doc = start(kind);
          doc.contentType = 'text/plain';
          text = { doc, lines, code: c.code, subId };
        }
        text.doc.data = Buffer.from(text.lines.map((l) => `${l}\n`).join(''), 'utf8').toString('base64');
        break;
      }
      default: {
        text = undefined;
        if (!kind) break;
        register();
        start(kind);
        d.issue(
          'error',
          'not-supported',
          erl(seg, 2),
          `value type ${valueType || '(none)'} cannot carry a document: send it as ED (embedded), RP (reference) or TX/FT text`
        );
      }
    }
  });
  d.at('documents', documents.length > 0 ? d.locations.get('documents[0]') : undefined);
  put(d.referral, 'documents', documents);
}

/** An imaging report whose content is DICOM is an imaging study (table documentKinds.dicom). */
function dicomKind(ctx: Ctx, doc: Record<string, unknown>): void {
  const becomes = ctx.tables.documentKinds.dicom[doc.kind as (typeof documentKinds)[number]];
  if (becomes && doc.contentType === 'application/dicom') doc.kind = becomes;
}

/** OBX-5 ED: source^type^subtype^encoding^data. */
function edDocument(ctx: Ctx, seg: Seg, doc: Record<string, unknown>): Record<string, unknown> {
  const { r, d, codes } = ctx;
  put(doc, 'contentType', codes.mimeType(r.text(seg, 5, 2), r.text(seg, 5, 3)));
  const encoding = r.text(seg, 5, 4).toUpperCase();
  const raw = r.raw(seg, 5, 5).trim();
  if (!raw) return doc;
  switch (encoding) {
    case '':
    case 'BASE64':
      doc.data = raw;
      break;
    case 'A': {
      // Text: a component separator the sender did not escape is part of it.
      const textData = (r.reps(seg, 5)[0] ?? []).slice(4).join(r.delimiters.componentSeparator);
      doc.data = Buffer.from(r.decode(textData), 'utf8').toString('base64');
      break;
    }
    case 'HEX':
      if (/^(?:[0-9A-Fa-f]{2})+$/.test(raw)) {
        doc.data = Buffer.from(raw, 'hex').toString('base64');
      } else {
        d.issue('error', 'invalid', erl(seg, 5, 1, 5), 'the data is not hexadecimal as ED-4 (Hex) says');
      }
      break;
    default:
      d.issue('error', 'not-supported', erl(seg, 5, 1, 4), `ED encoding ${encoding} is not one of Base64, Hex, A (table 0299)`);
  }
  return doc;
}

/** OBX-5 RP: pointer^application id^type^subtype; a relative pointer is resolved against an http(s) application id. */
function rpDocument(ctx: Ctx, seg: Seg, doc: Record<string, unknown>): Record<string, unknown> {
  const { r, codes } = ctx;
  put(doc, 'contentType', codes.mimeType(r.text(seg, 5, 3), r.text(seg, 5, 4)));
  const pointer = r.text(seg, 5, 1);
  if (!pointer) return doc;
  doc.url = pointer;
  if (/^https?:\/\//i.test(pointer)) return doc;
  const base = [r.sub(seg, 5, 2, 2), r.sub(seg, 5, 2, 1)].find((s) => /^https?:\/\//i.test(s));
  if (base) {
    try {
      doc.url = new URL(pointer, base.endsWith('/') ? base : `${base}/`).toString();
    } catch {
      // not a URL together: kept as sent, so the schema names it
    }
  }
  return doc;
}

/** An OBX observation for the diagnosis (stage, histology, body site, laterality). */
function diagnosisObservation(ctx: Ctx, seg: Seg, target: string, valueType: string): void {
  const { r, d, tables, codes } = ctx;
  const dx = diagnosisOf(d);
  const coded = ['CE', 'CWE', 'CNE', 'CF'].includes(valueType);
  const value = coded ? r.coding(seg, 5) : { code: '', text: r.decode(r.rawRep(seg, 5)).trim(), system: '', originalText: '' };
  const where = erl(seg, 5);
  switch (target) {
    case 'histology':
    case 'bodySite': {
      if (dx[target] !== undefined) return;
      d.at(`diagnosis.${target}`, where);
      d.at(`diagnosis.${target}.code`, erl(seg, 5, 1, 1));
      d.at(`diagnosis.${target}.system`, erl(seg, 5, 1, 3));
      if (!coded) {
        d.issue(
          'warning',
          'not-supported',
          erl(seg, 2),
          `a ${target === 'histology' ? 'histology' : 'body site'} observation must be coded (CWE); value type ${valueType || '(none)'} ignored`
        );
        return;
      }
      put(dx, target, codes.coding(value));
      return;
    }
    case 'laterality': {
      if (dx.laterality !== undefined) return;
      d.at('diagnosis.laterality', where);
      const found = lookup(tables.lateralities.map, codes.keys(value)) ?? lookup(tables.lateralities.map, [value.text.toUpperCase()].filter(Boolean));
      put(dx, 'laterality', found ?? (value.code || value.text));
      return;
    }
    default: {
      if (dx.stage !== undefined) return;
      const stageLike = /^(?=.*[IVX0-4])[0-4IVXABCDisa]{1,6}$/;
      const group = stageLike.test(value.code) ? value.code : value.text.replace(/^(ajcc\s+)?(stage\s+)?/i, '').trim() || value.code;
      if (!group) return;
      d.at('diagnosis.stage', where);
      d.at('diagnosis.stage.value', where);
      d.at('diagnosis.stage.type', erl(seg, 3));
      d.at('diagnosis.stage.system', erl(seg, 17));
      const stage: Record<string, unknown> = {};
      const method = r.coding(seg, 17);
      if (method.code) stage.system = lookup(tables.stagingSystems.map, codes.keys(method)) ?? method.code;
      if (target === 'stage-clinical') stage.type = 'clinical';
      if (target === 'stage-pathologic') stage.type = 'pathologic';
      stage.value = group;
      dx.stage = stage;
    }
  }
}

/** NTE: questions (typed PQ), reason text (the referral's notes), and for a cancel its reason. */
function notes(ctx: Ctx): void {
  const { r, d, tables } = ctx;
  const questions: string[] = [];
  const noteLines: string[] = [];
  let parent = '';
  for (const seg of r.segments) {
    if (seg.name !== 'NTE') {
      parent = seg.name;
      continue;
    }
    if (parent.startsWith('Z')) continue;
    const type = r.text(seg, 4, 1).toUpperCase();
    const target = (type && tables.noteTypes.map.get(type)) || tables.noteTypes.default;
    const text = r
      .reps(seg, 3)
      .map((_, rep) => r.decode(r.rawRep(seg, 3, rep)))
      .join('\n')
      .trim();
    if (!text || target === 'ignore') continue;
    if (target === 'question') {
      d.at(`questions[${questions.length}]`, erl(seg, 3));
      d.at('questions', erl(seg, 3));
      questions.push(text);
    } else if (REFERRAL_NOTE_PARENTS.has(parent)) {
      d.at('reasonText', erl(seg, 3));
      noteLines.push(text);
    }
  }
  put(d.referral, 'questions', questions);
  put(d.referral, 'reasonText', [...ctx.reasonTexts, ...noteLines].join('\n'));

  if (d.action === 'cancel') {
    const orc = r.first('ORC');
    const reason = r.text(orc, 16, 2) || r.text(orc, 16, 9) || r.text(orc, 16, 1) || noteLines.join('\n');
    if (reason) d.cancelReason = reason;
  }
}

/** CON: consent.patientAgreed from CON-11 (table 0498), consent.date from CON-13 (else 14, 12); without one, the whenAbsent rule. */
function consent(ctx: Ctx, msh: Seg | undefined): void {
  const { r, d, tables } = ctx;
  const t = tables.consent;
  const relevant = r.all('CON').filter((con) => {
    const type = r.text(con, 2, 1).toUpperCase();
    return type === '' || t.types.has(type);
  });
  if (relevant.length > 0) {
    const status = (con: Seg): boolean | undefined => t.statuses.get(r.text(con, 11, 1).toUpperCase());
    const chosen = relevant.find((con) => status(con) === false) ?? relevant.find((con) => status(con) === true) ?? relevant[0];
    const c: Record<string, unknown> = {};
    put(c, 'patientAgreed', status(chosen));
    put(c, 'date', v2Date(r.text(chosen, 13, 1)) ?? v2Date(r.text(chosen, 14, 1)) ?? v2Date(r.text(chosen, 12, 1)));
    d.referral.consent = c;
    d.at('consent', erl(chosen));
    d.at('consent.patientAgreed', erl(chosen, 11));
    d.at('consent.date', erl(chosen, 13));
    return;
  }
  const facility = r.hdField(msh, 4);
  const listed = [facility.namespace, facility.universalId].some((f) => f !== '' && (t.whenAbsent?.facilities.has(f.toUpperCase()) ?? false));
  if (t.whenAbsent && listed && msh) {
    d.referral.consent = { patientAgreed: t.whenAbsent.patientAgreed };
    d.at('consent', erl(msh, 4));
  }
}
