import { isAscii } from 'node:buffer';

// JSON text tools for bodies and stored payloads that carry megabytes of base64 documents: one iterative scan
// (depth, duplicate keys, where the long strings are), a parse that shares those strings with the text instead
// of copying them, and a serializer to UTF-8 bytes that copies them once. Pure; no I/O.

/** A body at least this long is scanned for long strings (and the event loop gets turns between its steps). */
export const LARGE_BODY_CHARS = 256 * 1024;

/** A string value at least this long is not copied by the parse: the parsed value holds a slice of the body's text. */
export const LONG_STRING_CHARS = 64 * 1024;

export type PathSegment = string | number;

/** A string value of LONG_STRING_CHARS or more, with no escapes or control characters: its quotes' offsets and its path. */
export interface LongString {
  start: number;
  end: number;
  path: PathSegment[];
}

export type ScanProblem = { kind: 'depth'; path: PathSegment[] } | { kind: 'duplicate'; key: string; path: PathSegment[] } | { kind: 'syntax' };

interface ScanFrame {
  /** An object (keys seen so far) or an array (undefined). */
  keys: Set<string> | undefined;
  /** Object: the last key read. */
  key: string;
  /** Array: the index of the element being read. */
  index: number;
  /** Object: the next string is a key. */
  expectKey: boolean;
}

function framePath(frames: ReadonlyArray<ScanFrame>, upTo = frames.length): PathSegment[] {
  const out: PathSegment[] = [];
  for (let i = 0; i < upTo; i++) {
    const f = frames[i];
    out.push(f.keys ? f.key : f.index);
  }
  return out;
}

/** Index of the quote that closes the string opening at `start`, or -1. Skips the string's body with indexOf. */
/**
 * What the scan reads: JSON text, or its UTF-8 bytes. Every character JSON's structure is made of is ASCII, and
 * no byte of a multi-byte UTF-8 sequence is, so the scan finds the same places in either.
 */
interface ScanSource {
  readonly length: number;
  /** The code unit (text) or byte (bytes) at `i`. */
  at(i: number): number;
  /** The index of the next `"` at or after `from`, or -1. */
  quote(from: number): number;
  /** The text of [start, end). */
  text(start: number, end: number): string;
  /** Whether [start, end) is ASCII without backslashes or control characters: its JSON value is its text as it is. */
  plain(start: number, end: number): boolean;
}

/** Characters that make a JSON string's text differ from its value (escapes), or make it invalid (controls). */
// eslint-disable-next-line no-control-regex -- intended: JSON forbids raw U+0000–U+001F in strings, so they make a string not plain
const NOT_PLAIN = /[\\\u0000-\u001f\u0080-\uffff]/;

function textSource(text: string): ScanSource {
  return {
    length: text.length,
    at: (i) => text.charCodeAt(i),
    quote: (from) => text.indexOf('"', from),
    text: (start, end) => text.slice(start, end),
    plain: (start, end) => !NOT_PLAIN.test(text.slice(start, end)),
  };
}

const lenientUtf8 = new TextDecoder('utf-8');

function bytesSource(bytes: Uint8Array): ScanSource {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    length: buf.length,
    at: (i) => buf[i],
    quote: (from) => buf.indexOf(0x22, from),
    // Keys only; bytes that are not UTF-8 are refused when the rest of the body is decoded.
    text: (start, end) => lenientUtf8.decode(buf.subarray(start, end)),
    // Control characters are looked for in the string parseBytes makes (it refuses them, as JSON.parse would).
    plain: (start, end) => isAscii(buf.subarray(start, end)) && !buf.subarray(start, end).includes(0x5c),
  };
}

/** Index of the quote that closes the string opening at `start`, or -1. Skips the string's body with indexOf. */
function stringEnd(src: ScanSource, start: number): number {
  let from = start + 1;
  for (;;) {
    const q = src.quote(from);
    if (q < 0) return -1;
    // Escaped when preceded by an odd number of backslashes.
    let b = q - 1;
    while (b > start && src.at(b) === 0x5c) b--;
    if ((q - 1 - b) % 2 === 0) return q;
    from = q + 1;
  }
}

/**
 * One pass over JSON text, without recursion, that finds the first place nesting goes deeper than `maxDepth`
 * or an object repeats a key (keys compared after their escapes are decoded). String bodies are skipped with
 * indexOf, so a 20 MB base64 string costs one native search. Syntax errors it notices are reported as
 * `syntax` (JSON.parse would refuse the text); it does not validate everything JSON.parse does. With `longs`,
 * it also lists the long plain string values (not keys) inside an object or array, for parseSharing.
 */
export function scanJson(text: string, maxDepth: number, longs?: LongString[]): ScanProblem | undefined {
  return scan(textSource(text), maxDepth, longs);
}

/** scanJson over UTF-8 bytes: the offsets in `longs` are byte offsets (for parseBytes). */
export function scanJsonBytes(bytes: Uint8Array, maxDepth: number, longs?: LongString[]): ScanProblem | undefined {
  return scan(bytesSource(bytes), maxDepth, longs);
}

function scan(src: ScanSource, maxDepth: number, longs?: LongString[]): ScanProblem | undefined {
  const frames: ScanFrame[] = [];
  const n = src.length;
  let i = 0;
  while (i < n) {
    const c = src.at(i);
    if (c === 0x22) {
      const end = stringEnd(src, i);
      if (end < 0) return { kind: 'syntax' };
      const top = frames.length > 0 ? frames[frames.length - 1] : undefined;
      if (top?.keys && top.expectKey) {
        let key = src.text(i + 1, end);
        if (key.includes('\\')) {
          try {
            key = JSON.parse(`"${key}"`) as string;
          } catch {
            return { kind: 'syntax' };
          }
        }
        if (top.keys.has(key)) return { kind: 'duplicate', key, path: framePath(frames, frames.length - 1) };
        top.keys.add(key);
        top.key = key;
        top.expectKey = false;
      } else if (longs && top && end - i - 1 >= LONG_STRING_CHARS) {
        const path = framePath(frames);
        if (!path.includes('__proto__') && src.plain(i + 1, end)) longs.push({ start: i, end, path });
      }
      i = end + 1;
      continue;
    }
    if (c === 0x7b || c === 0x5b) {
      if (frames.length >= maxDepth) return { kind: 'depth', path: framePath(frames) };
      frames.push(c === 0x7b ? { keys: new Set(), key: '', index: 0, expectKey: true } : { keys: undefined, key: '', index: 0, expectKey: false });
    } else if (c === 0x7d || c === 0x5d) {
      const top = frames.pop();
      if (top === undefined || (c === 0x7d) !== (top.keys !== undefined)) return { kind: 'syntax' };
    } else if (c === 0x2c) {
      const top = frames.length > 0 ? frames[frames.length - 1] : undefined;
      if (top === undefined) return { kind: 'syntax' };
      if (top.keys) top.expectKey = true;
      else top.index++;
    }
    i++;
  }
  return undefined;
}

/** Sets each long string, made by `make`, at its path in `value` (parsed with null in its place). */
function putLongs(value: unknown, longs: ReadonlyArray<LongString>, make: (l: LongString) => string): unknown {
  for (const l of longs) {
    let parent = value as Record<PathSegment, unknown>;
    for (let i = 0; i < l.path.length - 1; i++) parent = parent[l.path[i]] as Record<PathSegment, unknown>;
    parent[l.path[l.path.length - 1]] = make(l);
  }
  return value;
}

/**
 * JSON.parse of text that carries documents (megabytes of base64 in a few string values) without the copy
 * JSON.parse would make of each: the text is parsed with those values left out (null stands in), and each is
 * then set to a slice of the text, which V8 keeps as a view of it, not a copy. Only strings with no escapes, no
 * control characters and nothing but ASCII are taken out (scanJson's `longs`), so each slice is exactly what
 * JSON.parse would give.
 */
export function parseSharing(text: string, longs: ReadonlyArray<LongString>): unknown {
  const pieces: string[] = [];
  let from = 0;
  for (const l of longs) {
    pieces.push(text.slice(from, l.start), 'null');
    from = l.end + 1;
  }
  pieces.push(text.slice(from));
  return putLongs(JSON.parse(pieces.join('')), longs, (l) => text.slice(l.start + 1, l.end));
}

// eslint-disable-next-line no-control-regex -- intended: JSON forbids raw U+0000–U+001F in strings, this finds them
const CONTROL = /[\u0000-\u001f]/;
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
/** For the pieces after the first: a byte order mark there is content, not a mark to drop. */
const strictUtf8KeepBom = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** The bytes are not UTF-8 (parseBytes). */
export class NotUtf8Error extends Error {}

/**
 * JSON.parse of a body's UTF-8 bytes whose long strings were found by scanJsonBytes, without ever making a
 * string of the whole: the rest is decoded (and checked as UTF-8) and parsed with null in their place, and each
 * long string is made from its bytes as a Latin-1 string, which for more than about 1 MB Node keeps outside
 * the JavaScript heap. Memory outside the heap is counted by the garbage collector as it grows, so what a
 * finished request leaves behind is collected soon, instead of piling up in the heap until its next full
 * collection (measured: ~270 MB of dead request text under 20 concurrent 20 MB uploads). Throws NotUtf8Error
 * for bytes that are not UTF-8, and JSON.parse's SyntaxError.
 */
export function parseBytes(bytes: Uint8Array, longs: ReadonlyArray<LongString>): unknown {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const pieces: string[] = [];
  let from = 0;
  try {
    for (const l of longs) {
      pieces.push((from === 0 ? strictUtf8 : strictUtf8KeepBom).decode(buf.subarray(from, l.start)), 'null');
      from = l.end + 1;
    }
    pieces.push((from === 0 ? strictUtf8 : strictUtf8KeepBom).decode(buf.subarray(from)));
  } catch {
    throw new NotUtf8Error('the body is not valid UTF-8');
  }
  return putLongs(JSON.parse(pieces.join('')), longs, (l) => {
    const s = buf.toString('latin1', l.start + 1, l.end);
    if (CONTROL.test(s)) throw new SyntaxError('a string holds a control character');
    return s;
  });
}

/**
 * JSON.parse of trusted JSON text (what this service wrote: a stored payload) sharing its long strings with the
 * text, as parseSharing does for a checked body. The nesting was bounded when it was accepted.
 */
export function parseStored(text: string): unknown {
  if (text.length < LARGE_BODY_CHARS) return JSON.parse(text);
  const longs: LongString[] = [];
  if (scanJson(text, Number.MAX_SAFE_INTEGER, longs) !== undefined || longs.length === 0) return JSON.parse(text);
  return parseSharing(text, longs);
}

/** parseStored for the stored text's UTF-8 bytes (SQLite hands a BLOB over as bytes outside the heap). */
export function parseStoredBytes(bytes: Uint8Array): unknown {
  if (bytes.length >= LARGE_BODY_CHARS) {
    const longs: LongString[] = [];
    if (scanJsonBytes(bytes, Number.MAX_SAFE_INTEGER, longs) === undefined && longs.length > 0) return parseBytes(bytes, longs);
  }
  return JSON.parse(strictUtf8.decode(bytes));
}
