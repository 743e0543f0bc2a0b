import { Hl7Message, type Hl7Segment } from '@medplum/core';
import { decodeHl7Text } from '../intake';

/** What a receiver's acknowledgement means for the message it answers. */
export type AckVerdict =
  /** AA or CA: taken. */
  | { kind: 'accepted'; code: string }
  /** AE or CE: the receiver found an error in the message; sending it again will not help (dead letter). */
  | { kind: 'error'; code: string; reason: string }
  /** AR or CR, or an answer that is no acknowledgement of this message: try again later. */
  | { kind: 'retry'; code?: string; reason: string };

/**
 * Text of a component (1-based) or of one of its subcomponents (0-based, as @medplum/core counts them), decoded
 * (default delimiters: the receiver answers a message we wrote with them).
 */
function text(segment: Hl7Segment | undefined, field: number, component = 1, subcomponent?: number): string {
  try {
    return decodeHl7Text(segment?.getComponent(field, component, subcomponent) ?? '').trim();
  } catch {
    return '';
  }
}

/** A whole field as sent (an ERL location such as `PID^1^3`). */
function fieldText(segment: Hl7Segment, field: number): string {
  try {
    return decodeHl7Text(segment.getField(field)?.toString() ?? '').trim();
  } catch {
    return '';
  }
}

/** What the ERR segments (and MSA-3) say, for the dead letter: ERR-8 user message, else ERR-3's text, else v2.3's ERR-1. */
function errorText(message: Hl7Message, msa: Hl7Segment): string {
  const parts: string[] = [];
  for (const err of message.getAllSegments('ERR').slice(0, 5)) {
    const where = fieldText(err, 2);
    const what = text(err, 8) || text(err, 3, 2) || text(err, 3, 1) || text(err, 1, 4, 1) || text(err, 1, 4, 0);
    if (what || where) parts.push(where ? `${where}: ${what}` : what);
  }
  const msa3 = text(msa, 3);
  if (msa3) parts.push(msa3);
  return parts.join('; ') || 'no error text';
}

/**
 * Reads the answer to the message with control id `controlId`: MSA-1 AA or CA accepted, AE or CE an error (with the
 * ERR text), AR or CR a rejection to retry; an answer that cannot be read, has no MSA or acknowledges another
 * message is retried too. Never throws.
 */
export function readAck(reply: Buffer, controlId: string): AckVerdict {
  const raw = reply
    .toString('utf8')
    .replace(/\r\n?|\n/g, '\r')
    .replace(/^\s+/, '');
  if (!raw.startsWith('MSH')) return { kind: 'retry', reason: 'the answer is not an HL7 v2 message' };
  let message: Hl7Message;
  let msa: Hl7Segment | undefined;
  try {
    message = Hl7Message.parse(raw);
    msa = message.getSegment('MSA');
  } catch {
    return { kind: 'retry', reason: 'the answer cannot be read as HL7 v2' };
  }
  if (!msa) return { kind: 'retry', reason: 'the answer has no MSA segment' };
  const code = text(msa, 1).toUpperCase();
  const acknowledged = text(msa, 2);
  if (acknowledged !== controlId) {
    return { kind: 'retry', code, reason: `the answer acknowledges control id ${acknowledged.slice(0, 40) || '(none)'}, not ${controlId}` };
  }
  switch (code) {
    case 'AA':
    case 'CA':
      return { kind: 'accepted', code };
    case 'AE':
    case 'CE':
      return { kind: 'error', code, reason: `${code}: ${errorText(message, msa)}`.slice(0, 500) };
    case 'AR':
    case 'CR':
      return { kind: 'retry', code, reason: `${code}: ${errorText(message, msa)}`.slice(0, 500) };
    default:
      return { kind: 'retry', reason: `the answer's MSA-1 is ${code.slice(0, 10) || 'empty'}, not an acknowledgement code` };
  }
}
