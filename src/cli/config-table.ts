// The README's configuration table, generated from the variable declarations (src/config/variables.ts).
//
//   npx tsx src/cli/config-table.ts           prints the table
//   npx tsx src/cli/config-table.ts --write   replaces it in README.md (between the config-table markers)
//
// test/unit/config-table.test.ts fails while README.md's table differs from the generated one.
// Exit: 0 done, 2 usage error or no markers in README.md.
import { readFileSync, writeFileSync } from 'node:fs';
import { configTable, withConfigTable } from '../config';

const USAGE = 'usage: npx tsx src/cli/config-table.ts [--write]';
const README = 'README.md';

export function main(argv: string[]): number {
  const write = argv.includes('--write');
  const unknown = argv.filter((a) => a !== '--write');
  if (unknown.length > 0) {
    process.stderr.write(`config-table: unknown argument ${unknown[0]}\n${USAGE}\n`);
    return 2;
  }
  const table = configTable();
  if (!write) {
    process.stdout.write(`${table}\n`);
    return 0;
  }
  const before = readFileSync(README, 'utf8');
  let after: string;
  try {
    after = withConfigTable(before, table);
  } catch (err) {
    process.stderr.write(`config-table: ${(err as Error).message}\n`);
    return 2;
  }
  if (after !== before) writeFileSync(README, after);
  process.stdout.write(`config-table: ${README} ${after === before ? 'was already current' : 'updated'}\n`);
  return 0;
}

if (require.main === module) {
  process.exitCode = main(process.argv.slice(2));
}
