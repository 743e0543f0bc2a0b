// docs/openapi.json, generated from the zod schemas and the route metadata (src/api/openapi); GET /openapi.json
// serves the same document.
//
//   npx tsx src/cli/openapi.ts           writes docs/openapi.json
//   npx tsx src/cli/openapi.ts --check   exits 1 when docs/openapi.json differs from the generated document
//
// test/integration/openapi.test.ts fails too while the committed file is not current.
// Exit: 0 written or current, 1 out of date (--check), 2 usage error.
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { openApiText } from '../api';

export const OPENAPI_FILE = path.resolve(__dirname, '../../docs/openapi.json');
const SHOWN = path.relative(process.cwd(), OPENAPI_FILE) || OPENAPI_FILE;
const USAGE = 'usage: npx tsx src/cli/openapi.ts [--check]';

function readCommitted(): string | undefined {
  try {
    return readFileSync(OPENAPI_FILE, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** The first line where the two texts differ, for the message. */
function firstDifference(before: string, after: string): string {
  const a = before.split('\n');
  const b = after.split('\n');
  const i = a.findIndex((line, n) => line !== b[n]);
  const n = i < 0 ? a.length : i;
  return `line ${n + 1}: committed ${JSON.stringify(a[n] ?? '(end of file)')}, generated ${JSON.stringify(b[n] ?? '(end of file)')}`;
}

export function main(argv: string[]): number {
  const check = argv.includes('--check');
  const unknown = argv.filter((a) => a !== '--check');
  if (unknown.length > 0) {
    process.stderr.write(`openapi: unknown argument ${unknown[0]}\n${USAGE}\n`);
    return 2;
  }
  const text = openApiText();
  const before = readCommitted();
  if (before === text) {
    process.stdout.write(`openapi: ${SHOWN} is current\n`);
    return 0;
  }
  if (check) {
    const why = before === undefined ? 'is missing' : `differs from the generated document (${firstDifference(before, text)})`;
    process.stderr.write(`openapi: ${SHOWN} ${why}: run npx tsx src/cli/openapi.ts and commit it\n`);
    return 1;
  }
  writeFileSync(OPENAPI_FILE, text);
  process.stdout.write(`openapi: ${SHOWN} written (${text.split('\n').length - 1} lines)\n`);
  return 0;
}

if (require.main === module) {
  process.exitCode = main(process.argv.slice(2));
}
