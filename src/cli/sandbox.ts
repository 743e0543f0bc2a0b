// Standalone FHIR R4 sandbox: `PORT=8090 HOST=127.0.0.1 npx tsx src/cli/sandbox.ts`
// Serves /fhir/R4 and /sandbox/fhir/R4 (same in-memory store). PORT=0 picks a free port.
// stdout: one JSON line {"event":"sandbox-listening","url":...} when ready, and
// {"event":"sandbox-stopped"} on SIGTERM/SIGINT. Errors go to stderr (exit code 1).
// GET /_sandbox/stats answers request and search counters as JSON; GET /_sandbox/binaries the raw Binary uploads
// (in flight and received), GET /_sandbox/binaries/<id> a Binary's SHA-256 and size as the sandbox computed them.
// SANDBOX_SEARCH_INDEX=conditional: only conditional creates/updates use the search index, other
// searches scan the store, as before the index (for comparisons); =off: nothing uses it.
// SANDBOX_PROFILE=default|medplum|hapi|strict: behave like that server (docs/sandbox-profiles.md);
// SANDBOX_TRAITS="nonAtomic=false,strictIsolationMaxEntries=8,-emptyMinimal": trait overrides.
// SANDBOX_STORAGE_PORT: port of the presigned storage server (profiles with presignedBinaryUrls; default any).
// POST /_sandbox/faults {"failNextEntry":{"resourceType":"ServiceRequest","status":409}} injects a failure.
import { loadSandbox } from '../sandbox';

function parsePort(raw: string | undefined): number {
  const value = raw === undefined || raw.trim() === '' ? 8090 : Number(raw);
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new Error(`Invalid PORT: ${raw}`);
  }
  return value;
}

async function main(): Promise<void> {
  const { describeTraitOverrides, resolveSandboxTraits, startSandboxServer } = await loadSandbox();
  const port = parsePort(process.env.PORT);
  const host = process.env.HOST || '127.0.0.1';
  // Checked before anything starts: an unknown profile or trait is a one-line error, exit code 1.
  const profile = process.env.SANDBOX_PROFILE;
  const overrides = process.env.SANDBOX_TRAITS;
  const traits = resolveSandboxTraits(profile, overrides);
  const storagePort = process.env.SANDBOX_STORAGE_PORT ? parsePort(process.env.SANDBOX_STORAGE_PORT) : undefined;
  const started = performance.now();
  const setting = (process.env.SANDBOX_SEARCH_INDEX ?? '').trim().toLowerCase();
  const searchIndex = setting === 'conditional' ? 'conditional' : !['off', 'false', '0', 'no'].includes(setting);
  const sandbox = await startSandboxServer(port, { host, searchIndex, profile, traits: overrides, storage: { port: storagePort } });
  const changed = describeTraitOverrides(traits);
  process.stderr.write(`sandbox ready in ${Math.round(performance.now() - started)} ms (profile ${traits.profile}${changed ? `, ${changed}` : ''})\n`);
  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) {
      return;
    }
    stopping = true;
    // Generous: on a loaded machine closing the storage server and idle connections can take seconds.
    const force = setTimeout(() => process.exit(1), 15_000);
    force.unref();
    sandbox.close().then(
      () => {
        process.stdout.write(JSON.stringify({ event: 'sandbox-stopped', signal }) + '\n');
        process.exit(0);
      },
      (err: unknown) => {
        process.stderr.write(`sandbox close failed: ${String(err)}\n`);
        process.exit(1);
      }
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  // Only now say it listens: a SIGTERM sent on this line must find the handlers (before them, the kernel's
  // default action ends the process at once, without the sandbox-stopped line).
  process.stdout.write(
    JSON.stringify({
      event: 'sandbox-listening',
      url: sandbox.url,
      profile: sandbox.traits.profile,
      ...(changed ? { traits: changed } : {}),
      ...(sandbox.storageUrl ? { storageUrl: sandbox.storageUrl } : {}),
    }) + '\n'
  );
}

main().catch((err: unknown) => {
  process.stderr.write(`sandbox failed to start: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
