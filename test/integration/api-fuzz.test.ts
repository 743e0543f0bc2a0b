import type { Gateway } from '../../src/gateway';
import { fixture, KEY_A, startGateway } from '../helpers/gateway';
import { listReferrals } from '../../src/store';

/**
 * Bad input never makes a 5xx or a half-written referral. Every field of the sample referral, one at a
 * time, is replaced with values of the wrong kind (null, numbers, booleans, empty, very long, control
 * characters, arrays, objects) or removed. Each answer must be a 2xx or a 4xx OperationOutcome that names
 * a field, and exactly the accepted submissions are stored.
 */
type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

function leaves(value: Json, path: Array<string | number> = []): Array<Array<string | number>> {
  if (Array.isArray(value)) return [path, ...value.flatMap((v, i) => leaves(v, [...path, i]))];
  if (value && typeof value === 'object') return [path, ...Object.entries(value).flatMap(([k, v]) => leaves(v, [...path, k]))];
  return [path];
}

function withValue(body: Json, path: Array<string | number>, value: Json | undefined): Json {
  const copy = structuredClone(body) as any;
  let cur = copy;
  for (const key of path.slice(0, -1)) cur = cur[key];
  const last = path[path.length - 1];
  if (value === undefined) {
    if (Array.isArray(cur)) cur.splice(Number(last), 1);
    else Reflect.deleteProperty(cur, last);
  } else {
    cur[last] = value;
  }
  return copy;
}

const MUTATIONS: Array<[string, Json | undefined]> = [
  ['removed', undefined],
  ['null', null],
  ['zero', 0],
  ['negative float', -1.5],
  ['true', true],
  ['empty string', ''],
  ['whitespace', '   '],
  ['control characters', 'a\u0000b\u001fc'],
  ['50k characters', 'x'.repeat(50_000)],
  ['empty array', []],
  ['array of nulls', [null, null]],
  ['empty object', {}],
  ['nested junk', { $ref: '#', __proto__: { polluted: true }, constructor: { prototype: { polluted: true } } }],
];

describe('API fuzz: every field replaced with the wrong kind of value', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('never a 5xx, always an OperationOutcome naming a field, and only accepted submissions are stored', async () => {
    const base = fixture() as Json as { [k: string]: Json };
    delete base.callbackUrl; // no webhooks leave during the test
    const paths = leaves(base).filter((p) => p.length > 0 && p[0] !== 'externalId');
    const statuses = new Map<number, number>();
    const accepted = new Set<string>();
    let n = 0;
    for (const path of paths) {
      for (const [, value] of MUTATIONS) {
        const externalId = `EHR-FUZZ-${n++}`;
        const body = withValue({ ...base, externalId }, path, value);
        const res = await fetch(`${gw.url}/referrals`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
          body: JSON.stringify(body),
        });
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        const answer = (await res.json()) as { resourceType?: string; id?: string; issue?: Array<{ expression?: string[] }> };
        const where = `${path.join('.')} = ${JSON.stringify(value)?.slice(0, 40)} -> ${res.status}`;
        expect([where, res.status < 500]).toEqual([where, true]);
        if (res.status === 202) {
          if (process.env.FUZZ_VERBOSE) process.stdout.write(`accepted: ${where}\n`);
          accepted.add(answer.id as string);
        } else {
          expect([where, res.status]).toEqual([where, 422]);
          expect(answer.resourceType).toBe('OperationOutcome');
          expect([where, (answer.issue ?? []).some((i) => (i.expression ?? []).length > 0)]).toEqual([where, true]);
        }
      }
    }
    // Prototype pollution through the body changed nothing.
    expect(({} as { polluted?: boolean }).polluted).toBeUndefined();
    const stored = (await listReferrals(gw.db, 'city-hospital', { limit: 10_000 })).items.filter((r) => r.externalId.startsWith('EHR-FUZZ-'));
    expect(new Set(stored.map((r) => r.id))).toEqual(accepted);
    // Most mutations are refused; some (free text replaced by other text, optional fields removed) are fine.
    expect(statuses.get(422) ?? 0).toBeGreaterThan(paths.length * 5);
    process.stdout.write(`api fuzz: ${n} submissions over ${paths.length} fields: ${JSON.stringify(Object.fromEntries(statuses))}\n`);
  });
});
