import { readFileSync } from 'node:fs';
import { loadConfig } from '../../src/config/config';
import { configTable, readmeConfigTable, schemaDefault, TABLE_END, TABLE_START, withConfigTable } from '../../src/config/config-table';
import { envSchema, type Variable, variables } from '../../src/config/variables';

const declared = variables as Record<string, Variable>;

describe('the configuration variables, declared once', () => {
  test('every key of the env schema has a description of one line', () => {
    for (const name of Object.keys(envSchema.shape)) {
      expect([name, declared[name]?.doc.trim().length > 0]).toEqual([name, true]);
      expect([name, declared[name].doc.includes('\n')]).toEqual([name, false]);
    }
  });

  test('a shown default begins with the schema default, so the two cannot drift apart', () => {
    for (const [name, v] of Object.entries(declared)) {
      const own = schemaDefault(v);
      if (v.shownDefault !== undefined && own !== undefined) expect([name, v.shownDefault.startsWith(own)]).toEqual([name, true]);
    }
  });

  test('the secrets a destination reads from the environment are declared', () => {
    const base = { DESTINATIONS_FILE: '/nonexistent/destinations.json', FHIR_BASE_URL: 'https://c.example.org/fhir/R4' };
    const secrets = { FHIR_USERNAME: 'u', FHIR_PASSWORD: 'p', FHIR_TOKEN: 't', FHIR_CLIENT_ID: 'c', FHIR_CLIENT_SECRET: 's' };
    const names = new Set<string>();
    for (const FHIR_AUTH of ['basic', 'bearer', 'client-credentials']) {
      const auth = loadConfig({ ...base, ...secrets, FHIR_AUTH, FHIR_TOKEN_URL: 'https://c.example.org/token' }).destinations[0].auth;
      for (const [k, v] of Object.entries(auth)) if (k.endsWith('Env') && typeof v === 'string') names.add(v);
    }
    names.add('FHIR_PRIVATE_KEY'); // smart-backend's privateKeyEnv (its key is checked at start-up, so not loaded here)
    expect([...names].filter((n) => !(n in declared))).toEqual([]);
  });
});

describe("the README's configuration table", () => {
  test('README.md shows the table generated from src/config/variables.ts', () => {
    const readme = readFileSync('README.md', 'utf8');
    const current = readmeConfigTable(readme);
    const generated = configTable();
    if (current !== generated) {
      const a = current.split('\n');
      const b = generated.split('\n');
      const i = a.findIndex((line, n) => line !== b[n]);
      const at = i < 0 ? b.length - 1 : i;
      throw new Error(
        `README.md's configuration table differs from the declarations in src/config/variables.ts: run \`npx tsx src/cli/config-table.ts --write\`\n` +
          `first difference, line ${at + 1} of the table:\n  README:    ${a[at] ?? '(none)'}\n  generated: ${b[at] ?? '(none)'}`
      );
    }
  });

  test('a row per declared variable, in declaration order', () => {
    const rows = configTable().split('\n').slice(2);
    expect(rows.map((r) => /^\| `([^`]+)` \|/.exec(r)?.[1])).toEqual(Object.keys(declared));
    expect(rows.find((r) => r.startsWith('| `PORT` |'))).toBe('| `PORT` | 8080 | HTTP port (0 = any free port) |');
    expect(rows.find((r) => r.startsWith('| `FHIR_PASSWORD` |'))).toMatch(/^\| `FHIR_PASSWORD` \| — \| /);
  });

  test('--write replaces only the region between the markers', () => {
    const readme = `# Title\n\nbefore\n\n${TABLE_START}\n| old |\n${TABLE_END}\n\nafter\n`;
    const written = withConfigTable(readme, '| new |');
    expect(written).toBe(`# Title\n\nbefore\n\n${TABLE_START}\n\n| new |\n\n${TABLE_END}\n\nafter\n`);
    expect(withConfigTable(written, '| new |')).toBe(written);
    expect(readmeConfigTable(written)).toBe('| new |');
    expect(() => withConfigTable('# no markers\n', '| new |')).toThrow(/config-table:start/);
  });
});
