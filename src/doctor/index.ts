// The destination doctor: probes a centre's FHIR server with tagged test resources (never real data),
// deletes them again, and reports line by line whether the gateway can work with it as configured and
// what to set otherwise. Used by `npm run doctor -- <destination>` and GET /admin/destinations/{id}/doctor.
import { type Destination, destinationSettings, serverProfileDefaults } from '../config';
import { createFhirClient } from '../destinations';
import { cleanupProbes } from './cleanup';
import { type Line, evaluate, suggestSettings } from './evaluate';
import { ProbeHttp, describeError } from './http';
import { DEFAULT_JSON_SIZES, DEFAULT_RAW_SIZES, type Facts, runProbes } from './probes';
import type { DoctorCheck, DoctorOptions, DoctorReport, OrphanedBinary } from './types';

export type { DoctorCheck, DoctorOptions, DoctorReport, DoctorStatus, OrphanedBinary } from './types';
export { formatDoctorTable } from './format';
export { DOCTOR_ID_SYSTEM, DOCTOR_RUN_SYSTEM, DOCTOR_TAG_CODE, DOCTOR_TAG_SYSTEM } from './probes';

/** Smaller size probes (JSON up to 4 MiB, raw Binary 1 MiB): `--quick`, `?quick=true`. */
export const QUICK_SIZES = { json: [256 * 1024, 1024 * 1024, 4 * 1024 * 1024], raw: [1024 * 1024] };

const SILENT = { debug: () => undefined, warn: () => undefined };

/** Probes `destination` and reports; never throws for what the server does (only for bugs). */
export async function runDoctor(destination: Destination, opts: DoctorOptions = {}): Promise<DoctorReport> {
  const now = opts.now ?? Date.now;
  const env = opts.env ?? process.env;
  const checkedAt = new Date(now()).toISOString();
  const client = opts.client ?? createFhirClient(destination, { env, logger: SILENT, fetchImpl: opts.fetchImpl });
  const http = new ProbeHttp(client, opts.maxRequests ?? 60);
  const settings = destinationSettings(destination);
  const jsonCandidates = [settings.maxJsonBytes, serverProfileDefaults.medplum.maxJsonBytes].filter((n): n is number => n !== undefined);

  let facts: Facts | undefined;
  let cleanup: DoctorReport['cleanup'];
  try {
    facts = await runProbes(destination, http, {
      env,
      now,
      fetchImpl: opts.fetchImpl ?? fetch,
      jsonSizes: opts.sizes?.json ?? DEFAULT_JSON_SIZES,
      rawSizes: opts.sizes?.raw ?? DEFAULT_RAW_SIZES,
      jsonCandidates,
    });
  } finally {
    try {
      cleanup = await cleanupProbes(http, facts?.runId ?? '', 40);
    } catch (err) {
      cleanup = { deleted: 0, left: [...http.created.map((r) => `${r.type}/${r.id} (${describeError(err)})`), ...http.untracked] };
    }
  }

  const lines: Line[] = evaluate(facts, destination);
  const suggested = suggestSettings(facts, destination);
  const checks: DoctorCheck[] = lines.map(({ fix: _fix, ...c }) => c);

  if (opts.orphanedBinaries) {
    checks.push(await orphanLine(opts.orphanedBinaries));
  }
  checks.push(
    cleanup.left.length === 0
      ? { id: 'cleanup', label: 'Probe cleanup', status: 'ok', detail: `deleted ${cleanup.deleted} probe resource${cleanup.deleted === 1 ? '' : 's'}` }
      : {
          id: 'cleanup',
          label: 'Probe cleanup',
          status: 'warn',
          detail: `deleted ${cleanup.deleted}; could not delete ${cleanup.left.length}: ${cleanup.left.slice(0, 10).join(', ')}${cleanup.left.length > 10 ? ', …' : ''}`,
          advice: 'delete them at the centre: they are tagged https://referral-gateway.dev/fhir/CodeSystem/tags|referral-gateway-doctor (test data only)',
        }
  );

  return {
    destination: destination.id,
    baseUrl: client.baseUrl,
    checkedAt,
    canWork: !checks.some((c) => c.status === 'fail'),
    checks,
    suggested,
    cleanup,
  };
}

async function orphanLine(list: () => Promise<OrphanedBinary[]>): Promise<DoctorCheck> {
  const id = 'orphaned-binaries';
  const label = 'Unreferenced Binary uploads';
  try {
    const items = await list();
    if (items.length === 0) return { id, label, status: 'ok', detail: 'no raw Binary upload whose answer was lost' };
    const shown = items
      .slice(0, 5)
      .map((o) => `${o.referralId} document ${o.document} (since ${o.since})`)
      .join(', ');
    return {
      id,
      label,
      status: 'warn',
      detail: `possibly unreferenced Binary uploads (answer lost): ${items.length}: ${shown}${items.length > 5 ? ', …' : ''}`,
      advice: 'the centre may hold Binaries no DocumentReference points at; ask it to remove them once the referrals are delivered',
    };
  } catch (err) {
    return { id, label, status: 'warn', detail: `could not list them: ${describeError(err)}` };
  }
}
export { SETTINGS_KEYS } from './evaluate';
