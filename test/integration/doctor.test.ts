// The destination doctor against the real standalone sandbox in each server profile, the CLI and the
// admin route.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { dirname } from 'node:path';
import type { Destination } from '../../src/config/destinations';
import { DOCTOR_TAG_CODE, DOCTOR_TAG_SYSTEM, type DoctorOptions, type DoctorReport, QUICK_SIZES, formatDoctorTable, runDoctor } from '../../src/doctor';
import { type SandboxServer, startSandboxServer } from '../../src/sandbox/server';
import { SANDBOX_ID, sandboxDestination } from '../../src/sandbox';
import type { Gateway } from '../../src/gateway';
import { ADMIN_KEY, startGateway } from '../helpers/gateway';

jest.setTimeout(60_000);

const PROBE_TYPES = ['Patient', 'Task', 'DocumentReference', 'Binary'];

async function withSandbox<T>(profile: string, traits: string | undefined, fn: (sb: SandboxServer) => Promise<T>): Promise<T> {
  const sb = await startSandboxServer(0, { profile, traits });
  try {
    return await fn(sb);
  } finally {
    await sb.close();
  }
}

function destination(url: string, settings: Partial<Destination> = {}): Destination {
  return { ...sandboxDestination(url), ...settings };
}

async function doctor(
  profile: string,
  settings: Partial<Destination> = {},
  traits?: string,
  full = false,
  opts: DoctorOptions = {}
): Promise<{ report: DoctorReport; leftovers: string[] }> {
  return withSandbox(profile, traits, async (sb) => {
    const report = await runDoctor(destination(sb.url, settings), { ...(full ? {} : { sizes: QUICK_SIZES }), ...opts });
    return { report, leftovers: await leftovers(sb) };
  });
}

/** Probe resources still in the sandbox: every resource of the probed types (a fresh sandbox holds none of its own). */
async function leftovers(sb: SandboxServer): Promise<string[]> {
  const out: string[] = [];
  for (const type of PROBE_TYPES) {
    const bundle = await sb.repo.search({ resourceType: type as 'Patient', count: 1000 });
    for (const e of bundle.entry ?? []) out.push(`${type}/${e.resource?.id}`);
  }
  // and nothing tagged as a doctor probe, through the FHIR API
  for (const type of PROBE_TYPES.filter((t) => t !== 'Binary')) {
    const res = await fetch(`${sb.url}/${type}?_tag=${encodeURIComponent(`${DOCTOR_TAG_SYSTEM}|${DOCTOR_TAG_CODE}`)}`);
    const b = (await res.json()) as { total?: number };
    if (b.total) out.push(`${type} tagged ${DOCTOR_TAG_CODE}: ${b.total}`);
  }
  return out;
}

function statuses(r: DoctorReport): Record<string, string> {
  return Object.fromEntries(r.checks.map((c) => [c.id, c.status]));
}

function check(r: DoctorReport, id: string): DoctorReport['checks'][number] {
  const c = r.checks.find((x) => x.id === id);
  if (!c) throw new Error(`no line ${id}`);
  return c;
}

function failing(r: DoctorReport): string[] {
  return r.checks
    .filter((c) => c.status === 'fail')
    .map((c) => c.id)
    .sort();
}

describe('doctor against the sandbox profiles', () => {
  test('default sandbox, generic destination: every line ok or warn; the table; nothing left behind', async () => {
    const { report, leftovers: left } = await doctor('default', {}, undefined, true);
    expect(report.canWork).toBe(true);
    for (const c of report.checks) expect(['ok', 'warn']).toContain(c.status);
    expect(report.suggested).toEqual({});
    expect(report.cleanup.left).toEqual([]);
    expect(report.cleanup.deleted).toBeGreaterThan(10);
    expect(left).toEqual([]);
    expect(check(report, 'json-body').detail).toMatch(/up to 16 MiB/);
    expect(check(report, 'raw-binary-size').detail).toMatch(/up to 32 MiB/);

    const table = formatDoctorTable(report);
    for (const label of [
      'Server reachable',
      'TLS',
      'Authentication',
      'CapabilityStatement',
      'FHIR version',
      'Clock skew',
      'Transaction (urn:uuid refs)',
      'Transaction atomicity',
      'Prefer: return=minimal',
      'Conditional create (ifNoneExist)',
      'Conditional transaction of 9',
      '_lastUpdated search + _sort',
      '_tag search on Binary',
      'PUT creates (client ids)',
      'Client id form rg-<uuid>',
      'Largest JSON body',
      'Largest raw Binary',
      'Raw Binary read back',
      'Attachment URLs',
      'If-Match updates',
      'Task read/update',
      'Paging links',
      'Probe cleanup',
    ]) {
      expect(table).toMatch(new RegExp(`^ok\\s+${label.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s{2,}\\S`, 'm'));
    }
    expect(table).toContain('Result: the gateway CAN work with this destination as configured');
    // probe bodies and tokens never appear
    expect(table).not.toMatch(/Doctor Probe|"resourceType"/);
  });

  test('medplum sandbox, generic settings: the lines that break, their advice, profile medplum suggested', async () => {
    const { report, leftovers: left } = await doctor('medplum');
    expect(report.canWork).toBe(false);
    expect(failing(report)).toEqual(['atomicity', 'client-id-form', 'json-body', 'prefer-minimal', 'presigned-urls', 'update-as-create']);
    expect(check(report, 'prefer-minimal').advice).toMatch(/preferMinimal false.*profile medplum/);
    expect(check(report, 'json-body').advice).toMatch(/maxJsonBytes \d+/);
    expect(check(report, 'update-as-create').advice).toMatch(/clientIds false and binaryMode raw/);
    expect(check(report, 'client-id-form').advice).toMatch(/clientIds false and binaryMode raw/);
    expect(check(report, 'atomicity').detail).toMatch(/failed entry inside a 200/);
    expect(check(report, 'atomicity').advice).toMatch(/transactionMode resolve-first/);
    expect(check(report, 'presigned-urls').advice).toMatch(/presignedUrls true/);
    expect(check(report, 'concurrency').status).toBe('warn');
    expect(report.suggested).toEqual({ profile: 'medplum' });
    expect(left).toEqual([]);
  });

  test('medplum sandbox, profile medplum: the gateway can work', async () => {
    const { report, leftovers: left } = await doctor('medplum', { profile: 'medplum' });
    expect(failing(report)).toEqual([]);
    expect(report.canWork).toBe(true);
    expect(check(report, 'prefer-minimal').detail).toBe('server answers minimal with an empty body; preferMinimal is off');
    expect(check(report, 'presigned-urls').detail).toMatch(/fetched without credentials: HTTP 200, bytes identical; allowed by presignedUrls/);
    expect(report.suggested).toEqual({});
    expect(left).toEqual([]);
  });

  test('medplum with real transactions (strict isolation, 8 entries) and transactionMode conditional', async () => {
    const { report } = await doctor('medplum', { profile: 'medplum', transactionMode: 'conditional' }, 'nonAtomic=false,strictIsolationMaxEntries=8');
    expect(failing(report)).toEqual(['strict-isolation']);
    expect(check(report, 'strict-isolation').advice).toMatch(/set transactionMode resolve-first/);
    expect(check(report, 'atomicity').status).toBe('ok');
    expect(report.suggested).toEqual({ transactionMode: 'resolve-first' });
  });

  test('hapi sandbox, generic settings: opaque paging and 409 on a stale If-Match reported; the gateway can work', async () => {
    const orphanedBinaries = async (): Promise<Array<{ referralId: string; document: number; since: string }>> => [
      { referralId: 'ref_01ORPHAN', document: 2, since: '2026-01-02T03:04:05.000Z' },
    ];
    const { report, leftovers: left } = await doctor('hapi', {}, undefined, false, { orphanedBinaries });
    expect(report.canWork).toBe(true);
    expect(check(report, 'paging').status).toBe('ok');
    expect(check(report, 'paging').detail).toMatch(/opaque/);
    expect(check(report, 'if-match').status).toBe('ok');
    expect(check(report, 'if-match').detail).toMatch(/409 Conflict/);
    expect(check(report, 'client-id-form').detail).toMatch(/purely numeric ids are refused/);
    expect(check(report, 'orphaned-binaries')).toMatchObject({ status: 'warn' });
    expect(check(report, 'orphaned-binaries').detail).toMatch(/possibly unreferenced Binary uploads \(answer lost\): 1: ref_01ORPHAN document 2/);
    expect(left).toEqual([]);
  });

  test('client-credentials: the token is obtained and its granted scopes shown; the token itself never', async () => {
    const token = 'tok-never-printed-0123456789';
    const server = createServer((_req, res) => {
      res.setHeader('Content-Type', 'application/json');
      res.end(JSON.stringify({ access_token: token, token_type: 'bearer', expires_in: 300, scope: 'system/Patient.cu system/Task.cruds' }));
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    try {
      const tokenUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/token`;
      const auth = {
        type: 'client-credentials' as const,
        tokenUrl,
        clientIdEnv: 'DOC_CLIENT_ID',
        clientSecretEnv: 'DOC_CLIENT_SECRET',
        scope: 'system/Patient.cu system/Task.cruds system/Binary.c',
      };
      const { report } = await doctor('default', { auth }, undefined, false, { env: { DOC_CLIENT_ID: 'gateway', DOC_CLIENT_SECRET: 'secret-0003' } });
      const line = check(report, 'auth');
      expect(line.status).toBe('warn');
      expect(line.detail).toMatch(/token obtained \(expires in 300 s\); granted scopes: system\/Patient.cu system\/Task.cruds; not granted: system\/Binary.c/);
      expect(JSON.stringify(report)).not.toContain(token);
      expect(formatDoctorTable(report)).not.toContain(token);
    } finally {
      server.close();
    }
  });
});

describe('each medplum trait switched off changes exactly its line to ok', () => {
  // The sandbox answers `_tag` searches on Binary in no profile (its search definitions have no _tag for
  // Binary), so switching noBinarySearch off can only change that line where the default sandbox allows it.
  let binaryTagSearch = false;
  beforeAll(async () => {
    binaryTagSearch = await withSandbox('default', undefined, async (sb) => (await fetch(`${sb.url}/Binary?_tag=a%7Cb`)).ok);
  });

  const conditionalBinaries: Partial<Destination> = { binaryMode: 'conditional-create' };
  const rows: Array<{ trait: string; base?: string; settings?: Partial<Destination>; lines: string[] | (() => string[]) }> = [
    { trait: 'maxJsonBytes=none', lines: ['json-body'] },
    { trait: 'emptyMinimal=false', lines: ['prefer-minimal'] },
    { trait: 'nonAtomic=false', lines: ['atomicity'] },
    { trait: 'concurrentConflict=false', lines: ['concurrency'] },
    { trait: 'uuidIdsOnly=false', lines: ['client-id-form'] },
    // uuidIdsOnly alone already refuses update-as-create: compare with it off
    { trait: 'noUpdateAsCreate=false', base: 'uuidIdsOnly=false', lines: ['update-as-create'] },
    { trait: 'presignedBinaryUrls=false', lines: ['presigned-urls'] },
    { trait: 'noBinarySearch=false', settings: conditionalBinaries, lines: () => (binaryTagSearch ? ['binary-tag-search'] : []) },
  ];
  const baselines = new Map<string, Promise<DoctorReport>>();
  const baseline = (traits: string | undefined, settings: Partial<Destination>): Promise<DoctorReport> => {
    const key = `${traits ?? ''}|${JSON.stringify(settings)}`;
    if (!baselines.has(key)) {
      baselines.set(
        key,
        doctor('medplum', settings, traits).then((r) => r.report)
      );
    }
    return baselines.get(key) as Promise<DoctorReport>;
  };

  test.each(rows)('$trait', async ({ trait, base, settings = {}, lines }) => {
    const before = await baseline(base, settings);
    const { report: after } = await doctor('medplum', settings, [base, trait].filter(Boolean).join(','));
    const expected = typeof lines === 'function' ? lines() : lines;
    const a = statuses(before);
    const b = statuses(after);
    const changed = Object.keys(a)
      .filter((id) => a[id] !== b[id])
      .sort();
    expect(changed).toEqual([...expected].sort());
    for (const id of expected) {
      expect(a[id]).not.toBe('ok');
      expect(b[id]).toBe('ok');
    }
  });
});

describe('doctor CLI', () => {
  const env = (extra: Record<string, string>): NodeJS.ProcessEnv => {
    const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(FHIR_|SANDBOX_|DESTINATIONS_FILE$|API_KEYS$|ADMIN_API_KEY$)/.test(k)));
    return {
      ...clean,
      PATH: `${dirname(process.execPath)}:${process.env.PATH ?? ''}`,
      NODE_ENV: 'test',
      LOG_LEVEL: 'error',
      DESTINATIONS_FILE: 'test/does-not-exist.json',
      ...extra,
    };
  };
  const run = (args: string[], extra: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve, reject) => {
      const child = spawn('node_modules/.bin/tsx', ['src/cli/doctor.ts', ...args], { env: env(extra), stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.once('error', reject);
      child.once('close', (code) => resolve({ code, stdout, stderr }));
    });

  test('exit 0 with --json when the settings fit, 1 with the table when they do not, 2 for an unknown destination', async () => {
    const [fits, breaks, unknown, badConfig] = await Promise.all([
      run(['--json', '--quick'], { SANDBOX_PROFILE: 'medplum', FHIR_PROFILE: 'medplum' }),
      run(['--quick'], { SANDBOX_PROFILE: 'medplum' }),
      run(['no-such-centre'], {}),
      run([], { FHIR_BASE_URL: 'not a url' }),
    ]);
    expect(fits.code).toBe(0);
    const report = JSON.parse(fits.stdout) as DoctorReport;
    expect(report.destination).toBe(SANDBOX_ID);
    expect(report.canWork).toBe(true);

    expect(breaks.code).toBe(1);
    expect(breaks.stdout).toMatch(/^FAIL\s+Prefer: return=minimal\s+/m);
    expect(breaks.stdout).toMatch(/→ set preferMinimal false \(or profile medplum\)/);
    expect(breaks.stdout).toContain('Suggested settings for this destination: {"profile":"medplum"}');

    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/unknown destination "no-such-centre"; known destinations: sandbox/);
    expect(unknown.stdout).toBe('');

    expect(badConfig.code).toBe(2);
    expect(badConfig.stderr.trim().split('\n')).toHaveLength(1);
    expect(badConfig.stderr).toMatch(/FHIR_BASE_URL/);
  });
});

describe('GET /admin/destinations/:id/doctor', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway();
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('200 with the report for the admin key, 401 without, 404 for an unknown destination', async () => {
    const url = `${gw.url}/admin/destinations/${SANDBOX_ID}/doctor?quick=true`;
    const ok = await fetch(url, { headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    expect(ok.status).toBe(200);
    const report = (await ok.json()) as DoctorReport;
    expect(report.destination).toBe(SANDBOX_ID);
    expect(report.canWork).toBe(true);
    expect(report.checks.find((c) => c.id === 'transaction')?.status).toBe('ok');
    expect(report.cleanup.left).toEqual([]);

    expect((await fetch(url)).status).toBe(401);

    const missing = await fetch(`${gw.url}/admin/destinations/no-such-centre/doctor`, { headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as { resourceType?: string }).resourceType).toBe('OperationOutcome');
  });
});
