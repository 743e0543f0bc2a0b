/**
 * Regenerates the expected bundles in fixtures/fhir/ from the referrals in fixtures/referrals/.
 *
 *   npx tsx src/mapping/regenerate-fixtures.ts          # write
 *   npx tsx src/mapping/regenerate-fixtures.ts --check  # exit 1 if any bundle would change
 *
 * Review the diff by eye before committing: these files are the golden output of the mapper.
 */
import { readdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Bundle } from '@medplum/fhirtypes';
import type { Destination } from '../config';
import { referralSchema } from '../model';
import { mapReferralToBundle } from './bundle';
import { checkCodes } from './codes';
import { routeReferral } from './routing';
import { validateBundle } from './validate';

export const FIXTURE_CREATED_AT = '2026-10-01T09:00:00.000Z';
export const FIXTURE_CLIENT_ID = 'dev';

export const FIXTURE_DESTINATION: Destination = {
  id: 'sandbox',
  name: 'Sandbox cancer centre',
  organization: { system: 'https://referral-gateway.dev/fhir/sid/destination', value: 'sandbox' },
  baseUrl: 'http://localhost:8080/sandbox/fhir/R4',
  auth: { type: 'none' },
  timeoutMs: 30000,
  maxInlineBytes: 1048576,
};

export const FIXTURES_DIR = resolve(__dirname, '../../fixtures');

export function fixtureNames(): string[] {
  return readdirSync(join(FIXTURES_DIR, 'referrals'))
    .filter((f) => f.endsWith('.json'))
    .map((f) => f.slice(0, -'.json'.length))
    .sort();
}

/** Parses a fixture referral and maps it exactly as the golden tests do. */
export function bundleForFixture(name: string): Bundle {
  const raw: unknown = JSON.parse(readFileSync(join(FIXTURES_DIR, 'referrals', `${name}.json`), 'utf8'));
  const referral = referralSchema.parse(raw);
  const issues = checkCodes(referral);
  if (issues.length > 0) {
    throw new Error(`${name}: ${issues.map((i) => `${i.path}: ${i.message}`).join('; ')}`);
  }
  const route = routeReferral(referral, [FIXTURE_DESTINATION.id]);
  if (route?.destination !== FIXTURE_DESTINATION.id) {
    throw new Error(`${name}: routing did not choose ${FIXTURE_DESTINATION.id}`);
  }
  return mapReferralToBundle({
    referralId: `ref_fixture_${name}`,
    clientId: FIXTURE_CLIENT_ID,
    referral,
    destination: FIXTURE_DESTINATION,
    createdAt: FIXTURE_CREATED_AT,
    specialty: route.specialty,
  });
}

export function bundlePath(name: string): string {
  return join(FIXTURES_DIR, 'fhir', `${name}.bundle.json`);
}

function main(): void {
  const check = process.argv.includes('--check');
  let changed = 0;
  for (const name of fixtureNames()) {
    const bundle = bundleForFixture(name);
    const issues = validateBundle(bundle);
    if (issues.length > 0) {
      throw new Error(`${name}: bundle does not validate: ${issues.map((i) => `${i.path}: ${i.message}`).join('; ')}`);
    }
    const text = `${JSON.stringify(bundle, null, 2)}\n`;
    const path = bundlePath(name);
    const before = existsSync(path) ? readFileSync(path, 'utf8') : undefined;
    let outcome = 'unchanged';
    if (before !== text) {
      changed++;
      outcome = check ? 'WOULD CHANGE' : 'written';
      if (!check) {
        writeFileSync(path, text);
      }
    }
    console.log(`${outcome}  ${path}  (${bundle.entry?.length ?? 0} entries)`);
  }
  if (check && changed > 0) {
    process.exitCode = 1;
  }
}

if (require.main === module) {
  main();
}
