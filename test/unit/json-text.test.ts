import {
  jsonBytes,
  LONG_STRING_CHARS,
  type LongString,
  NotUtf8Error,
  parseBytes,
  parseSharing,
  parseStored,
  parseStoredBytes,
  scanJson,
  scanJsonBytes,
} from '../../src/json';
import { prng } from '../helpers/prng';

/**
 * The JSON tools that keep a body with megabytes of documents from being held twice: the parse that shares long
 * strings (with the text, or made from the bytes outside the heap) must give exactly what JSON.parse gives.
 */
describe('parsing bodies with long strings', () => {
  const long = (seed: number, n = LONG_STRING_CHARS + 10): string => {
    const rand = prng(seed);
    const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
    let s = '';
    while (s.length < n) s += alphabet[Math.floor(rand() * 64)];
    return s;
  };
  const sample = (): unknown => ({
    externalId: 'EHR-1',
    patient: { name: { family: 'Müller-Łukasiewicz 😀', given: ['Zoë'] } },
    documents: [
      { kind: 'pathology-report', data: long(1) },
      { kind: 'imaging-report', data: long(2, LONG_STRING_CHARS) },
      { kind: 'short', data: 'QUJD' },
    ],
    questions: ['x'.repeat(LONG_STRING_CHARS + 1), `escaped \\ and "quotes" ${'y'.repeat(LONG_STRING_CHARS)}`, `é${'z'.repeat(LONG_STRING_CHARS)}`],
    nested: [[long(3)]],
  });

  test('text and bytes: the same value as JSON.parse; only plain ASCII strings inside objects or arrays are shared', () => {
    const text = JSON.stringify(sample());
    const textLongs: LongString[] = [];
    expect(scanJson(text, 64, textLongs)).toBeUndefined();
    expect(textLongs.map((l) => l.path)).toEqual([
      ['documents', 0, 'data'],
      ['documents', 1, 'data'],
      ['questions', 0],
      ['nested', 0, 0],
    ]);
    expect(parseSharing(text, textLongs)).toEqual(JSON.parse(text));

    const bytes = Buffer.from(text);
    const byteLongs: LongString[] = [];
    expect(scanJsonBytes(bytes, 64, byteLongs)).toBeUndefined();
    // Byte offsets: the same strings, found after the multi-byte characters of the name.
    expect(byteLongs.map((l) => l.path)).toEqual(textLongs.map((l) => l.path));
    expect(byteLongs[0].start).toBeGreaterThan(textLongs[0].start);
    expect(parseBytes(bytes, byteLongs)).toEqual(JSON.parse(text));
    expect(parseStored(text)).toEqual(JSON.parse(text));
    expect(parseStoredBytes(bytes)).toEqual(JSON.parse(text));
  });

  test('bytes: a byte order mark is dropped only at the start; bytes that are not UTF-8 and raw control characters are refused', () => {
    const text = JSON.stringify({ a: long(4), b: 'after' });
    const withBom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(text)]);
    const longs: LongString[] = [];
    scanJsonBytes(withBom, 64, longs);
    expect(parseBytes(withBom, longs)).toEqual(JSON.parse(text));

    const bomInside = Buffer.from(`{"a":"${long(4)}","b":"\u{feff}x"}`);
    const l2: LongString[] = [];
    scanJsonBytes(bomInside, 64, l2);
    expect((parseBytes(bomInside, l2) as { b: string }).b).toBe('\u{feff}x');

    const bad = Buffer.from(`{"a":"${long(5)}","b":"xx"}`);
    bad[bad.length - 4] = 0xff; // inside "xx", after the long string
    const l3: LongString[] = [];
    scanJsonBytes(bad, 64, l3);
    expect(() => parseBytes(bad, l3)).toThrow(NotUtf8Error);

    const control = Buffer.from(`{"a":"${long(6)}\u0001"}`);
    const l4: LongString[] = [];
    scanJsonBytes(control, 64, l4);
    expect(l4).toHaveLength(1);
    expect(() => JSON.parse(control.toString())).toThrow(SyntaxError);
    expect(() => parseBytes(control, l4)).toThrow(SyntaxError);
  });

  test('depth and duplicate keys are found in bytes as in text; a __proto__ key is never set by path', () => {
    const deep = `{"q":${'['.repeat(70)}${']'.repeat(70)}}`;
    expect(scanJsonBytes(Buffer.from(deep), 64)).toMatchObject({ kind: 'depth' });
    expect(scanJsonBytes(Buffer.from('{"é":1,"\\u00e9":2}'), 64)).toEqual({ kind: 'duplicate', key: 'é', path: [] });
    const proto = `{"__proto__":{"polluted":"${long(7)}"}}`;
    const longs: LongString[] = [];
    scanJsonBytes(Buffer.from(proto), 64, longs);
    expect(longs).toEqual([]);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  test('jsonBytes writes what JSON.stringify writes, as UTF-8', () => {
    const value = sample();
    expect(jsonBytes(value).toString('utf8')).toBe(JSON.stringify(value));
  });
});
