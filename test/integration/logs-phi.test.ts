import type { Gateway } from '../../src/gateway';
import { logger } from '../../src/observability/logger';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { LogCapture } from '../helpers/log-capture';
import { getReferral } from '../../src/store';

/** Logs are structured JSON with a correlation id, and carry no patient names, birth dates or identifiers at any level. */
describe('logs', () => {
  let gw: Gateway;
  const capture = new LogCapture({ level: 'silly' });

  beforeAll(async () => {
    gw = await startGateway({ LOG_LEVEL: 'silly' });
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
});
