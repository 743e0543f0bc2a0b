import { brotliCompressSync, deflateSync, gzipSync } from 'node:zlib';
import type { Gateway } from '../../src/gateway';
import { fixture, KEY_A, startGateway } from '../helpers/gateway';
import { prng } from '../helpers/prng';

/**
 * Seeded fuzz of the intake (issue 10): the sample referral nested, repeated and mutated into BODIES request
 * bodies (deep nesting in any field, huge arrays, wrong types, Unicode oddities with lone surrogates and
 * invalid UTF-8, duplicate keys in the raw text, numbers such as 1e309, `__proto__` and `constructor` keys,
 * very long strings, truncated JSON, gzip, deflate and br encodings, corrupt ones), a few of them sent to the
 * documents and cancel endpoints. Against the real service, every answer must be a 2xx, or a 4xx whose body
 * is an OperationOutcome with at least one issue: never a 5xx, never a dropped connection. The service must
 * still be live afterwards and no prototype polluted.
 *
 * FUZZ_SEED=<n> replays a run (every failure message carries the seed); FUZZ_BODIES=<n> changes the count;
 * FUZZ_VERBOSE=1 prints every failing body's description.
 */
const SEED = Number(process.env.FUZZ_SEED ?? 20261202);
const BODIES = Number(process.env.FUZZ_BODIES ?? 2000);
const CONCURRENCY = 8;

// ---- a JSON tree that can say what JSON.stringify cannot ----

/** JSON text put into the body as it is (deep nesting, number literals JSON.parse turns into Infinity...). */
class Raw {
  constructor(readonly text: string) {}
}
/** An object as ordered pairs: a key may appear twice, and `__proto__` is a key like any other. */
class Pairs {
  constructor(readonly pairs: Array<[string, Tree]>) {}
}
type Tree = null | boolean | number | string | Raw | Pairs | Tree[] | { [k: string]: Tree };

function serialise(v: Tree): string {
  if (v instanceof Raw) return v.text;
  if (v instanceof Pairs) return `{${v.pairs.map(([k, x]) => `${JSON.stringify(k)}:${serialise(x)}`).join(',')}}`;
  if (Array.isArray(v)) return `[${v.map(serialise).join(',')}]`;
  if (v !== null && typeof v === 'object') {
    return `{${Object.keys(v)
      .map((k) => `${JSON.stringify(k)}:${serialise(v[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

const isObject = (v: Tree | undefined): v is { [k: string]: Tree } =>
  v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Raw) && !(v instanceof Pairs);

/** Every path in the tree, containers included (the root is `[]`); Raw and Pairs are leaves. */
function treePaths(v: Tree, path: Array<string | number> = []): Array<Array<string | number>> {
  if (Array.isArray(v)) return [path, ...v.flatMap((x, i) => treePaths(x, [...path, i]))];
  if (isObject(v)) return [path, ...Object.keys(v).flatMap((k) => treePaths(v[k], [...path, k]))];
  return [path];
}

const childAt = (cur: Tree | undefined, k: string | number): Tree | undefined => {
  if (Array.isArray(cur)) return cur[Number(k)];
  return isObject(cur) ? cur[k as string] : undefined;
};

const getAt = (tree: Tree, path: ReadonlyArray<string | number>): Tree | undefined => path.reduce<Tree | undefined>(childAt, tree);

/** `tree` with `f` applied to the value at `path`, copying only the containers along it (undefined removes the value). */
function update(tree: Tree, path: ReadonlyArray<string | number>, f: (old: Tree | undefined) => Tree | undefined): Tree {
  if (path.length === 0) return f(tree) ?? null;
  const [head, ...rest] = path;
  if (Array.isArray(tree)) {
    const copy = [...tree];
    const i = Number(head);
    const value = rest.length === 0 ? f(copy[i]) : update(copy[i] ?? null, rest, f);
    if (value === undefined) copy.splice(i, 1);
    else copy[i] = value;
    return copy;
  }
  if (isObject(tree)) {
    const copy = { ...tree };
    const value = rest.length === 0 ? f(copy[head as string]) : update(copy[head as string] ?? null, rest, f);
    if (value === undefined) Reflect.deleteProperty(copy, head as string);
    else copy[head as string] = value;
    return copy;
  }
  return tree; // the path runs through something that is no longer a container: leave it
}

// ---- mutations ----

type Rand = () => number;
const pick = <T>(r: Rand, xs: ReadonlyArray<T>): T => xs[Math.floor(r() * xs.length)];
const int = (r: Rand, lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1));

function nested(r: Rand, depth: number): string {
  switch (pick(r, ['array', 'object', 'mixed'] as const)) {
    case 'array':
      return `${'['.repeat(depth)}${']'.repeat(depth)}`;
    case 'object':
      return `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`;
    default:
      return `${'[{"x":'.repeat(depth)}null${'}]'.repeat(depth)}`;
  }
}

const ODD_STRINGS = [
  '\ud800', // lone high surrogate
  '\udfff', // lone low surrogate
  'MRN-\udc00\ud800', // a pair the wrong way round
  '\ufeffBOM',
  'a\u0000b',
  '\u202eevil\u202c', // right-to-left override
  'zero\u200bwidth',
  '\uffff\ufffe',
  '\ud83d\ude00 emoji',
  `e${'\u0301'.repeat(500)}`, // combining marks
  '\u0085\u2028\u2029',
  '../../etc/passwd',
  '<script>alert(1)</script>',
  "'; drop table referrals; --",
  '%00%ff%d8',
  'ｆｕｌｌ ｗｉｄｔｈ',
];

const WRONG_TYPES: Tree[] = [null, 0, -1.5, true, false, '', ' ', {}, [], [[]], { a: 1 }, [null], 'x'.repeat(10)];
const NUMBERS = ['1e309', '-1e309', '1e-400', '123456789012345678901234567890', '-0', '0.0000001', '1E+2', '9007199254740993', '0e0', '-1', '1.5'];
const PROTO_KEYS = ['__proto__', 'constructor', 'prototype', 'hasOwnProperty', 'toString', '__defineGetter__'];

interface Case {
  what: string;
  text: string;
  /** Bytes to send instead of the UTF-8 of `text` (invalid UTF-8, truncated gzip...). */
  bytes?: Buffer;
  encoding?: string;
  endpoint: 'referrals' | 'documents' | 'cancel';
}

function containers(tree: Tree, kind: 'object' | 'array'): Array<Array<string | number>> {
  return treePaths(tree).filter((p) => {
    const v = getAt(tree, p);
    return kind === 'array' ? Array.isArray(v) : isObject(v);
  });
}

/** One mutation of the tree, at a random place; returns the new tree and what was done. */
function mutate(r: Rand, tree: Tree, sample: Tree): [Tree, string] {
  const paths = treePaths(tree);
  const path = pick(r, paths.length > 1 ? paths.slice(1) : paths);
  const at = path.join('.') || '$';
  const kind = pick(r, [
    'nest',
    'nest',
    'nest',
    'array',
    'type',
    'type',
    'unicode',
    'unicode',
    'dup',
    'number',
    'proto',
    'long',
    'repeat',
    'remove',
    'self',
  ] as const);
  switch (kind) {
    case 'nest': {
      const depth = pick(r, [63, 64, 65, 100, 1000, 5000, 20_000]);
      return [update(tree, path, () => new Raw(nested(r, depth))), `nesting ${depth} deep at ${at}`];
    }
    case 'array': {
      const n = pick(r, [1000, 10_000, 100_000]);
      const element = pick(r, ['0', '"x"', 'null', '{}', '[]', '"MRN-1"']);
      return [update(tree, path, () => new Raw(`[${Array(n).fill(element).join(',')}]`)), `array of ${n} × ${element} at ${at}`];
    }
    case 'type': {
      const v = pick(r, WRONG_TYPES);
      return [update(tree, path, () => v), `${JSON.stringify(v)} at ${at}`];
    }
    case 'unicode': {
      // Into a string the sample has (identifier values and systems, names, codes...), or in place of any value.
      const strings = paths.filter((p) => typeof getAt(tree, p) === 'string');
      const where = strings.length > 0 && r() < 0.8 ? pick(r, strings) : path;
      const odd = pick(r, ODD_STRINGS);
      return [
        update(tree, where, (old) => (typeof old === 'string' && r() < 0.6 ? `${old.slice(0, 2)}${odd}${old.slice(2)}` : odd)),
        `odd string ${JSON.stringify(odd).slice(0, 30)} at ${where.join('.')}`,
      ];
    }
    case 'dup': {
      const objects = containers(tree, 'object');
      if (objects.length === 0) return [tree, 'no object left to add a key to'];
      const target = pick(r, objects);
      const obj = getAt(tree, target) as { [k: string]: Tree };
      const keys = Object.keys(obj);
      if (keys.length === 0) return [tree, 'nothing'];
      const key = pick(r, keys);
      let second: Tree;
      if (r() < 0.5) second = obj[key];
      else second = key === 'patientAgreed' ? false : pick(r, WRONG_TYPES);
      const pairs: Array<[string, Tree]> = Object.entries(obj);
      pairs.splice(int(r, 0, pairs.length), 0, [key, second]);
      return [update(tree, target, () => new Pairs(pairs)), `duplicate key ${key} in ${target.join('.') || '$'}`];
    }
    case 'number': {
      const n = pick(r, NUMBERS);
      return [update(tree, path, () => new Raw(n)), `number ${n} at ${at}`];
    }
    case 'proto': {
      const objects = containers(tree, 'object');
      if (objects.length === 0) return [tree, 'no object left to add a key to'];
      const target = pick(r, objects);
      const obj = getAt(tree, target) as { [k: string]: Tree };
      const key = pick(r, PROTO_KEYS);
      const value = pick<Tree>(r, [{ polluted: true }, { prototype: { polluted: true } }, 'x', null, []]);
      return [update(tree, target, () => new Pairs([[key, value], ...Object.entries(obj)])), `key ${key} in ${target.join('.') || '$'}`];
    }
    case 'long': {
      const n = pick(r, [5000, 100_000, 1_000_000]);
      const s = r() < 0.5 ? 'x'.repeat(n) : Buffer.alloc((n / 4) * 3, int(r, 0, 255)).toString('base64');
      return [update(tree, path, () => s), `string of ${n} characters at ${at}`];
    }
    case 'repeat': {
      const arrays = containers(tree, 'array');
      if (arrays.length === 0) return [tree, 'no array left to repeat'];
      const target = pick(r, arrays);
      const arr = getAt(tree, target) as Tree[];
      const times = pick(r, [2, 11, 51, 101, 1000]);
      const repeated = arr.length === 0 ? Array(times).fill(pick(r, WRONG_TYPES)) : Array.from({ length: arr.length * times }, (_, i) => arr[i % arr.length]);
      return [update(tree, target, () => repeated), `${target.join('.')} repeated ${times} times`];
    }
    case 'remove':
      return [update(tree, path, () => undefined), `${at} removed`];
    default: {
      // The sample inside itself, possibly several levels down.
      let inner: Tree = sample;
      const levels = int(r, 1, 3);
      for (let i = 1; i < levels; i++) inner = { ...(sample as object), nested: inner } as Tree;
      return [update(tree, path, () => inner), `the sample ${levels} levels deep at ${at}`];
    }
  }
}

/** Text- and byte-level damage after serialising. */
function damage(r: Rand, c: Case): Case {
  const k = pick(r, ['truncate', 'truncate', 'garbage', 'utf8', 'bom', 'concat', 'whitespace', 'top'] as const);
  const t = c.text;
  switch (k) {
    case 'truncate': {
      const cut = int(r, 0, Math.max(0, t.length - 1));
      return { ...c, text: t.slice(0, cut), what: `${c.what}; truncated at ${cut}/${t.length}` };
    }
    case 'garbage': {
      const at = int(r, 0, t.length);
      const g = pick(r, ['}', ']', ',', ':', '"', '\\', 'x', 'NaN', 'undefined', '\u0000', '/*c*/', "'"]);
      return { ...c, text: t.slice(0, at) + g + t.slice(at), what: `${c.what}; ${JSON.stringify(g)} inserted at ${at}` };
    }
    case 'utf8': {
      // Invalid UTF-8 inside a string value: an encoded lone surrogate, an overlong NUL, a stray byte.
      const bad = pick(r, [Buffer.from([0xed, 0xa0, 0x80]), Buffer.from([0xc0, 0x80]), Buffer.from([0xff]), Buffer.from([0xe2, 0x82])]);
      const m = /"MRN-0042"/.exec(t) ?? /"[A-Za-z]{3,}"/.exec(t);
      const at = m ? m.index + 1 : int(r, 0, t.length);
      const buf = Buffer.from(t, 'utf8');
      const byteAt = Buffer.byteLength(t.slice(0, at), 'utf8');
      return {
        ...c,
        bytes: Buffer.concat([buf.subarray(0, byteAt), bad, buf.subarray(byteAt)]),
        what: `${c.what}; invalid UTF-8 ${bad.toString('hex')} at ${at}`,
      };
    }
    case 'bom':
      return { ...c, text: `\ufeff${t}`, what: `${c.what}; byte order mark` };
    case 'concat':
      return { ...c, text: `${t}${t}`, what: `${c.what}; two JSON values` };
    case 'whitespace':
      return { ...c, text: `${' '.repeat(int(r, 1, 100_000))}${t}\n\t `, what: `${c.what}; padded with whitespace` };
    default: {
      const top = pick(r, ['[]', '[{}]', '"a string"', '123', 'null', 'true', '{}', '', '[' + t + ']']);
      return { ...c, text: top, what: `top-level ${top.slice(0, 20) || '(empty)'}` };
    }
  }
}

function encode(r: Rand, c: Case): Case {
  const x = r();
  const raw = c.bytes ?? Buffer.from(c.text, 'utf8');
  if (x < 0.15) return { ...c, bytes: gzipSync(raw), encoding: 'gzip', what: `${c.what}; gzip` };
  if (x < 0.18) return { ...c, bytes: deflateSync(raw), encoding: 'deflate', what: `${c.what}; deflate` };
  if (x < 0.2) return { ...c, bytes: brotliCompressSync(raw), encoding: 'br', what: `${c.what}; br` };
  if (x < 0.22) {
    const z = gzipSync(raw);
    return { ...c, bytes: z.subarray(0, int(r, 1, z.length - 1)), encoding: 'gzip', what: `${c.what}; truncated gzip` };
  }
  if (x < 0.23) return { ...c, bytes: raw, encoding: 'gzip', what: `${c.what}; labelled gzip but plain` };
  if (x < 0.24) return { ...c, bytes: raw, encoding: pick(r, ['compress', 'zstd', 'gzip, gzip', 'identity']), what: `${c.what}; odd Content-Encoding` };
  return c;
}

function* cases(seed: number, n: number, sample: Tree): Generator<Case> {
  const r = prng(seed);
  for (let i = 0; i < n; i++) {
    let tree: Tree = { ...(sample as object), externalId: `FUZZ-${seed}-${i}` } as Tree;
    const what: string[] = [];
    const mutations = r() < 0.75 ? 1 : int(r, 2, 4);
    for (let m = 0; m < mutations; m++) {
      const [next, did] = mutate(r, tree, sample);
      tree = next;
      what.push(did);
    }
    const endpoint = pick(r, [
      'referrals',
      'referrals',
      'referrals',
      'referrals',
      'referrals',
      'referrals',
      'referrals',
      'referrals',
      'documents',
      'cancel',
    ] as const);
    let body: Tree = tree;
    if (endpoint === 'documents') {
      body = r() < 0.5 ? ((tree as { [k: string]: Tree }).documents ?? tree) : { documents: (tree as { [k: string]: Tree }).documents ?? null };
    }
    if (endpoint === 'cancel') body = r() < 0.5 ? { reason: (tree as { [k: string]: Tree }).reasonText ?? pick(r, ODD_STRINGS) } : tree;
    let c: Case = { what: `#${i} ${endpoint}: ${what.join('; ')}`, text: serialise(body), endpoint };
    if (r() < 0.2) c = damage(r, c);
    yield encode(r, c);
  }
}

interface Failure {
  what: string;
  status: number | string;
  body: string;
}

describe('intake fuzz: the sample referral nested, repeated and mutated', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  test(`${BODIES} bodies (seed ${SEED}): never a 5xx, every 4xx an OperationOutcome`, async () => {
    const sample = fixture() as Tree as { [k: string]: Tree };
    delete sample.callbackUrl; // no webhooks leave during the test
    // A referral to send documents and cancels to.
    const made = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...sample, externalId: `FUZZ-${SEED}-target` }),
    });
    expect(made.status).toBe(202);
    const target = ((await made.json()) as { id: string }).id;

    const failures: Failure[] = [];
    const statuses = new Map<string, number>();
    const it = cases(SEED, BODIES, sample);
    let sent = 0;
    const send = async (c: Case): Promise<void> => {
      const path = c.endpoint === 'referrals' ? '/referrals' : `/referrals/${target}/${c.endpoint}`;
      const headers: Record<string, string> = { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' };
      if (c.encoding) headers['Content-Encoding'] = c.encoding;
      let status: number | string;
      let text = '';
      try {
        const res = await fetch(`${gw.url}${path}`, { method: 'POST', headers, body: c.bytes ?? c.text });
        status = res.status;
        text = await res.text();
      } catch (err) {
        status = `no answer (${(err as Error).message})`;
      }
      sent++;
      const key = typeof status === 'number' ? String(status) : 'no answer';
      statuses.set(key, (statuses.get(key) ?? 0) + 1);
      if (typeof status !== 'number' || status >= 500) {
        failures.push({ what: c.what, status, body: text.slice(0, 300) });
        if (process.env.FUZZ_VERBOSE) process.stdout.write(`FAIL ${status}: ${c.what}\n`);
        return;
      }
      if (status >= 400) {
        let outcome: { resourceType?: unknown; issue?: unknown } | undefined;
        try {
          outcome = JSON.parse(text) as typeof outcome;
        } catch {
          outcome = undefined;
        }
        if (outcome?.resourceType !== 'OperationOutcome' || !Array.isArray(outcome.issue) || outcome.issue.length === 0) {
          failures.push({ what: c.what, status, body: text.slice(0, 300) });
        }
      }
    };
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        for (let next = it.next(); !next.done; next = it.next()) await send(next.value);
      })
    );

    const live = await fetch(`${gw.url}/healthz`);
    process.stdout.write(`intake fuzz (seed ${SEED}): ${sent} bodies, answers ${JSON.stringify(Object.fromEntries([...statuses].sort()))}\n`);
    // On failure, the seed and the first failing bodies are in the diff; FUZZ_SEED=<seed> replays the run.
    expect({ seed: SEED, failures: failures.slice(0, 15), count: failures.length }).toEqual({ seed: SEED, failures: [], count: 0 });
    expect(sent).toBe(BODIES);
    expect(live.status).toBe(200);
    expect(({} as { polluted?: unknown }).polluted).toBeUndefined();
    expect(Object.prototype.hasOwnProperty.call(Object.prototype, 'polluted')).toBe(false);
  }, 120_000);
});
