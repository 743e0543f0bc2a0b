// HL7 v2 escape sequences (v2.5.1 chapter 2.7, "Use of escape sequences in text fields"). @medplum/core's
// Hl7Field.getComponent returns the raw text between the separators, escape sequences and all: a reader
// splits on the separators first (as Medplum does) and then decodes each piece with decodeHl7Text.

/** The delimiters of one message (MSH-1 and MSH-2), as @medplum/core's Hl7Context holds them. */
export interface Hl7Delimiters {
  readonly fieldSeparator: string;
  readonly componentSeparator: string;
  readonly repetitionSeparator: string;
  readonly escapeCharacter: string;
  readonly subcomponentSeparator: string;
}

/** The default delimiters `|^~\&`. */
export const DEFAULT_DELIMITERS: Hl7Delimiters = {
  fieldSeparator: '|',
  componentSeparator: '^',
  repetitionSeparator: '~',
  escapeCharacter: '\\',
  subcomponentSeparator: '&',
};

const HEX = /^X((?:[0-9A-Fa-f]{2})+)$/;
const CHARSET_SWITCH = /^(?:C[0-9A-Fa-f]{4}|M[0-9A-Fa-f]{4}(?:[0-9A-Fa-f]{2})?)$/;
const FORMATTING = /^\.(br|sp|fi|nf|in|ti|sk|ce)([+-]?\d{0,4})$/i;
const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Bytes of a `\Xhh..\` sequence as text: UTF-8 when they are valid UTF-8, otherwise one character per byte (ISO 8859-1). */
function hexText(hex: string): string {
  const bytes = Buffer.from(hex, 'hex');
  try {
    return utf8.decode(bytes);
  } catch {
    return bytes.toString('latin1');
  }
}

/** A formatting command of a formatted-text (FT) field as plain text: line breaks stay, layout hints go. */
function formatting(command: string, argument: string): string {
  const n = Math.min(Math.abs(Number.parseInt(argument || '1', 10) || 1), 100);
  switch (command.toLowerCase()) {
    case 'br':
      return '\n';
    case 'sp':
      return '\n'.repeat(n);
    case 'sk':
      return ' '.repeat(n);
    default:
      return '';
  }
}

/**
 * One escape sequence's content (between the escape characters) as text, or undefined when it is not one this
 * decoder knows (the caller then keeps it as sent). `\H\` and `\N\` (highlighting), character-set switches
 * (`\Cxxyy\`, `\Mxxyyzz\`) and locally defined `\Z..\` sequences carry no text and decode to nothing, as the
 * standard lets a receiver that does not use them do.
 */
function sequence(content: string, d: Hl7Delimiters): string | undefined {
  switch (content) {
    case 'F':
      return d.fieldSeparator;
    case 'S':
      return d.componentSeparator;
    case 'T':
      return d.subcomponentSeparator;
    case 'R':
      return d.repetitionSeparator;
    case 'E':
      return d.escapeCharacter;
    case 'P':
      return '#'; // the truncation character of v2.7 and later
    case 'H':
    case 'N':
      return '';
    default:
      break;
  }
  const hex = HEX.exec(content);
  if (hex) return hexText(hex[1]);
  const format = FORMATTING.exec(content);
  if (format) return formatting(format[1], format[2]);
  if (CHARSET_SWITCH.test(content) || /^Z[^\s]*$/.test(content)) return '';
  return undefined;
}

/**
 * The text of one HL7 v2 value (a component or subcomponent, already split on the separators) with its escape
 * sequences decoded: `\F\ \S\ \T\ \R\ \E\` to the delimiters, `\Xhh..\` to the characters those bytes are,
 * `\.br\` (and `\.sp\`) to line breaks. An escape character with no closing one, or a sequence this decoder does
 * not know, is kept as sent. Never throws; text without the escape character is returned as is (so a 20 MB
 * base64 document costs one scan).
 */
export function decodeHl7Text(raw: string, delimiters: Hl7Delimiters = DEFAULT_DELIMITERS): string {
  const esc = delimiters.escapeCharacter;
  if (esc.length !== 1 || raw.indexOf(esc) < 0) return raw;
  let out = '';
  let at = 0;
  for (;;) {
    const open = raw.indexOf(esc, at);
    if (open < 0) break;
    const close = raw.indexOf(esc, open + 1);
    if (close < 0) break;
    const decoded = sequence(raw.slice(open + 1, close), delimiters);
    if (decoded === undefined) {
      // Not a sequence: keep the escape character and look for the next one from the character after it.
      out += raw.slice(at, open + 1);
      at = open + 1;
    } else {
      out += raw.slice(at, open) + decoded;
      at = close + 1;
    }
  }
  return out + raw.slice(at);
}

/** Text made safe for an HL7 field: the delimiters escaped (the default ones), line breaks as spaces. */
export function escapeText(text: string): string {
  return text
    .replace(/\\/g, '\\E\\')
    .replace(/\|/g, '\\F\\')
    .replace(/\^/g, '\\S\\')
    .replace(/&/g, '\\T\\')
    .replace(/~/g, '\\R\\')
    .replace(/[\r\n]+/g, ' ');
}
