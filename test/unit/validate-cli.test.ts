// The offline validator (src/cli/validate.ts) run as a real process, as `npm run validate` runs it.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Bundle, ServiceRequest } from '@medplum/fhirtypes';

const ROOT = resolve(__dirname, '../..');
const FIXTURE = 'fixtures/referrals/breast-second-opinion.json';

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'rg-validate-cli-'));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI with no destinations configured, so the gateway's built-in 'sandbox' one is used. */
function run(args: string[], env: Record<string, string> = {}): Run {
  const { FHIR_BASE_URL: _base, DESTINATIONS_FILE: _file, ...inherited } = process.env;
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/validate.ts', ...args], {
    cwd: ROOT,
    encoding: 'utf8',
    env: { ...inherited, NODE_ENV: 'test', DESTINATIONS_FILE: join(dir, 'no-destinations.json'), ...env },
    timeout: 60_000,
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function fixture(): Record<string, any> {
  return JSON.parse(readFileSync(join(ROOT, FIXTURE), 'utf8')) as Record<string, any>;
}

function writeTmp(name: string, value: unknown): string {
  const path = join(dir, name);
  writeFileSync(path, typeof value === 'string' ? value : JSON.stringify(value, null, 2));
  return path;
}

/** The `error <path>: ...` lines of stderr, as paths. */
function errorPaths(stderr: string): string[] {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('error '))
    .map((l) => l.slice('error '.length, l.indexOf(': ')));
}

jest.setTimeout(120_000);

describe('npm run validate', () => {
  test('a valid referral: exit 0, the transaction Bundle on stdout, a summary on stderr', () => {
    const r = run([FIXTURE]);
    expect(r.stderr).not.toMatch(/^error /m);
    expect(r.status).toBe(0);
    const bundle = JSON.parse(r.stdout) as Bundle;
    expect(bundle.resourceType).toBe('Bundle');
    expect(bundle.type).toBe('transaction');
    expect(bundle.entry?.length).toBeGreaterThan(5);
    for (const e of bundle.entry ?? []) {
      expect(e.fullUrl).toMatch(/^urn:uuid:/);
      expect(e.request?.method).toBe('POST');
      expect(e.resource?.resourceType).toBeTruthy();
    }
    const types = (bundle.entry ?? []).map((e) => e.resource?.resourceType);
    expect(types).toEqual(expect.arrayContaining(['Patient', 'Condition', 'ServiceRequest', 'Task']));
    // Mapped with the CLI's own referral id and client, routed to the built-in sandbox centre.
    expect(r.stdout).toContain('ref_validate');
    const sr = bundle.entry?.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as ServiceRequest;
    expect(sr.performerType?.text).toBe('Breast oncology');
    expect(r.stderr).toMatch(new RegExp(`^${FIXTURE}: valid, destination sandbox\\b.*${bundle.entry?.length} entries`, 'm'));
  });

  test('--quiet prints no bundle; several files are all checked and summed up', () => {
    const r = run(['--quiet', FIXTURE, 'fixtures/referrals/lung-expert-opinion.json']);
    expect(r.status).toBe(0);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^2 files: 2 valid, 0 invalid$/m);
  });

  test('schema errors: exit 1, every offending path named, no bundle', () => {
    const bad = fixture();
    bad.patient.birthDate = '1968-02-30'; // not a calendar date
    delete bad.referrer.organization.name; // required
    bad.kind = 'third-opinion'; // not one of the codes
    bad.patient.identifiers[0].value = ''; // empty
    const file = writeTmp('bad-schema.json', bad);
    const r = run([file]);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(errorPaths(r.stderr).sort()).toEqual(['kind', 'patient.birthDate', 'patient.identifiers[0].value', 'referrer.organization.name']);
    expect(r.stderr).toMatch(/^error patient\.birthDate: .*date/m);
    expect(r.stderr).toMatch(/^error kind: .*second-opinion/m);
    expect(r.stderr).toContain(`${file}: INVALID, 4 errors (schema check)`);
  });

  test('unknown codes in a schema-valid referral: exit 1, reported by the code check with their paths', () => {
    const bad = fixture();
    bad.diagnosis.code.code = 'Z99.9'; // ICD-10-CM, but not a cancer code
    bad.diagnosis.stage.value = 'IIZ'; // no such AJCC stage group
    const file = writeTmp('bad-codes.json', bad);
    const r = run([file, '--quiet']);
    expect(r.status).toBe(1);
    expect(errorPaths(r.stderr).sort()).toEqual(['diagnosis.code.code', 'diagnosis.stage.value']);
    expect(r.stderr).toMatch(/^error diagnosis\.code\.code: "Z99\.9" is not an ICD-10-CM malignant/m);
    expect(r.stderr).toContain('(codes check)');
  });

  test('a referral naming an unknown destination fails routing, as intake does', () => {
    const bad = fixture();
    bad.destination = 'nowhere';
    const r = run([writeTmp('bad-destination.json', bad)]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^error destination: unknown destination "nowhere" \(known: sandbox\)$/m);
  });

  test('a file that is not JSON is invalid (exit 1), and the other files are still checked', () => {
    const r = run([writeTmp('not-json.json', '{"externalId": '), FIXTURE, '--quiet']);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^error \$: not valid JSON/m);
    expect(r.stderr).toMatch(/^2 files: 1 valid, 1 invalid$/m);
  });

  test('a missing file: exit 2, named on stderr, even next to a valid one', () => {
    const missing = join(dir, 'does-not-exist.json');
    const r = run([missing, FIXTURE, '--quiet']);
    expect(r.status).toBe(2);
    expect(r.stderr).toContain(`${missing}: cannot read file`);
    expect(r.stderr).toMatch(/1 valid, 0 invalid, 1 unreadable/);
  });

  test('usage errors: exit 2', () => {
    expect(run([]).status).toBe(2);
    const unknownOption = run(['--frobnicate', FIXTURE]);
    expect(unknownOption.status).toBe(2);
    expect(unknownOption.stderr).toMatch(/unknown option --frobnicate/);
    const unknownDestination = run([FIXTURE, '--destination', 'nowhere']);
    expect(unknownDestination.status).toBe(2);
    expect(unknownDestination.stderr).toMatch(/--destination nowhere is not configured \(known: sandbox\)/);
  });

  test('destinations come from the configuration; --destination chooses among them', () => {
    const destinationsFile = writeTmp('destinations.json', {
      destinations: [
        { id: 'centre-a', name: 'Centre A', organization: { system: 'urn:test', value: 'a' }, baseUrl: 'https://a.example.org/fhir' },
        { id: 'centre-b', name: 'Centre B', organization: { system: 'urn:test', value: 'b' }, baseUrl: 'https://b.example.org/fhir' },
      ],
    });
    // Two centres and no routing rule naming them: the referral must name one.
    const unrouted = run([FIXTURE, '--quiet'], { DESTINATIONS_FILE: destinationsFile });
    expect(unrouted.status).toBe(1);
    expect(unrouted.stderr).toMatch(/^error destination: no routing rule matches/m);

    const routed = run([FIXTURE, '--destination', 'centre-b'], { DESTINATIONS_FILE: destinationsFile });
    expect(routed.status).toBe(0);
    expect(routed.stderr).toMatch(/valid, destination centre-b\b/);
    const bundle = JSON.parse(routed.stdout) as Bundle;
    const sr = bundle.entry?.find((e) => e.resource?.resourceType === 'ServiceRequest')?.resource as ServiceRequest;
    expect(sr.performer?.[0]?.display).toBe('Centre B');
  });

  test('bad configuration is reported, not a crash: exit 2', () => {
    const r = run([FIXTURE], { DESTINATIONS_FILE: writeTmp('broken-destinations.json', '{ nope') });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/configuration error: DESTINATIONS_FILE .* not valid JSON/);
  });
});
