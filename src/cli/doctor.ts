// Probes a destination FHIR server and says whether the gateway can work with it and what to set.
//
//   npm run doctor -- <destination-id> [--json] [--quick]
//   npm run doctor                      # no destinations configured: probes a built-in sandbox
//   SANDBOX_PROFILE=medplum FHIR_PROFILE=medplum npm run doctor
//
// Destinations come from the environment as the gateway reads it (loadConfig: DESTINATIONS_FILE,
// FHIR_BASE_URL, FHIR_<OPTION>...). With none configured and no id (or the id `sandbox`), a standalone
// sandbox FHIR server starts on an ephemeral port with SANDBOX_PROFILE / SANDBOX_TRAITS and is probed as
// destination `sandbox`, with the FHIR_<OPTION> settings (FHIR_PROFILE, FHIR_PREFER_MINIMAL, ...).
//
// The probes write tagged test resources (a Patient "Doctor Probe", a Task, Binaries, a DocumentReference;
// never real data) and delete them afterwards.
//
// stdout: the report as a table, or with --json the report as JSON only.
// --quick: smaller size probes (JSON up to 4 MiB, raw Binary 1 MiB), for slow links.
// Exit:   0 the gateway can work with the destination as configured, 1 it cannot (or the run failed),
//         2 usage error, unknown destination or bad configuration.
import { ConfigError, destinationOptionVariable, loadConfig } from '../config';
import { type Destination, type DestinationSettings, destinationSchema } from '../config';
import { QUICK_SIZES, SETTINGS_KEYS, formatDoctorTable, runDoctor } from '../doctor';
import { loadSandbox, SANDBOX_ID, type SandboxServer, sandboxDestination } from '../sandbox';

const USAGE = 'usage: npm run doctor -- [<destination-id>] [--json] [--quick]';

class UsageError extends Error {}

interface Args {
  id?: string;
  json: boolean;
  quick: boolean;
  help: boolean;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { json: false, quick: false, help: false };
  for (const a of argv) {
    if (a === '--json') args.json = true;
    else if (a === '--quick') args.quick = true;
    else if (a === '--help' || a === '-h') args.help = true;
    else if (a.startsWith('-')) throw new UsageError(`unknown option ${a}`);
    else if (args.id === undefined) args.id = a;
    else throw new UsageError(`one destination id only (got ${args.id} and ${a})`);
  }
  return args;
}

/** Settings of the standalone sandbox destination from FHIR_<OPTION> variables (FHIR_PROFILE, ...). */
const SANDBOX_OPTIONS: ReadonlyArray<keyof DestinationSettings | 'maxInlineBytes'> = [...SETTINGS_KEYS, 'maxInlineBytes'];

function sandboxTarget(url: string, env: NodeJS.ProcessEnv): Destination {
  const raw: Record<string, unknown> = { ...sandboxDestination(url) };
  for (const option of SANDBOX_OPTIONS) {
    const variable = destinationOptionVariable(option);
    const text = env[variable]?.trim();
    if (!text) continue;
    raw[option] = optionValue(option, text);
  }
  if (env.FHIR_TIMEOUT_MS && /^\d+$/.test(env.FHIR_TIMEOUT_MS.trim())) raw.timeoutMs = Number(env.FHIR_TIMEOUT_MS.trim());
  const parsed = destinationSchema.safeParse(raw);
  if (!parsed.success) {
    throw new ConfigError(parsed.error.issues.map((issue) => `${destinationOptionVariable(String(issue.path[0] ?? 'profile'))} ${issue.message}`));
  }
  return parsed.data;
}

/** A FHIR_<OPTION> variable's value: a boolean, a whole number, a comma list (attachmentOrigins), else the text. */
function optionValue(option: (typeof SANDBOX_OPTIONS)[number], text: string): unknown {
  if (text === 'true') return true;
  if (text === 'false') return false;
  if (/^\d+$/.test(text)) return Number(text);
  if (option === 'attachmentOrigins') {
    return text
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
  }
  return text;
}

function write(text: string): Promise<void> {
  return new Promise((resolve) => process.stdout.write(text, () => resolve()));
}

async function main(argv: string[]): Promise<number> {
  let args: Args;
  try {
    args = parseArgs(argv);
  } catch (err) {
    process.stderr.write(`doctor: ${(err as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (args.help) {
    await write(`${USAGE}\n`);
    return 0;
  }
  const env = process.env;
  let config: ReturnType<typeof loadConfig>;
  try {
    config = loadConfig(env);
  } catch (err) {
    process.stderr.write(`doctor: ${(err as Error).message.split('\n')[0]}\n`);
    return 2;
  }

  let destination: Destination | undefined;
  let sandbox: SandboxServer | undefined;
  if (config.useSandbox && (args.id === undefined || args.id === SANDBOX_ID)) {
    try {
      const { startSandboxServer } = await loadSandbox();
      sandbox = await startSandboxServer(0, { profile: env.SANDBOX_PROFILE, traits: env.SANDBOX_TRAITS });
      destination = sandboxTarget(sandbox.url, env);
    } catch (err) {
      await sandbox?.close();
      process.stderr.write(`doctor: ${(err as Error).message.split('\n')[0]}\n`);
      return 2;
    }
  } else {
    const known = config.useSandbox ? [SANDBOX_ID] : config.destinations.map((d) => d.id);
    if (args.id === undefined && config.destinations.length === 1) {
      destination = config.destinations[0];
    } else if (args.id === undefined) {
      process.stderr.write(`doctor: name the destination to probe; known destinations: ${known.join(', ')}\n${USAGE}\n`);
      return 2;
    } else {
      destination = config.destinations.find((d) => d.id === args.id);
      if (!destination) {
        process.stderr.write(`doctor: unknown destination "${args.id}"; known destinations: ${known.join(', ') || '(none)'}\n`);
        return 2;
      }
    }
  }

  try {
    if (!args.json) process.stderr.write(`doctor: probing ${destination.id} at ${destination.baseUrl} ...\n`);
    const report = await runDoctor(destination, {
      env,
      ...(args.quick ? { sizes: QUICK_SIZES } : {}),
    });
    await write(args.json ? `${JSON.stringify(report, null, 2)}\n` : formatDoctorTable(report, { width: process.stdout.columns }));
    return report.canWork ? 0 : 1;
  } catch (err) {
    process.stderr.write(`doctor: the run failed: ${(err as Error).message.split('\n')[0]}\n`);
    return 1;
  } finally {
    await sandbox?.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`doctor: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  }
);
