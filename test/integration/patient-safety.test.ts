// Patient safety at the centre (issue 10 point 11): a referral whose identifier matches a Patient the centre
// already holds with a different birth date, sex or family name is never silently attached to it. With the
// default `patientMismatch: hold` nothing is written and the referral is delivery-failed with a reason that
// names the fields (not their values); with `new-patient` it is sent with a Patient of its own. Run on every
// sandbox server profile (conditional transactions on default and hapi, resolve-first on medplum and strict).
import type { StoredReferral } from '../../src/model';
import type { Bundle, Patient, Resource, ServiceRequest } from '@medplum/fhirtypes';
import { demographicDifferences, describeFields, normaliseName } from '../../src/destinations/fhir/patient-match';
import { startSandboxServer } from '../../src/sandbox/server';
import type { SandboxServer } from '../../src/sandbox/server';
import type { Gateway } from '../../src/gateway';
import { logger } from '../../src/observability/logger';
import { ADMIN_KEY, eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { LogCapture } from '../helpers/log-capture';
import { deliveryQueue, getReferral, leasedQueue, referralHistory } from '../../src/store';

const SYSTEM = 'http://hospital-a.example.org/mrn';
const MRN = 'MRN-X-4711';
const SMITH = { name: { given: ['Annabel'], family: 'Smith' }, birthDate: '1970-01-01', gender: 'female' };
const JONES = { name: { given: ['Bartholomew'], family: 'Jones' }, birthDate: '1980-05-05', gender: 'male' };
const JONES_EMAIL = 'bartholomew.jones@example.org';
const SMITH_EMAIL = 'annabel.smith@example.org';

/** The patient data of this file that must never reach a log line. */
const PHI = [SMITH.name.family, JONES.name.family, ...SMITH.name.given, ...JONES.name.given, SMITH.birthDate, JONES.birthDate, MRN, JONES_EMAIL, SMITH_EMAIL];

function body(externalId: string, who: typeof SMITH, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const f = fixture();
  return {
    ...f,
    externalId,
    patient: { identifiers: [{ system: SYSTEM, value: MRN }], ...who, email: who === SMITH ? SMITH_EMAIL : JONES_EMAIL },
    ...extra,
  };
}

async function submit(gw: Gateway, key: string, b: Record<string, unknown>): Promise<string> {
  const res = await fetch(`${gw.url}/referrals`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(b),
  });
  expect(res.status).toBe(202);
  return ((await res.json()) as { id: string }).id;
}

async function settled(gw: Gateway, id: string): Promise<StoredReferral> {
  return eventually(async () => {
    const r = await getReferral(gw.db, id, { payload: false });
    return r && (r.status === 'sent' || r.status === 'delivery-failed') ? r : undefined;
  }, 20_000);
}

async function search<T extends Resource>(sandbox: SandboxServer, query: string): Promise<T[]> {
  const res = await fetch(`${sandbox.url}/${query}${query.includes('?') ? '&' : '?'}_count=1000`, { headers: { Accept: 'application/fhir+json' } });
  expect(res.status).toBe(200);
  return ((await res.json()) as Bundle<T>).entry?.map((e) => e.resource as T) ?? [];
}

const PROFILES: Array<[sandbox: string, destination: string, mode: string]> = [
  ['default', 'generic', 'conditional'],
  ['hapi', 'hapi', 'conditional'],
  ['medplum', 'medplum', 'resolve-first'],
  ['strict', 'medplum', 'resolve-first'],
];

describe.each(PROFILES)('on the %s sandbox (destination profile %s, %s transactions)', (sandboxProfile, destinationProfile) => {
  const capture = new LogCapture({ level: 'silly' });
  let sandbox: SandboxServer;
  const gateways: Gateway[] = [];

  async function gateway(mismatch?: 'hold' | 'new-patient'): Promise<Gateway> {
    const gw = await startGateway({
      FHIR_BASE_URL: sandbox.url,
      FHIR_PROFILE: destinationProfile,
      ...(mismatch ? { FHIR_PATIENT_MISMATCH: mismatch } : {}),
      LOG_LEVEL: 'silly',
    });
    gateways.push(gw);
    return gw;
  }

  beforeAll(() => {
    logger.level = 'silly';
    logger.add(capture);
    for (const t of logger.transports) if (t !== capture) t.silent = true;
  });
  beforeEach(async () => {
    sandbox = await startSandboxServer(0, { profile: sandboxProfile });
    capture.lines = [];
  });
  afterEach(async () => {
    // No patient data in any log line of the scenario, at level silly.
    const all = capture.lines.join('\n');
    expect(capture.lines.length).toBeGreaterThan(3);
    for (const s of PHI) expect(all).not.toContain(s);
    for (const gw of gateways.splice(0)) await gw.stop();
    await sandbox.close();
  });
  afterAll(() => {
    for (const t of logger.transports) t.silent = false;
    logger.remove(capture);
    logger.level = 'error';
  });

  test("hold (default): b's referral with a's identifier and other demographics is delivery-failed and writes nothing; a's resend still links to a's Patient", async () => {
    const gw = await gateway();
    const a = await settled(gw, await submit(gw, KEY_A, body('A-1', SMITH)));
    expect(a.status).toBe('sent');
    const aPatient = a.fhir?.patient;
    expect(aPatient).toMatch(/^Patient\//);
    const binaryRequestsBefore = sandbox.stats.byType.Binary ?? 0;

    // b's referral carries a 2 MB scan as well: on a raw-upload profile it would be uploaded before the transaction.
    const scan = {
      kind: 'pathology-report',
      title: 'Slide scan',
      contentType: 'application/pdf',
      data: Buffer.alloc(2 * 1024 * 1024, 0x25).toString('base64'),
    };
    const bBody = body('B-1', JONES);
    const bId = await submit(gw, KEY_B, { ...bBody, documents: [...(bBody.documents as unknown[]), scan] });
    const b = await settled(gw, bId);
    expect(b.status).toBe('delivery-failed');
    expect(b.statusReason).toBe(
      "the centre's Patient with this identifier has a different birth date, sex and family name; check the identifier (or set patientMismatch: new-patient)"
    );
    expect(b.fhir?.serviceRequest).toBeUndefined();
    // A permanent failure: one attempt, the entry dead-lettered (an operator re-queues it).
    const [entry] = await leasedQueue.forReferral(gw.db, deliveryQueue, bId);
    expect(entry.state).toBe('failed');
    expect(entry.attempts).toBe(1);

    // The centre: one Patient with the identifier, still a's; one ServiceRequest, a's; nothing of b's.
    const withMrn = await search<Patient>(sandbox, `Patient?identifier=${SYSTEM}|${MRN}`);
    expect(withMrn).toHaveLength(1);
    expect(`Patient/${withMrn[0].id}`).toBe(aPatient);
    expect(withMrn[0]).toMatchObject({ birthDate: SMITH.birthDate, gender: SMITH.gender, name: [{ family: SMITH.name.family }] });
    expect(await search(sandbox, 'Patient')).toHaveLength(1);
    const requests = await search<ServiceRequest>(sandbox, 'ServiceRequest');
    expect(requests).toHaveLength(1);
    expect(requests[0].subject?.reference).toBe(aPatient);
    // Not even the scan: no raw Binary upload reached the centre.
    expect(sandbox.stats.byType.Binary ?? 0).toBe(binaryRequestsBefore);

    // An operator re-queues it without fixing anything: held again, for the same reason.
    const retry = await fetch(`${gw.url}/admin/deliveries/${bId}/retry`, { method: 'POST', headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    expect(retry.status).toBe(202);
    const again = await eventually(async () => {
      const r = await getReferral(gw.db, bId, { payload: false });
      const failures = (await referralHistory(gw.db, bId)).filter((h) => h.status === 'delivery-failed');
      return r?.status === 'delivery-failed' && failures.length === 2 ? r : undefined;
    }, 20_000);
    expect(again.statusReason).toBe(b.statusReason);
    expect(await search(sandbox, 'ServiceRequest')).toHaveLength(1);

    // a's next referral for the same patient (same demographics, name written differently) links to a's Patient.
    const a2 = await settled(gw, await submit(gw, KEY_A, body('A-2', { ...SMITH, name: { given: SMITH.name.given, family: 'SMITH' } })));
    expect(a2.status).toBe('sent');
    expect(a2.fhir?.patient).toBe(aPatient);
    expect(await search(sandbox, 'Patient')).toHaveLength(1);
  });

  test("new-patient: b's referral is sent with a Patient of its own; a's Patient keeps its identifier to itself; b's next referral reuses b's Patient", async () => {
    const gw = await gateway('new-patient');
    const a = await settled(gw, await submit(gw, KEY_A, body('A-1', SMITH)));
    expect(a.status).toBe('sent');
    const bId = await submit(gw, KEY_B, body('B-1', JONES));
    const b = await settled(gw, bId);
    expect(b.status).toBe('sent');
    expect(b.fhir?.patient).toMatch(/^Patient\//);
    expect(b.fhir?.patient).not.toBe(a.fhir?.patient);

    // a's Patient is the only one found by the identifier, unchanged; b's holds b's demographics.
    const withMrn = await search<Patient>(sandbox, `Patient?identifier=${SYSTEM}|${MRN}`);
    expect(withMrn.map((p) => `Patient/${p.id}`)).toEqual([a.fhir?.patient]);
    expect(withMrn[0]).toMatchObject({ birthDate: SMITH.birthDate, gender: SMITH.gender, name: [{ family: SMITH.name.family }] });
    const bPatientId = b.fhir?.patient?.split('/')[1];
    const bPatient = (await search<Patient>(sandbox, `Patient?_id=${bPatientId}`))[0];
    expect(bPatient).toMatchObject({ birthDate: JONES.birthDate, gender: JONES.gender, name: [{ family: JONES.name.family }] });
    // The sender's identifier stays readable, scoped to the sender.
    expect(bPatient.identifier).toEqual([
      expect.objectContaining({ system: 'https://referral-gateway.dev/fhir/sid/client/other-clinic/patient', value: `${SYSTEM} ${MRN}` }),
    ]);
    const bRequest = await search<ServiceRequest>(sandbox, `ServiceRequest?subject=Patient/${bPatientId}`);
    expect(bRequest).toHaveLength(1);

    // The referral's history says so; a warning was logged (without patient data: see afterEach).
    const history = await referralHistory(gw.db, bId);
    expect(history.map((h) => h.reason)).toContain(
      "the centre's Patient with this identifier has a different birth date, sex and family name; the referral was linked to a new Patient for this sender's identifier instead (patientMismatch: new-patient)"
    );
    expect(capture.lines.some((l) => l.includes('"level":"warn"') && l.includes('patientMismatch: new-patient') && l.includes(bId))).toBe(true);

    // b's next referral for the same patient: the Patient made for it is reused, not another one created.
    const b2 = await settled(gw, await submit(gw, KEY_B, body('B-2', JONES)));
    expect(b2.status).toBe('sent');
    expect(b2.fhir?.patient).toBe(b.fhir?.patient);
    expect(await search(sandbox, 'Patient')).toHaveLength(2);
    // ...and a's own next referral still links to a's (the centre does not hold the identifier twice).
    const a2 = await settled(gw, await submit(gw, KEY_A, body('A-2', SMITH)));
    expect(a2.status).toBe('sent');
    expect(a2.fhir?.patient).toBe(a.fhir?.patient);
  });
});

describe('the comparison rules', () => {
  const p = (x: Partial<Patient>): Patient => ({ resourceType: 'Patient', ...x });

  test('a value missing on either side, or sex unknown, is not a difference', () => {
    expect(demographicDifferences(p({}), p({ birthDate: '1970-01-01', gender: 'female', name: [{ family: 'Smith' }] }))).toEqual([]);
    expect(
      demographicDifferences(
        p({ birthDate: '1970-01-01', gender: 'unknown', name: [{ given: ['A'] }] }),
        p({ birthDate: '1970-01-01', gender: 'male', name: [{ family: 'Smith' }] })
      )
    ).toEqual([]);
  });

  test('birth dates agree at the precision both have', () => {
    expect(demographicDifferences(p({ birthDate: '1970' }), p({ birthDate: '1970-01-01' }))).toEqual([]);
    expect(demographicDifferences(p({ birthDate: '1970-02' }), p({ birthDate: '1970-01-01' }))).toEqual(['birthDate']);
    expect(demographicDifferences(p({ birthDate: '1970-01-02' }), p({ birthDate: '1970-01-01' }))).toEqual(['birthDate']);
  });

  test('family names compare without case, diacritics, spaces or punctuation, against any of the centre names', () => {
    expect(normaliseName("O'Brien-Müller")).toBe(normaliseName('obrien muller'));
    expect(normaliseName('Straße')).toBe(normaliseName('STRASSE'));
    expect(demographicDifferences(p({ name: [{ family: 'García' }] }), p({ name: [{ family: 'GARCIA' }] }))).toEqual([]);
    expect(
      demographicDifferences(
        p({
          name: [
            { use: 'official', family: 'Jones' },
            { use: 'maiden', family: 'Smith' },
          ],
        }),
        p({ name: [{ family: 'smith' }] })
      )
    ).toEqual([]);
    expect(demographicDifferences(p({ name: [{ family: 'Smyth' }] }), p({ name: [{ family: 'Smith' }] }))).toEqual(['family']);
  });

  test('the reason names fields, never values', () => {
    expect(describeFields(['family', 'birthDate'])).toBe('birth date and family name');
    expect(describeFields(['gender'])).toBe('sex');
  });
});
