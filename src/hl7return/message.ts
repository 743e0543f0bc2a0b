import { escapeText, type V2Tables } from '../intake';
import type { Referral, ReferralStatus } from '../model';
import type { Hl7Origin } from '../store';
import type { StatusTables } from './tables';

// The status messages sent back to an HL7 v2 sender, in its own family and version (ER7, segments separated by CR):
//   REF^I12 sender: RRI^I12   MSH, RF1 (status), PRD (the referring provider), PID, [OBR + OBX ED report], [NTE reason]
//   OMG^O19 sender: OSU^O51   MSH, PID, ORC (SC, order status, reason in ORC-16)
//                   and, when it completes with a report, ORU^R01: MSH, PID, ORC (RE), OBR, OBX ED (OSU_O51 has no
//                   place for observations);
//                   and when the centre books the board, SIU^S12: MSH, SCH, [TQ1], PID, RGS, AIS.
// Built when they are sent, from the stored referral and the status change queued; every text we write is escaped.

/** A report to attach: its bytes as the centre serves them. */
export interface ReportAttachment {
  contentType: string;
  body: Buffer;
}

export interface StatusMessageInput {
  origin: Hl7Origin;
  referral: { id: string; externalId: string; payload: Pick<Referral, 'patient' | 'referrer' | 'kind'> };
  /**
   * The status change or booking (an hl7_outbox row): its id names the messages (MSH-10). A booking (`message`
   * `appointment`) carries the business status code in `reason` and the appointment's start, if the Task gave one.
   */
  change: { id: string; status: ReferralStatus; reason: string | null; at: string; message?: 'status' | 'appointment'; appointmentStart?: string | null };
  /** The opinion report, for a change to completed (left out when it could not be read). */
  report?: ReportAttachment;
  tables: StatusTables;
  /** The intake's HL7 v2 tables: identifier systems back to assigning authorities. */
  v2Tables: V2Tables;
  now?: Date;
}

/** One message to send, and the control id its acknowledgement must name (MSA-2). */
export interface OutboundMessage {
  type: string;
  controlId: string;
  text: string;
}

/** The application named in MSH-3 when the sender did not address one (MSH-5 empty). */
export const GATEWAY_APPLICATION = 'REFERRAL-GATEWAY';

/**
 * The messages for one status change, in the order they are sent: one, or for a 360X sender whose referral completed
 * with a report, the OSU^O51 and then the ORU^R01 with the report. Control ids are derived from the change's id
 * (at most 20 characters, the limit before v2.7), so a resend carries the same ones and a receiver can de-duplicate.
 */
export function statusMessages(input: StatusMessageInput): OutboundMessage[] {
  if (input.change.message === 'appointment') {
    // Only 360X senders are sent bookings (the REF family has no appointment message); the store queues no other.
    return input.origin.family === 'OMG' ? [message(input, 'SIU^S12^SIU_S12', 1, siuSegments(input))] : [];
  }
  if (input.origin.family === 'REF') return [message(input, 'RRI^I12^RRI_I12', 1, rriSegments(input))];
  const messages = [message(input, 'OSU^O51^OSU_O51', 1, osuSegments(input))];
  if (input.report) messages.push(message(input, 'ORU^R01^ORU_R01', 2, oruSegments(input, input.report)));
  return messages;
}

/** MSH-10 of the `n`th message of a change: the end of its id's ULID and the number (20 characters). */
export function controlId(changeId: string, n: number): string {
  const ulid = changeId.slice(changeId.indexOf('_') + 1);
  return `${ulid.slice(-19)}${n}`;
}

function message(input: StatusMessageInput, type: string, n: number, body: string[][]): OutboundMessage {
  const o = input.origin;
  const id = controlId(input.change.id, n);
  const msh = [
    'MSH',
    '^~\\&',
    o.receivingApplication || GATEWAY_APPLICATION,
    o.receivingFacility,
    o.sendingApplication,
    o.sendingFacility,
    ts((input.now ?? new Date()).toISOString()),
    '',
    type,
    id,
    'P',
    o.version || '2.5.1',
  ];
  return { type: type.split('^').slice(0, 2).join('^'), controlId: id, text: [msh, ...body].map(segment).join('\r') };
}

// ---- segments ----

function rriSegments(input: StatusMessageInput): string[][] {
  const { referral, change, tables, report, origin } = input;
  const code = tables.referralStatus.map[change.status];
  const rf1 = [
    'RF1',
    // RF1-1: the table 0283 code, and the gateway's exact status as the alternate (local) code.
    `${code}^${txt(tables.referralStatus.displays[code])}^HL70283^${change.status}^${txt(statusDisplay(change.status))}^L`,
    '',
    '',
    '',
    '',
    referralIdentifier(origin, referral.externalId),
    // RF1-7 effective date: when the status changed.
    ts(change.at),
    '',
    '',
    '',
    // RF1-11 external referral identifier: the gateway's id for the referral.
    txt(referral.id),
  ];
  const segments = [rf1, prd(referral.payload.referrer), pid(referral.payload.patient, input.v2Tables)];
  if (report) segments.push(...reportSegments(input, report));
  if (change.reason) segments.push(['NTE', '1', 'L', ft(change.reason), 'RE^Remark^HL70364']);
  return segments;
}

function osuSegments(input: StatusMessageInput): string[][] {
  const { referral, change, tables, origin } = input;
  return [
    pid(referral.payload.patient, input.v2Tables),
    [
      'ORC',
      'SC',
      referralIdentifier(origin, referral.externalId),
      txt(referral.id),
      '',
      tables.orderStatus.map[change.status],
      '',
      '',
      '',
      ts(change.at),
      '',
      '',
      xcn(referral.payload.referrer.practitioner, input.v2Tables),
      '',
      '',
      '',
      // ORC-16 order control code reason: the gateway's exact status (local code) and the reason, else its name.
      `${change.status}^${change.reason ? txt(change.reason) : txt(statusDisplay(change.status))}^L`,
    ],
  ];
}

/**
 * SIU^S12, notification of new appointment booking (v2.5.1 SIU_S12: MSH, SCH, [TQ1], PID, RGS, AIS). The gateway
 * relays the centre's booking, so it writes the filler's side: SCH-2 the booking's id (the outbox row's, stable across
 * resends), SCH-6 the Task's business status, SCH-25 Booked, SCH-26 the sender's order (ORC-2 as sent), SCH-27 the
 * gateway's id (ORC-3 of the OSU^O51). The start goes in SCH-11 (TQ, before 2.7, where it was withdrawn) and TQ1-7
 * (from 2.5), and AIS-4; without one, they are left empty. AIS-3 is the service: the referral's kind.
 */
function siuSegments(input: StatusMessageInput): string[][] {
  const { referral, change, tables, origin } = input;
  const code = change.reason ?? '';
  const display = tables.appointment.bookingCodes.find((b) => b.code === code)?.display ?? code;
  const start = change.appointmentStart ? dtm(change.appointmentStart) : '';
  const version = versionNumber(origin.version || '2.5.1');
  const sch = ['SCH', '', txt(change.id), '', '', '', `${txt(code)}^${txt(display)}^L`, '', '', '', '', start && version < 207 ? `^^^${start}` : ''];
  while (sch.length < 25) sch.push('');
  sch.push('Booked^Booked^HL70278', referralIdentifier(origin, referral.externalId), txt(referral.id));
  const segments = [sch];
  if (start && version >= 205) segments.push(['TQ1', '1', '', '', '', '', '', start]);
  const kind = referral.payload.kind;
  segments.push(pid(referral.payload.patient, input.v2Tables), ['RGS', '1', 'A'], ['AIS', '1', 'A', `${txt(kind)}^${txt(kindDisplay(kind))}^L`, start]);
  return segments;
}

function oruSegments(input: StatusMessageInput, report: ReportAttachment): string[][] {
  const { referral, change, origin } = input;
  return [
    pid(referral.payload.patient, input.v2Tables),
    ['ORC', 'RE', referralIdentifier(origin, referral.externalId), txt(referral.id), '', 'CM', '', '', '', ts(change.at)],
    ...reportSegments(input, report),
  ];
}

/** OBR and an OBX whose value is the report (ED: type and subtype from its content type, Base64), final (F). */
function reportSegments(input: StatusMessageInput, report: ReportAttachment): string[][] {
  const { tables, change, referral, origin } = input;
  const code = `${txt(tables.report.code)}^${txt(tables.report.display)}^${txt(tables.report.system)}`;
  const at = ts(change.at);
  const obr = ['OBR', '1', referralIdentifier(origin, referral.externalId), txt(referral.id), code, '', '', at];
  while (obr.length < 22) obr.push('');
  obr.push(at, '', '', 'F'); // OBR-22 results reported, OBR-25 result status
  const [type, subtype] = mediaType(report.contentType);
  const ed = `^${txt(type)}^${txt(subtype)}^Base64^${report.body.toString('base64')}`;
  return [obr, ['OBX', '1', 'ED', code, '1', ed, '', '', '', '', '', 'F', '', '', at]];
}

// ---- data types ----

function pid(patient: Referral['patient'], v2: V2Tables): string[] {
  const ids = patient.identifiers.map((i) => `${txt(i.value)}^^^${assigningAuthority(i.system, v2)}`).join('~');
  return ['PID', '1', '', ids, '', xpn(patient.name), '', patient.birthDate.replace(/-/g, ''), SEX[patient.gender]];
}

/** PRD for the referring provider (RF1's referral came from them): role RP, name, and identifier (PLN; NPI typed). */
function prd(referrer: Referral['referrer']): string[] {
  const id = referrer.practitioner.identifier;
  const type = id.system === NPI ? '^NPI' : '';
  return ['PRD', 'RP^Referring Provider^HL70286', xpn(referrer.practitioner.name), '', '', '', '', `${txt(id.value)}${type}`];
}

/** XCN: identifier, family, given, and the identifier's assigning authority (XCN-9). */
function xcn(practitioner: Referral['referrer']['practitioner'], v2: V2Tables): string {
  const [given, ...more] = practitioner.name.given;
  return [
    txt(practitioner.identifier.value),
    txt(practitioner.name.family),
    txt(given ?? ''),
    txt(more.join(' ')),
    '',
    '',
    '',
    '',
    assigningAuthority(practitioner.identifier.system, v2),
  ]
    .join('^')
    .replace(/\^+$/, '');
}

/** XPN: family ^ given ^ further given names ^ suffix ^ prefix. */
function xpn(name: Referral['patient']['name']): string {
  const [given, ...more] = name.given;
  return [txt(name.family), txt(given ?? ''), txt(more.join(' ')), '', txt((name.prefix ?? []).join(' '))].join('^').replace(/\^+$/, '');
}

const NPI = 'http://hl7.org/fhir/sid/us-npi';
const SEX: Record<Referral['patient']['gender'], string> = { male: 'M', female: 'F', other: 'O', unknown: 'U' };

/**
 * An identifier system as an HD in a component (subcomponents namespace&universal id&type): the OID the intake
 * table maps to this system (with its namespace when it has one), an `urn:oid:` system's OID, else the URI itself.
 * The intake reads each of them back to the same system.
 */
function assigningAuthority(system: string, v2: V2Tables): string {
  const tables = v2.assigningAuthorities;
  const oid = [...tables.byOid].find(([, uri]) => uri === system)?.[0] ?? (system.startsWith('urn:oid:') ? system.slice(8) : undefined);
  const namespace = [...tables.byNamespace].find(([, uri]) => uri === system)?.[0] ?? '';
  if (oid) return `${txt(namespace)}&${txt(oid)}&ISO`;
  return `${txt(namespace)}&${txt(system)}&URI`;
}

/** The sender's id for the referral as it sent it (RF1-6, ORC-2), or the externalId when it has none. */
function referralIdentifier(origin: Hl7Origin, externalId: string): string {
  return origin.referralIdentifier || txt(externalId);
}

/** `text/plain; charset=utf-8` as [text, plain]; not a MIME type: application/octet-stream. */
function mediaType(contentType: string): [string, string] {
  const m = /^\s*([\w.+-]+)\/([\w.+-]+)/.exec(contentType);
  return m ? [m[1].toLowerCase(), m[2].toLowerCase()] : ['application', 'octet-stream'];
}

/** `tumour-board-review` as `Tumour board review`. */
function kindDisplay(kind: Referral['kind']): string {
  const words = kind.replace(/-/g, ' ');
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** MSH-12 as major * 100 + minor for comparisons (`2.5.1` as 205); unreadable: 2.5.1's. */
function versionNumber(version: string): number {
  const m = /^(\d+)\.(\d+)/.exec(version);
  return m ? Number(m[1]) * 100 + Number(m[2]) : 205;
}

/** `in-progress` as `In progress`. */
function statusDisplay(status: ReferralStatus): string {
  const words = status.replace(/-/g, ' ');
  return words.charAt(0).toUpperCase() + words.slice(1);
}

// ---- ER7 ----

/** Control characters other than line breaks: never sent (0x0B and 0x1C would break the MLLP frame). */
// eslint-disable-next-line no-control-regex -- these are the characters being removed
const CONTROL = /[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]/g;

/** Text for a field or component: delimiters escaped, control characters removed, line breaks as spaces. */
export function txt(text: string): string {
  return escapeText(text.replace(CONTROL, ''));
}

/** Formatted text (FT, e.g. NTE-3): as txt, with line breaks kept as `\.br\`. */
export function ft(text: string): string {
  return text
    .replace(CONTROL, '')
    .split(/\r\n?|\n/)
    .map((line) => escapeText(line))
    .join('\\.br\\');
}

/** An ISO-8601 instant as an HL7 DTM in UTC: YYYYMMDDHHMMSS+0000. */
export function ts(iso: string): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return `${d.toISOString().replace(/[-:T]/g, '').slice(0, 14)}+0000`;
}

/** A FHIR dateTime as a DTM: a date or month as given (no time, no zone); with a time, as `ts` (UTC). */
export function dtm(dateTime: string): string {
  if (/^\d{4}(-\d{2}(-\d{2})?)?$/.test(dateTime)) return dateTime.replace(/-/g, '');
  return ts(dateTime);
}

/** Fields joined by `|`, trailing empty fields dropped. */
function segment(fields: string[]): string {
  const out = [...fields];
  while (out.length > 1 && out[out.length - 1] === '') out.pop();
  return out.join('|');
}
