import { getStatus, OperationOutcomeError } from '@medplum/core';
import type { OperationOutcome } from '@medplum/fhirtypes';
import { type FailureKind, isFailure, operationOutcome, storeUnavailable } from '../outcomes';
import { isStoreUnavailable } from '../store';

/** The HTTP status of each kind of failure. */
export const STATUS_OF: Readonly<Record<FailureKind, number>> = {
  malformed: 400,
  unauthenticated: 401,
  forbidden: 403,
  'not-found': 404,
  timeout: 408,
  conflict: 409,
  'too-large': 413,
  unsupported: 415,
  invalid: 422,
  'centre-failed': 502,
  busy: 503,
  unavailable: 503,
  'insufficient-storage': 507,
};

export interface HttpAnswer {
  status: number;
  headers: Record<string, string>;
  outcome: OperationOutcome;
}

/**
 * How the HTTP API answers anything thrown: the one place where a failure's kind becomes a status and its
 * headers (401 WWW-Authenticate, 503 Retry-After, 408 Connection: close). `undefined` for an error no caller
 * caused (a bug): the error handler logs it and answers a bare 500.
 */
export function httpAnswer(err: unknown): HttpAnswer | undefined {
  const failure = isStoreUnavailable(err) ? storeUnavailable(err.retryAfterSeconds, err) : err;
  if (isFailure(failure)) {
    const headers: Record<string, string> = {};
    if (failure.kind === 'unauthenticated') headers['WWW-Authenticate'] = `Bearer realm="${failure.hints.realm ?? 'referral-gateway'}"`;
    if (failure.hints.retryAfterSeconds !== undefined) headers['Retry-After'] = String(Math.max(1, Math.ceil(failure.hints.retryAfterSeconds)));
    if (failure.kind === 'timeout') headers.Connection = 'close';
    return { status: STATUS_OF[failure.kind], headers, outcome: failure.outcome };
  }
  if (err instanceof OperationOutcomeError) {
    const status = getStatus(err.outcome);
    return status >= 400 && status < 500 ? { status, headers: {}, outcome: err.outcome } : undefined;
  }
  // Errors of Node's HTTP parser and of body-reading libraries that carry a client status.
  const e = err as { type?: string; status?: number; statusCode?: number; limit?: number };
  switch (e?.type) {
    case 'entity.parse.failed':
      return plain(400, { code: 'structure', message: 'the body is not valid JSON', expression: '$' });
    case 'entity.too.large':
      return plain(413, { code: 'too-costly', message: `the body is larger than the limit of ${e.limit} bytes (MAX_BODY_BYTES)`, expression: '$' });
    case 'encoding.unsupported':
    case 'charset.unsupported':
      return plain(415, { code: 'not-supported', message: 'unsupported body encoding or charset', expression: '$' });
    case 'request.aborted':
      return plain(400, { code: 'incomplete', message: 'the request was aborted' });
    default:
      break; // other errors: answered by their status below, if any
  }
  const status = e?.status ?? e?.statusCode;
  if (typeof status === 'number' && status >= 400 && status < 500) return plain(status, { code: 'invalid', message: 'the request could not be processed' });
  return undefined;
}

const plain = (status: number, issue: Parameters<typeof operationOutcome>[0][number]): HttpAnswer => ({
  status,
  headers: {},
  outcome: operationOutcome([issue]),
});
