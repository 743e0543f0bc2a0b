import { OperationOutcomeError, badRequest } from '@medplum/core';
import { httpAnswer, STATUS_OF } from '../../src/api/send-outcome';
import {
  bodyTimeout,
  businessRule,
  centreUnavailable,
  type Failure,
  type FailureKind,
  forbidden,
  idempotencyConflict,
  intakeBusy,
  invalidInput,
  malformed,
  notCancellable,
  notFound,
  referralNotFound,
  storeUnavailable,
  insufficientStorage,
  tooLarge,
  unauthenticated,
  unsupported,
} from '../../src/outcomes';
import { StoreUnavailableError } from '../../src/store/errors';

/** The one place a failure becomes an HTTP answer: every kind, its status and its headers. */
describe('failure -> HTTP answer', () => {
  const cases: Array<[string, Failure, number, Record<string, string>]> = [
    ['malformed', malformed({ code: 'structure', message: 'the body is not valid JSON', expression: '$' }), 400, {}],
    [
      'unauthenticated (client key)',
      unauthenticated('the API key is not valid', 'referral-gateway'),
      401,
      { 'WWW-Authenticate': 'Bearer realm="referral-gateway"' },
    ],
    [
      'unauthenticated (admin key)',
      unauthenticated('the admin API key is required', 'referral-gateway-admin'),
      401,
      { 'WWW-Authenticate': 'Bearer realm="referral-gateway-admin"' },
    ],
    ['forbidden', forbidden('admin endpoints are disabled'), 403, {}],
    ['not-found', referralNotFound('ref_1'), 404, {}],
    ['timeout', bodyTimeout('the body did not arrive in time'), 408, { Connection: 'close' }],
    ['conflict (idempotency)', idempotencyConflict('Idempotency-Key', 'used before'), 409, {}],
    ['conflict (business rule)', notCancellable('ref_1', 'in-progress'), 409, {}],
    ['too-large', tooLarge('over MAX_BODY_BYTES'), 413, {}],
    ['unsupported', unsupported('send JSON', 'Content-Type'), 415, {}],
    ['invalid', invalidInput([{ code: 'invalid', message: 'patient.birthDate: invalid', expression: 'patient.birthDate' }]), 422, {}],
    ['centre-failed', centreUnavailable('the centre did not answer'), 502, {}],
    ['busy', intakeBusy('no room', 9.2), 503, { 'Retry-After': '10' }],
    ['unavailable', storeUnavailable(0.2), 503, { 'Retry-After': '1' }],
    ['insufficient-storage', insufficientStorage('the document store is full'), 507, { 'Retry-After': '60' }],
  ];

  test.each(cases)('%s', (_name, failure, status, headers) => {
    const answer = httpAnswer(failure);
    expect(answer).toEqual({ status, headers, outcome: failure.outcome });
    expect(answer?.outcome.resourceType).toBe('OperationOutcome');
  });

  test('every kind has a status, and each case above covers one', () => {
    const kinds = Object.keys(STATUS_OF) as FailureKind[];
    expect(new Set(cases.map(([, f]) => f.kind))).toEqual(new Set(kinds));
    for (const k of kinds) expect(STATUS_OF[k]).toBeGreaterThanOrEqual(400);
  });

  test('the issues name the field; the named failures keep their wording', () => {
    expect(businessRule('documents can no longer be added').outcome.issue[0]).toEqual({
      severity: 'error',
      code: 'business-rule',
      details: { text: 'documents can no longer be added' },
      expression: ['status'],
    });
    expect(notFound('no such endpoint').outcome.issue[0]).toEqual({ severity: 'error', code: 'not-found', details: { text: 'no such endpoint' } });
    expect(notCancellable('ref_1', 'on-hold').message).toBe('referral ref_1 is on-hold: it can no longer be cancelled directly; ask the centre');
  });

  test("the store's unavailability is a 503 with its own Retry-After; a medplum client error keeps its status; a bug has no answer (500)", () => {
    expect(httpAnswer(new StoreUnavailableError('database is locked', { retryAfterSeconds: 3 }))).toMatchObject({
      status: 503,
      headers: { 'Retry-After': '3' },
    });
    expect(httpAnswer(new OperationOutcomeError(badRequest('bad')))).toMatchObject({ status: 400 });
    expect(httpAnswer(new Error('a bug'))).toBeUndefined();
    expect(httpAnswer(new TypeError('x is undefined'))).toBeUndefined();
  });
});
