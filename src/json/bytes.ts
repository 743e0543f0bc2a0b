import { randomUUID } from 'node:crypto';
import { LONG_STRING_CHARS } from './scan';

/** Text that JSON writes as it is, one byte per character: printable ASCII without quotes or backslashes (base64). */
export const JSON_PLAIN_ASCII = /^[\x20\x21\x23-\x5b\x5d-\x7e]*$/;

/**
 * The UTF-8 bytes of `JSON.stringify(value)`, built without a JavaScript string of the whole. Long base64
 * strings (a document's inline data: megabytes) are copied into one Buffer between the pieces of the rest,
 * which is stringified with a placeholder in their place; printable ASCII without quotes or backslashes (base64)
 * needs no JSON escaping, so the copy is a memcpy. Storing a 20 MB referral then holds its text once, outside the JavaScript heap (freed
 * with the Buffer), instead of as a 20 MB heap string that lingers until the next full GC, and takes
 * milliseconds instead of a JSON.stringify of 20 MB (about 140-400 ms on the event loop).
 */
export function jsonBytes(value: unknown): Buffer {
  const skeleton = jsonSkeleton(value);
  const parts = skeleton.parts;
  if (skeleton.longs.some((l) => typeof l !== 'string')) throw new TypeError('a StreamedString can only be written to a stream');
  const longs = skeleton.longs as string[];
  if (longs.length === 0) return Buffer.from(parts[0], 'utf8');
  let total = 0;
  for (let i = 0; i < parts.length; i++) total += i % 2 === 0 ? Buffer.byteLength(parts[i], 'utf8') : longs[Number(parts[i])].length + 2;
  const out = Buffer.allocUnsafe(total);
  let at = 0;
  for (let i = 0; i < parts.length; i++) {
    if (i % 2 === 0) {
      at += out.write(parts[i], at, 'utf8');
    } else {
      out[at++] = 0x22; // the quotes around the string
      at += out.write(longs[Number(parts[i])], at, 'latin1');
      out[at++] = 0x22;
    }
  }
  if (at !== total) throw new Error(`jsonBytes wrote ${at} of ${total} bytes`);
  return out;
}

/**
 * A JSON string value that is not in memory: `length` characters of plain ASCII that JSON writes as they are (no
 * quotes, backslashes or controls: base64), produced on demand by `chunks()` (e.g. a document's base64 encoded from
 * the blob store as the request is sent). It stands in a value where a string would be (a Binary's `data`); only a
 * writer that streams (jsonSkeleton's callers that send a request) can write it out, once per call of `chunks()`.
 */
export class StreamedString {
  constructor(
    /** Characters (= bytes) the string has; the writer may rely on it (a Content-Length). */
    readonly length: number,
    /** A fresh iteration of the string's bytes, from the start, each time it is called. */
    readonly chunks: () => AsyncIterable<Uint8Array>
  ) {}
}

/**
 * `JSON.stringify(value)` as pieces with its long plain-ASCII strings (base64 document data, LONG_STRING_CHARS or
 * more) left out: `parts` alternates JSON text and the index in `longs` of the string that stands between two
 * texts (quotes not included). Whoever writes the JSON out (a Buffer, a request stream) copies each long string
 * as it is: it needs no escaping. With no long string, `parts` is the whole text. A StreamedString is left out in
 * the same way, whatever its length (only a streaming writer can write it).
 */
export function jsonSkeleton(value: unknown): { parts: string[]; longs: Array<string | StreamedString> } {
  const longs: Array<string | StreamedString> = [];
  const nonce = randomUUID();
  const text = JSON.stringify(value, (_key, v: unknown) => {
    if (v instanceof StreamedString || (typeof v === 'string' && v.length >= LONG_STRING_CHARS && JSON_PLAIN_ASCII.test(v))) {
      longs.push(v);
      return `\u0000${nonce}:${longs.length - 1}`;
    }
    return v;
  });
  if (text === undefined) throw new TypeError('the value has no JSON text');
  if (longs.length === 0) return { parts: [text], longs };
  // JSON.stringify wrote each placeholder's NUL as the six characters \u0000; the random nonce makes it unique.
  return { parts: text.split(new RegExp(`"\\\\u0000${nonce}:(\\d+)"`)), longs };
}

/**
 * Gives a large Buffer's memory back now instead of at a later garbage collection, by detaching its
 * ArrayBuffer; only a Buffer that is the whole of its own ArrayBuffer (not a slice of Node's pool) is detached.
 */
export function freeNow(buf: Uint8Array): void {
  const ab = buf.buffer as ArrayBuffer & { transfer?: (length?: number) => ArrayBuffer; detached?: boolean };
  if (buf.byteLength >= LONG_STRING_CHARS && buf.byteOffset === 0 && buf.byteLength === ab.byteLength && typeof ab.transfer === 'function' && !ab.detached) {
    ab.transfer(0);
  }
}
