import { readFileSync } from 'node:fs';
import type { Gateway } from '../../src/gateway';
import { sendMllp } from '../../src/intake';
import { logger } from '../../src/observability/logger';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { LogCapture } from '../helpers/log-capture';
import { getReferral } from '../../src/store';

/** Logs are structured JSON with a correlation id, and carry no patient names, birth dates or identifiers at any level. */
describe('logs', () => {
  let gw: Gateway;
  const capture = new LogCapture({ level: 'silly' });

  beforeAll(async () => {
    gw = await startGateway({ LOG_LEVEL: 'silly', HL7_MLLP_PORT: '0', HL7_MLLP_CLIENT: 'city-hospital' });
    logger.level = 'silly';
    logger.add(capture);
    // The capture reads every line; the console stays quiet so the test run's output stays readable.
    for (const t of logger.transports) if (t !== capture) t.silent = true;
  });
  afterAll(async () => {
    for (const t of logger.transports) t.silent = false;
    logger.remove(capture);
    logger.level = 'error';
    await gw.stop();
  });

  test('a whole submission, delivery, bad request and poll at level silly log no patient data', async () => {
    const body = fixture();
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', 'X-Request-Id': 'corr-test-1' },
      body: JSON.stringify(body),
    });
    expect(res.status).toBe(202);
    const { id } = (await res.json()) as { id: string };
    await eventually(async () => (await getReferral(gw.db, id))?.status === 'sent');
    const bad = { ...body, externalId: 'EHR-BAD', patient: { ...body.patient, birthDate: '1968-02-31' } };
    const badRes = await fetch(`${gw.url}/referrals?mrn=${body.patient.identifiers[0].value}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(bad),
    });
    expect(badRes.status).toBe(422);
    await gw.poller.pollOnce();

    const all = capture.lines.join('\n');
    expect(capture.lines.length).toBeGreaterThan(3);
    const secrets = [
      body.patient.name.family,
      ...body.patient.name.given,
      body.patient.birthDate,
      '1968-02-31',
      ...body.patient.identifiers.map((i: { value: string }) => i.value),
      body.patient.email,
      body.patient.phone,
      body.referrer.practitioner.name.family,
    ].filter(Boolean);
    for (const s of secrets) {
      expect(all).not.toContain(s);
    }
    // Every line is JSON; request lines carry the correlation id.
    for (const line of capture.lines) expect(() => JSON.parse(line)).not.toThrow();
    expect(capture.lines.some((l) => l.includes('"correlationId":"corr-test-1"'))).toBe(true);
  });

  test('HL7 v2 (over HTTP and MLLP, accepted and refused) and FHIR bundle intake log no patient data either', async () => {
    const v2 = readFileSync('fixtures/hl7v2/ref-i12-sarcoma-crlf.hl7', 'utf8');
    const ok = await fetch(`${gw.url}/hl7/v2`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'x-application/hl7-v2+er7' },
      body: v2,
    });
    expect(await ok.text()).toMatch(/MSA\|AA/);
    const bad = v2.replace('UH-0981-01', 'UH-0981-02').replace('|19890527|', '|19891327|');
    expect((await sendMllp('127.0.0.1', gw.mllp?.port as number, bad)).toString()).toMatch(/MSA\|AE/);
    const bundle = readFileSync('fixtures/fhir-intake/colorectal-second-opinion.collection.json', 'utf8');
    const fhir = await fetch(`${gw.url}/fhir/R4/Bundle`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/fhir+json' },
      body: bundle,
    });
    expect(fhir.status).toBe(201);
    const patient = (JSON.parse(bundle) as { entry: Array<{ resource: Record<string, any> }> }).entry.find(
      (e) => e.resource.resourceType === 'Patient'
    )?.resource;
    const all = capture.lines.join('\n');
    const secrets = [
      'Nowak',
      'Tomasz',
      '19890527',
      '1989-05-27',
      'MRN-5530',
      patient?.name?.[0]?.family,
      patient?.birthDate,
      patient?.identifier?.[0]?.value,
    ].filter((x): x is string => typeof x === 'string');
    expect(secrets.length).toBeGreaterThan(6);
    for (const s of secrets) expect(all).not.toContain(s);
  });
});
