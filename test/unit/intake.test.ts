import { readFileSync } from 'node:fs';
import { defaultIntakeFormats, type IntakeFormat, IntakeRegistry, jsonFormat } from '../../src/intake';
import { Failure } from '../../src/outcomes';

/** Intake formats behind a registry (issue 11 point 2): chosen by Content-Type, each reading its own submissions. */
describe('intake formats', () => {
  const sample = (): Record<string, unknown> => JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, unknown>;
  const failureOf = (fn: () => unknown): Failure => {
    try {
      fn();
    } catch (err) {
      if (err instanceof Failure) return err;
      throw err;
    }
    throw new Error('no failure');
  };

  test('the registry chooses by media type (parameters and case ignored, +json wildcard), and refuses others naming what it takes', () => {
    const intake = defaultIntakeFormats();
    expect(intake.forContentType('application/json; charset=utf-8').name).toBe('json');
    expect(intake.forContentType('Application/FHIR+JSON').name).toBe('json');
    expect(intake.forContentType('x-application/hl7-v2+er7').name).toBe('hl7v2');
    const refused = failureOf(() => intake.forContentType('text/csv'));
    expect(refused.kind).toBe('unsupported');
    expect(refused.message).toMatch(/application\/json.*x-application\/hl7-v2\+er7.*text\/csv is not one of them/);
    const other: IntakeFormat = {
      name: 'hl7v2',
      contentTypes: ['x-application/hl7-v2+er7'],
      submission: () => jsonFormat.submission({}, {}),
      accepted: jsonFormat.accepted,
      refused: jsonFormat.refused,
    };
    expect(new IntakeRegistry([jsonFormat, other]).forContentType('x-application/hl7-v2+er7').name).toBe('hl7v2');
    expect(new IntakeRegistry([jsonFormat]).contentTypes).toEqual(['application/json', 'application/*+json']);
    expect(() => new IntakeRegistry([jsonFormat, jsonFormat])).toThrow(/registered twice/);
  });

  test('json: idempotency key and externalId are read before the referral; the same content in another key order hashes the same', async () => {
    const body = sample();
    const s = jsonFormat.submission(body, { 'idempotency-key': 'key-1' });
    expect([s.format, s.externalId, s.idempotencyKey]).toEqual(['json', body.externalId, 'key-1']);
    const reordered = Object.fromEntries(Object.entries(body).reverse());
    const pause = async (): Promise<void> => undefined;
    expect(await jsonFormat.submission(reordered, {}).requestHash(pause)).toBe(await s.requestHash(pause));
    const read = s.read();
    expect(read.ok && read.referral.patient.identifiers.length).toBeGreaterThan(0);
    expect(s.locate('patient.birthDate')).toBe('patient.birthDate');
  });

  test('json: a bad Idempotency-Key is malformed, a body that is not an object invalid, a bad field an issue naming it', () => {
    expect(failureOf(() => jsonFormat.submission(sample(), { 'idempotency-key': 'has space' })).kind).toBe('malformed');
    expect(failureOf(() => jsonFormat.submission([1, 2], {})).kind).toBe('invalid');
    const read = jsonFormat.submission({ ...sample(), patient: { ...(sample().patient as object), birthDate: 'yesterday' } }, {}).read();
    expect(read.ok).toBe(false);
    if (!read.ok) expect(read.issues[0]).toMatchObject({ expression: 'patient.birthDate', message: expect.stringMatching(/^patient\.birthDate: /) });
  });

  test('json answers in the public contract: 202 (200 for a replay) with the view and its Location; a refusal as an OperationOutcome', () => {
    const s = jsonFormat.submission(sample(), {});
    const view = { id: 'ref_1', status: 'queued' };
    expect(jsonFormat.accepted({ created: true, id: 'ref_1', view }, s)).toEqual({
      status: 202,
      headers: { Location: '/referrals/ref_1' },
      contentType: 'application/json',
      body: JSON.stringify(view),
    });
    expect(jsonFormat.accepted({ created: false, id: 'ref_1', view }, s).status).toBe(200);
    const outcome = {
      resourceType: 'OperationOutcome' as const,
      issue: [{ severity: 'error' as const, code: 'invalid' as const, expression: ['patient.birthDate'] }],
    };
    expect(jsonFormat.refused({ status: 503, headers: { 'Retry-After': '5' }, outcome }, undefined)).toEqual({
      status: 503,
      headers: { 'Retry-After': '5' },
      contentType: 'application/fhir+json',
      body: JSON.stringify(outcome),
    });
  });
});
