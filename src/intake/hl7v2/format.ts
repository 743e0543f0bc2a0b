import { Hl7Message, Hl7Segment } from '@medplum/core';
import type { OperationOutcome } from '@medplum/fhirtypes';
import { canonicalHash } from '../../json';
import { referralSchema } from '../../model';
import { type DetailedIssue, Failure, zodIssues } from '../../outcomes';
import type { IntakeFormat, IntakeReply, Refusal, Submission } from '../types';
import { escapeText } from './escape';
import { readV2Referral, type V2Reading } from './map';
import { v2Origin } from './origin';

/** The media types of HL7 v2 ER7 ("pipe and hat") messages over HTTP. */
export const HL7V2_CONTENT_TYPES = ['x-application/hl7-v2+er7', 'application/hl7-v2+er7'] as const;

/** The message types the gateway takes: the referral family, and 360X's order family. */
const SUPPORTED_TYPES = new Set(['REF^I12', 'REF^I13', 'REF^I14', 'OMG^O19']);
/** HL7 v2 versions whose REF/OMG structures the mapping reads (2.3 to 2.8). */
const SUPPORTED_VERSION = /^2\.(3|3\.1|4|5|5\.1|6|7|7\.1|8|8\.1|8\.2)$/;

/** HL7 table 0357 (message error condition codes) used in ERR-3. */
export const ERROR_CODES = {
  requiredFieldMissing: '101^Required field missing^HL70357',
  dataTypeError: '102^Data type error^HL70357',
  tableValueNotFound: '103^Table value not found^HL70357',
  unsupportedMessageType: '200^Unsupported message type^HL70357',
  unsupportedEvent: '201^Unsupported event code^HL70357',
  unsupportedVersion: '203^Unsupported version id^HL70357',
  unknownKey: '204^Unknown key identifier^HL70357',
  duplicateKey: '205^Duplicate key identifier^HL70357',
  internalError: '207^Application internal error^HL70357',
} as const;

/** A message read far enough to answer it: parsed, with its header fields, or why it could not be. */
export type V2Parse =
  | { ok: true; message: Hl7Message; type: string; controlId: string; sendingFacility: string; version: string }
  | { ok: false; message: Hl7Message | undefined; code: string; location: string; text: string };

/** The first component of a header field, trimmed. */
function headerValue(message: Hl7Message, field: number): string {
  return (message.header.getField(field)?.getComponent(1) ?? '').trim();
}

/**
 * Parses a message (segments separated by CR, or CRLF or LF from a file) and checks its header: MSH first, a
 * supported message type and version, a control id. Never throws.
 */
export function parseV2(text: string): V2Parse {
  const normalized = text
    .replace(/\r\n?|\n/g, '\r')
    .replace(/^\s+/, '')
    .replace(/\r+$/, '');
  if (!normalized.startsWith('MSH') || normalized.length < 8) {
    return { ok: false, message: undefined, code: ERROR_CODES.requiredFieldMissing, location: 'MSH', text: 'the message does not start with an MSH segment' };
  }
  let message: Hl7Message;
  try {
    message = Hl7Message.parse(normalized);
    message.header.getField(9);
  } catch {
    return { ok: false, message: undefined, code: ERROR_CODES.dataTypeError, location: 'MSH', text: 'the MSH segment cannot be read' };
  }
  const msh9 = message.header.getField(9);
  const type = `${(msh9?.getComponent(1) ?? '').trim()}^${(msh9?.getComponent(2) ?? '').trim()}`;
  const controlId = headerValue(message, 10);
  const version = headerValue(message, 12);
  const sendingFacility = headerValue(message, 4);
  if (!SUPPORTED_TYPES.has(type)) {
    const known = type.startsWith('REF^') || type.startsWith('OMG^');
    return {
      ok: false,
      message,
      code: known ? ERROR_CODES.unsupportedEvent : ERROR_CODES.unsupportedMessageType,
      location: 'MSH^1^9',
      text: `message type ${type.slice(0, 20)} is not taken here: send REF^I12, REF^I13, REF^I14 or OMG^O19`,
    };
  }
  if (!SUPPORTED_VERSION.test(version)) {
    return {
      ok: false,
      message,
      code: ERROR_CODES.unsupportedVersion,
      location: 'MSH^1^12',
      text: `version ${version.slice(0, 10) || '(none)'} is not taken here: send 2.3 to 2.8`,
    };
  }
  if (!controlId) {
    return { ok: false, message, code: ERROR_CODES.requiredFieldMissing, location: 'MSH^1^10', text: 'the message has no control id (MSH-10)' };
  }
  return { ok: true, message, type, controlId, sendingFacility, version };
}

/** The answer to a message: RRI^I12 for the referral family, ORG^O20 for an OMG^O19, a plain ACK otherwise. */
function responseType(message: Hl7Message | undefined): string {
  const msh9 = message?.header.getField(9);
  const type = `${msh9?.getComponent(1) ?? ''}^${msh9?.getComponent(2) ?? ''}`;
  if (type.startsWith('REF^I1')) return `RRI^${msh9?.getComponent(2)}^RRI_I12`;
  if (type === 'OMG^O19') return 'ORG^O20^ORG_O20';
  return 'ACK';
}

/** A stand-in header for a message whose own cannot be read, so the answer is still a well-formed ACK. */
const UNKNOWN_SENDER = Hl7Message.parse('MSH|^~\\&|||||||ACK|UNKNOWN|P|2.5.1');

export interface AckError {
  /** HL7 table 0357 code, e.g. ERROR_CODES.requiredFieldMissing. */
  code: string;
  /** Where: `PID^1^7` (segment, its repetition, field). */
  location: string;
  /** For a person reading the interface engine's log. */
  text: string;
}

/**
 * The acknowledgement of `message`: MSA with the code, its control id and `text` (MSA-3); one ERR segment per
 * error (at most 20).
 */
export function buildAck(message: Hl7Message | undefined, code: 'AA' | 'AE' | 'AR', errors: readonly AckError[] = [], text?: string): string {
  const source = message ?? UNKNOWN_SENDER;
  const ack = source.buildAck({ ackCode: code });
  if (text !== undefined) {
    ack
      .getSegment('MSA')
      ?.getField(3)
      .setComponent(1, escapeText(text.slice(0, 200)));
  }
  const msh = ack.header;
  msh.getField(9).setComponent(1, responseType(message).split('^')[0]);
  const [, event, structure] = responseType(message).split('^');
  msh.getField(9).setComponent(2, event ?? '');
  msh.getField(9).setComponent(3, structure ?? '');
  const segments = [msh.toString(), ...ack.segments.slice(1).map((s) => s.toString())];
  for (const e of errors.slice(0, 20)) {
    // ERR-2 location, ERR-3 error code, ERR-4 severity, ERR-8 user message (escaped: the text is ours, never the sender's bytes).
    segments.push(new Hl7Segment(['ERR', '', e.location, e.code, 'E', '', '', '', escapeText(e.text.slice(0, 200))]).toString());
  }
  return segments.join('\r');
}

/** A v2 submission: the generic Submission plus the parsed message and what the mapping read from it. */
export interface V2Submission extends Submission {
  readonly message: Hl7Message;
  readonly reading: V2Reading;
}

/** Issues located in the message (`PID^1^7`), their text saying both the v2 and the referral location. */
function locatedIssues(issues: readonly DetailedIssue[], reading: V2Reading): DetailedIssue[] {
  return issues.map((i) => {
    const where = reading.locate(i.expression);
    return { ...i, expression: where, message: `${where} (${i.expression}): ${i.detail}` };
  });
}

/** The submission in a parsed message (a REF^I12 or OMG^O19 new referral). */
export function v2Submission(parsed: Extract<V2Parse, { ok: true }>, reading: V2Reading = readV2Referral(parsed.message)): V2Submission {
  return {
    format: 'hl7v2',
    message: parsed.message,
    reading,
    externalId: reading.externalId,
    // A resend of the same message (same sender, same control id) is answered as the original.
    idempotencyKey: `hl7v2:${parsed.sendingFacility}:${parsed.controlId}`.slice(0, 255),
    // The referral read from the message, not its bytes: a resend with a new control id or timestamp but the same
    // content is the same referral.
    requestHash: (pause) => canonicalHash(reading.referral, pause),
    read() {
      // What only the reader sees (a document it could not decode, an order control it does not know) comes first:
      // the referral would not be what was sent.
      const errors = reading.issues.filter((i) => i.severity === 'error');
      if (errors.length > 0) return { ok: false, issues: errors.map(({ code, message, expression }) => ({ code, message, expression })) };
      const parsedReferral = referralSchema.safeParse(reading.referral);
      if (parsedReferral.success) return { ok: true, referral: parsedReferral.data };
      return { ok: false, issues: locatedIssues(zodIssues(parsedReferral.error), reading) };
    },
    locate: (modelPath) => reading.locate(modelPath),
    // Who sent it, so its status changes can go back (when its client has a return channel: HL7_RETURN_CHANNELS).
    origin: v2Origin(parsed.message, parsed.type),
  };
}

/** The ERR segments of a refusal: one per OperationOutcome issue, at its location (the message's MSH when it has none). */
export function errorsOf(outcome: OperationOutcome, status: number): AckError[] {
  const code = (issueCode: string | undefined): string => {
    if (status === 409) return ERROR_CODES.duplicateKey;
    if (status === 404) return ERROR_CODES.unknownKey;
    if (status >= 500) return ERROR_CODES.internalError;
    if (issueCode === 'required') return ERROR_CODES.requiredFieldMissing;
    if (issueCode === 'code-invalid') return ERROR_CODES.tableValueNotFound;
    return ERROR_CODES.dataTypeError;
  };
  return (outcome.issue ?? []).map((i) => ({
    code: code(i.code),
    location: /^[A-Z][A-Z0-9]{2}(\^\d+){0,5}$/.test(i.expression?.[0] ?? '') ? (i.expression?.[0] as string) : 'MSH^1^9',
    text: i.diagnostics ?? i.details?.text ?? 'the message was refused',
  }));
}

/** The HTTP side of an acknowledgement: 200 with the ACK, except a refusal for load or outage keeps its 5xx and Retry-After. */
export function ackReply(ack: string, refusal?: Refusal): IntakeReply {
  const keep = refusal !== undefined && refusal.status >= 500;
  return { status: keep ? refusal.status : 200, headers: keep ? refusal.headers : {}, contentType: HL7V2_CONTENT_TYPES[0], body: ack };
}

/**
 * HL7 v2 ER7 through POST /referrals (and POST /hl7/v2, which also takes cancels and added documents): a REF^I12
 * or OMG^O19 new referral. Refusals are AE (content) or AR (type, version, load) acknowledgements with ERR segments
 * naming the segment and field.
 */
export const hl7v2Format: IntakeFormat<string> = {
  name: 'hl7v2',
  contentTypes: HL7V2_CONTENT_TYPES,
  submission(body: string): Submission {
    const parsed = parseV2(typeof body === 'string' ? body : '');
    if (!parsed.ok) throw new V2Refusal(parsed);
    return v2Submission(parsed);
  },
  accepted: ({ id, created }, submission) =>
    ackReply(buildAck((submission as V2Submission).message, 'AA', [], `${created ? 'accepted' : 'already accepted'} as ${id}`)),
  refused: (refusal, submission) => {
    const message = (submission as V2Submission | undefined)?.message ?? (refusal.cause instanceof V2Refusal ? refusal.cause.parsed.message : undefined);
    const code = refusal.status === 415 || refusal.status >= 500 ? 'AR' : 'AE';
    return ackReply(buildAck(message, code, errorsOf(refusal.outcome, refusal.status)), refusal);
  },
};

/**
 * A message refused before it is a submission: a header that cannot be read (400, answered AE) or a type or version
 * not taken (415, answered AR). The refusal carries the message, so the ACK answers its MSH.
 */
export class V2Refusal extends Failure {
  constructor(readonly parsed: Extract<V2Parse, { ok: false }>) {
    super(parsed.location === 'MSH' ? 'malformed' : 'unsupported', {
      code: parsed.location === 'MSH' ? 'structure' : 'not-supported',
      message: parsed.text,
      expression: parsed.location,
    });
  }
}
