import { expressionOf, illFormedStrings } from '../../src/api/json-body';
import { scanJson } from '../../src/json';

/** The checks the JSON body reader makes on the text before JSON.parse, and on the parsed value after. */
describe('scanJson: nesting depth and duplicate keys, before anything recursive sees the body', () => {
  const nested = (depth: number, open = '[', close = ']'): string => open.repeat(depth) + close.repeat(depth);

  test('accepts JSON up to the depth limit and names where it was exceeded', () => {
    expect(scanJson(nested(64), 64)).toBeUndefined();
    const deep = scanJson(`{"questions":${nested(65)}}`, 64);
    expect(deep).toEqual({ kind: 'depth', path: ['questions', ...Array<number>(63).fill(0)] });
    expect(expressionOf((deep as { path: Array<string | number> }).path)).toMatch(/^questions\[0\]\[0\]/);
    // Objects count as arrays do.
    const objects = `{"patient":${'{"a":'.repeat(70)}1${'}'.repeat(70)}}`;
    expect(scanJson(objects, 64)).toMatchObject({ kind: 'depth', path: ['patient', ...Array<string>(63).fill('a')] });
  });

  test('a depth of 100,000 is refused in one pass, without a stack overflow', () => {
    expect(scanJson(`{"questions":${nested(100_000)}}`, 64)).toMatchObject({ kind: 'depth' });
  });

  test('refuses an object that repeats a key, naming the key and where it is', () => {
    expect(scanJson('{"consent":{"patientAgreed":false,"patientAgreed":true}}', 64)).toEqual({ kind: 'duplicate', key: 'patientAgreed', path: ['consent'] });
    expect(scanJson('{"patient":{"identifiers":[{"system":"s","value":"1"},{"system":"s","value":"2","value":"3"}]}}', 64)).toEqual({
      kind: 'duplicate',
      key: 'value',
      path: ['patient', 'identifiers', 1],
    });
    // The same key in different objects, and a string value equal to a key, are fine.
    expect(scanJson('[{"a":1},{"a":2},{"b":"a","c":{"a":"a"}}]', 64)).toBeUndefined();
  });

  test('compares keys after decoding their escapes', () => {
    expect(scanJson('{"value":1,"\\u0076alue":2}', 64)).toEqual({ kind: 'duplicate', key: 'value', path: [] });
    expect(scanJson('{"a\\"b":1,"a\\u0022b":2}', 64)).toEqual({ kind: 'duplicate', key: 'a"b', path: [] });
    expect(scanJson('{"a\\\\":1,"a\\\\\\\\":2}', 64)).toBeUndefined(); // a\ and a\\ differ
  });

  test('brackets, braces, commas and quotes inside strings do not count', () => {
    expect(scanJson(`{"q":"${'[{'.repeat(1000)}\\"${',"k":'.repeat(10)}","k":"\\\\"}`, 8)).toBeUndefined();
  });

  test('text JSON.parse would refuse is reported as syntax, not as a limit', () => {
    expect(scanJson('{"a":"unterminated', 64)).toEqual({ kind: 'syntax' });
    expect(scanJson('{"a":[1}', 64)).toEqual({ kind: 'syntax' });
  });

  test('a 20 MB body that is mostly one base64 string is scanned fast', () => {
    const body = JSON.stringify({ externalId: 'x', documents: [{ kind: 'other', data: Buffer.alloc(15_000_000, 7).toString('base64') }] });
    const started = process.hrtime.bigint();
    expect(scanJson(body, 64)).toBeUndefined();
    // Generous bound: one native search over the string, where a character loop in JS takes far longer.
    expect(Number(process.hrtime.bigint() - started) / 1e6).toBeLessThan(200);
  });
});

describe('illFormedStrings: strings that are not well-formed Unicode, with their field path', () => {
  test('finds lone surrogates in values and keys, in document order', () => {
    const value = JSON.parse('{"patient":{"identifiers":[{"value":"MRN\\ud800"}],"name":{"given":["ok","\\udc00x"],"family":"R"}},"\\ud83d":1}') as unknown;
    expect(illFormedStrings(value, 20)).toEqual([
      { path: ['patient', 'identifiers', 0, 'value'], inKey: false },
      { path: ['patient', 'name', 'given', 1], inKey: false },
      { path: [], inKey: true },
    ]);
    expect(expressionOf(['patient', 'identifiers', 0, 'value'])).toBe('patient.identifiers[0].value');
  });

  test('a surrogate pair is well formed; a top-level string is checked too', () => {
    expect(illFormedStrings(JSON.parse('{"a":"\\ud83d\\ude00"}'), 20)).toEqual([]);
    expect(illFormedStrings('\ud800', 20)).toEqual([{ path: [], inKey: false }]);
  });

  test('stops at the cap', () => {
    expect(illFormedStrings(Array<string>(1000).fill('\ud800'), 20)).toHaveLength(20);
  });
});
