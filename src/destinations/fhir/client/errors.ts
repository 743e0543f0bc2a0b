import type { OperationOutcome } from '@medplum/fhirtypes';

export type FhirErrorKind = 'network' | 'timeout' | 'http' | 'invalid-response';

/**
 * Every failure of a request to a destination. The message names the operation, the target (resource type
 * only, never ids from queries or bodies) and the status; it never contains response or request bodies.
 */
export class FhirRequestError extends Error {
  readonly kind: FhirErrorKind;
  /** HTTP status of the response that failed, when there was one. */
  readonly status?: number;
  /** From Retry-After on 429/503 (seconds or HTTP-date), in ms. */
  readonly retryAfterMs?: number;
  /** The server's OperationOutcome for an HTTP error, if it sent one. Kept for callers; never put in messages. */
  readonly outcome?: OperationOutcome;
  /** Which endpoint failed: the FHIR server, or the OAuth token endpoint used to reach it. */
  readonly source: 'fhir-server' | 'token-endpoint';

  constructor(
    kind: FhirErrorKind,
    message: string,
    extra: {
      status?: number;
      retryAfterMs?: number;
      outcome?: OperationOutcome;
      source?: 'fhir-server' | 'token-endpoint';
    } = {}
  ) {
    super(message);
    this.name = 'FhirRequestError';
    this.kind = kind;
    this.status = extra.status;
    this.retryAfterMs = extra.retryAfterMs;
    this.outcome = extra.outcome;
    this.source = extra.source ?? 'fhir-server';
  }
}
