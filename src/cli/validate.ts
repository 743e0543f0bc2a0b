// Offline check of referral files, exactly as POST /referrals checks a submission (schema, codes,
// routing, FHIR mapping and validation of the transaction Bundle). Sends nothing, stores nothing.
//
//   npm run validate -- fixtures/referrals/breast-second-opinion.json
//   npm run validate -- a.json b.json --destination example-cancer-centre --quiet
//
// Destinations come from the environment as the gateway reads it (loadConfig: DESTINATIONS_FILE,
// FHIR_BASE_URL, ...); with none configured, the gateway's built-in sandbox destination 'sandbox'.
// --destination ID routes every file to that destination (as if the referral named it).
//
// stdout: the mapped transaction Bundle as JSON (one file: pretty-printed; several files: one
//         compact Bundle per line, in argument order), for each file that got as far as mapping.
//         Nothing with --quiet.
// stderr: one line per issue, `severity path: message` (paths are in the referral, or in the
//         Bundle for FHIR content), then a summary line per file, and a total for several files.
// Exit:   0 all valid, 1 any invalid (including files that are not JSON), 2 usage error,
//         bad configuration or a file that cannot be read.
import type { ServiceRequest } from '@medplum/fhirtypes';
import { readFileSync } from 'node:fs';
import { ConfigError, loadConfig } from '../config';
import type { Destination, DestinationDirectory } from '../config';
import { type CheckIssue, checkReferral, destinationDirectory } from '../referral';
import { sandboxDestination } from '../sandbox';

const USAGE = 'usage: npm run validate -- <referral.json | -> [more.json ...] [--destination <id>] [--quiet]';

export const EXIT_VALID = 0;
export const EXIT_INVALID = 1;
export const EXIT_USAGE = 2;

interface Args {
  files: string[];
  destination?: string;
  quiet: boolean;
  help: boolean;
}

class UsageError extends Error {}

function parseArgs(argv: string[]): Args {
  const args: Args = { files: [], quiet: false, help: false };
  let onlyFiles = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (onlyFiles || !a.startsWith('-') || a === '-') {
      args.files.push(a);
    } else if (a === '--') {
      onlyFiles = true;
    } else if (a === '--quiet' || a === '-q') {
      args.quiet = true;
    } else if (a === '--help' || a === '-h') {
      args.help = true;
    } else if (a === '--destination' || a.startsWith('--destination=')) {
      const value = a === '--destination' ? argv[++i] : a.slice('--destination='.length);
      if (value === undefined || value === '' || value.startsWith('--')) {
        throw new UsageError('--destination needs a destination id');
      }
      args.destination = value;
    } else {
      throw new UsageError(`unknown option ${a}`);
    }
  }
  return args;
}

/** The destinations the gateway would route to with this environment. */
function gatewayDestinations(env: NodeJS.ProcessEnv): DestinationDirectory {
  const config = loadConfig(env);
  const list: Destination[] = config.useSandbox ? [sandboxDestination(`http://localhost:${config.port || 8080}/sandbox/fhir/R4`)] : config.destinations;
  return destinationDirectory(list);
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

type FileOutcome = 'valid' | 'invalid' | 'unreadable';

export function main(argv: string[], env: NodeJS.ProcessEnv = process.env): number {
  const out = (s: string): void => void process.stdout.write(s);
  const err = (s: string): void => void process.stderr.write(s);

  let args: Args;
  let destinations: DestinationDirectory;
  try {
    args = parseArgs(argv);
    if (args.help) {
      out(`${USAGE}\n`);
      return EXIT_VALID;
    }
    if (args.files.length === 0) {
      throw new UsageError('no referral file given');
    }
    destinations = gatewayDestinations(env);
    if (args.destination !== undefined && !destinations.get(args.destination)) {
      throw new UsageError(`--destination ${args.destination} is not configured (known: ${destinations.ids().join(', ')})`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      err(`validate: ${e.message}\n${USAGE}\n`);
    } else if (e instanceof ConfigError) {
      for (const problem of e.problems) err(`validate: configuration error: ${problem}\n`);
    } else {
      throw e;
    }
    return EXIT_USAGE;
  }

  const several = args.files.length > 1;
  const outcomes: FileOutcome[] = [];
  const createdAt = new Date().toISOString();
  for (const file of args.files) {
    const printIssues = (issues: Array<Pick<CheckIssue, 'expression' | 'detail'>>): void => {
      for (const i of issues) err(`error ${i.expression}: ${i.detail}\n`);
    };
    let text: string;
    try {
      text = readFileSync(file === '-' ? 0 : file, 'utf8');
    } catch (e) {
      err(`${file}: cannot read file: ${(e as Error).message}\n`);
      outcomes.push('unreadable');
      continue;
    }
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch (e) {
      printIssues([{ expression: '$', detail: `not valid JSON (${(e as Error).message})` }]);
      err(`${file}: INVALID, not JSON\n`);
      outcomes.push('invalid');
      continue;
    }
    if (args.destination !== undefined && body && typeof body === 'object' && !Array.isArray(body)) {
      body = { ...(body as Record<string, unknown>), destination: args.destination };
    }

    let result: ReturnType<typeof checkReferral>;
    try {
      result = checkReferral(body, destinations, { referralId: 'ref_validate', clientId: 'validate', createdAt, maxIssues: Infinity });
    } catch (e) {
      // A bug in the mapper or validator, not a problem of the file: report it and carry on.
      printIssues([{ expression: '$', detail: `internal error while checking: ${(e as Error).stack ?? String(e)}` }]);
      err(`${file}: INVALID, the check itself failed\n`);
      outcomes.push('invalid');
      continue;
    }
    if (result.bundle && !args.quiet) {
      out(several ? `${JSON.stringify(result.bundle)}\n` : `${JSON.stringify(result.bundle, null, 2)}\n`);
    }
    if (result.ok) {
      const entries = result.bundle.entry?.length ?? 0;
      const serviceRequest = result.bundle.entry?.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as ServiceRequest | undefined;
      const specialty = serviceRequest?.performerType?.text ? `, specialty ${serviceRequest.performerType.text}` : '';
      err(`${file}: valid, destination ${result.destination.id}${specialty}, transaction Bundle with ${entries} ${entries === 1 ? 'entry' : 'entries'}\n`);
      outcomes.push('valid');
    } else {
      printIssues(result.issues);
      err(`${file}: INVALID, ${plural(result.issues.length, 'error')} (${result.stage} check)\n`);
      outcomes.push('invalid');
    }
  }

  const count = (o: FileOutcome): number => outcomes.filter((x) => x === o).length;
  if (several) {
    const unreadable = count('unreadable');
    err(`${plural(outcomes.length, 'file')}: ${count('valid')} valid, ${count('invalid')} invalid${unreadable ? `, ${unreadable} unreadable` : ''}\n`);
  }
  if (count('unreadable') > 0) return EXIT_USAGE;
  return count('invalid') > 0 ? EXIT_INVALID : EXIT_VALID;
}

if (require.main === module) {
  process.exitCode = main(process.argv.slice(2));
}
