import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';

/**
 * The dependency direction is enforced by lint (eslint.config.mjs, import-x/no-restricted-paths), not only written
 * down: each violation below, added to a real file, is reported; the file as it is passes.
 */
describe('lint keeps the architecture', () => {
  const cases: Array<{ file: string; extra: string }> = [
    { file: 'src/referral/service.ts', extra: '' },
    { file: 'src/referral/service.ts', extra: "import { errorHandler } from '../api';\nexport const _handler = errorHandler;" },
    {
      file: 'src/mapping/codes.ts',
      extra: "import { jsonBytes } from '../json';\nimport { getReferral } from '../store';\nexport const _s = [getReferral, jsonBytes];",
    },
    { file: 'src/delivery/circuit.ts', extra: "import { SANDBOX_ID } from '../sandbox';\nexport const _id = SANDBOX_ID;" },
    { file: 'src/outcomes/index.ts', extra: "import { logger } from '../observability';\nexport const _l = logger;" },
    {
      file: 'src/outcomes/index.ts',
      extra: 'export const _n = (x: number): string => (x > 1 ? "a" : x > 0 ? "b" : "c");\nexport function _f(p: Promise<void>): void { p; }',
    },
    { file: 'src/tracking/state.ts', extra: "import { getReferral } from '../store/referrals';\nexport const _r = getReferral;" },
  ];
  let results: string[][] = [];
  beforeAll(async () => {
    const input = JSON.stringify(cases.map((c) => ({ file: c.file, text: `${readFileSync(c.file, 'utf8')}\n${c.extra}\n` })));
    results = await new Promise<string[][]>((resolve, reject) => {
      const child = execFile(process.execPath, ['test/helpers/lint-texts.cjs'], { timeout: 120_000, maxBuffer: 10_000_000 }, (err, stdout) =>
        err ? reject(err) : resolve(JSON.parse(stdout) as string[][])
      );
      child.stdin?.end(input);
    });
  }, 120_000);

  test('the domain does not import src/api (src/referral -> src/api fails)', () => {
    expect(results[0]).toEqual([]);
    expect(results[1]).toEqual([expect.stringMatching(/^import-x\/no-restricted-paths: .*the domain owns its outcomes/)]);
  });

  test('mapping imports neither the store nor delivery; only the composition root uses the sandbox; outcomes is a leaf', () => {
    expect(results[2]).toEqual([expect.stringMatching(/^import-x\/no-restricted-paths: .*mapping is pure/)]);
    expect(results[3]).toEqual([expect.stringMatching(/^import-x\/no-restricted-paths: .*only the composition root/)]);
    expect(results[4]).toEqual([expect.stringMatching(/^import-x\/no-restricted-paths: .*src\/outcomes is a leaf/)]);
  });

  test('another folder is imported through its index.ts, not its files', () => {
    expect(results[6]).toEqual([expect.stringMatching(/^no-restricted-imports: .*through its index\.ts/)]);
  });

  test('a floating promise and a nested ternary are errors', () => {
    expect(results[5]).toEqual(
      expect.arrayContaining([expect.stringMatching(/^no-nested-ternary/), expect.stringMatching(/^@typescript-eslint\/no-floating-promises/)])
    );
  });
});
