// What can go wrong that a caller can cause or must be told about, as OperationOutcomes. A leaf module: the
// domain (referral, tracking), the intake formats and the sandbox build their failures here, and each entry
// point decides how to answer one (src/api/send-outcome.ts maps a failure's kind to an HTTP status and its
// headers; an HL7 v2 entry point would map it to an ACK code). Nothing here knows about HTTP.
import { OperationOutcomeError } from '@medplum/core';
import type { OperationOutcome, OperationOutcomeIssue } from '@medplum/fhirtypes';
import type { z } from 'zod';

export type IssueCode = OperationOutcomeIssue['code'];

/** One issue as the gateway writes it: `message` becomes `details.text`, `expression` names the field. */
export interface IssueInput {
  code: IssueCode;
  message: string;
  expression?: string;
  severity?: OperationOutcomeIssue['severity'];
}

/** An OperationOutcome of these issues (severity error unless given). */
export function operationOutcome(issues: ReadonlyArray<IssueInput>): OperationOutcome {
  return {
    resourceType: 'OperationOutcome',
    issue: issues.map((i) => ({
      severity: i.severity ?? 'error',
      code: i.code,
      details: { text: i.message },
      ...(i.expression ? { expression: [i.expression] } : {}),
    })),
  };
}

/** Turns a validation path into a FHIRPath-like expression: patient.identifiers[0].value */
export function pathToExpression(path: ReadonlyArray<PropertyKey>): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') {
      out += `[${p}]`;
    } else {
      out += out ? `.${String(p)}` : String(p);
    }
  }
  return out || '$';
}

/**
 * The kinds of failure, each answered its own way at an entry point:
 * - `malformed`: the request cannot be read (not JSON, not UTF-8, a bad header, query or cursor);
 * - `unauthenticated`: no valid credentials (`realm` names the key that is wanted); `forbidden`: not allowed;
 * - `not-found`: no such thing, or not the caller's;
 * - `timeout`: the request did not arrive in time; `too-large`: over a size limit; `unsupported`: a content
 *   type, encoding or charset the gateway does not take;
 * - `conflict`: the request contradicts what is stored (an idempotency key or externalId reused with another
 *   body, a referral in a state that does not allow it);
 * - `invalid`: readable, but not a valid referral (schema, codes, routing, FHIR content);
 * - `centre-failed`: the centre's server did not answer as it should;
 * - `busy`: the gateway has no room now, try again after `retryAfterSeconds`; `unavailable`: the store cannot
 *   be reached or written, try again after `retryAfterSeconds`.
 */
export type FailureKind =
  | 'malformed'
  | 'unauthenticated'
  | 'forbidden'
  | 'not-found'
  | 'timeout'
  | 'conflict'
  | 'too-large'
  | 'unsupported'
  | 'invalid'
  | 'centre-failed'
  | 'busy'
  | 'unavailable'
  | 'insufficient-storage';

export interface FailureHints {
  /** busy, unavailable: when to try again. */
  retryAfterSeconds?: number;
  /** unauthenticated: which credentials are asked for. */
  realm?: string;
}

/** A failure a caller can cause or must be told about: an OperationOutcomeError with its kind. */
export class Failure extends OperationOutcomeError {
  readonly kind: FailureKind;
  readonly hints: FailureHints;

  constructor(kind: FailureKind, issues: ReadonlyArray<IssueInput> | IssueInput, hints: FailureHints = {}, cause?: unknown) {
    const list = Array.isArray(issues) ? issues : [issues as IssueInput];
    super(operationOutcome(list), cause === undefined ? undefined : { cause });
    this.kind = kind;
    this.hints = hints;
    this.message = list[0]?.message ?? kind;
  }
}

export const isFailure = (err: unknown): err is Failure => err instanceof Failure;

// ---- validation issues ----

/**
 * One validation problem with its location: `code`, `expression` and `message` are what an answer carries (the
 * message starts with the location, as clients see it), `detail` is the message without the location, for output
 * that shows the expression separately (the CLI).
 */
export interface DetailedIssue extends IssueInput {
  /** FHIRPath-like location: `patient.birthDate` in the submission, `Bundle.entry[3].resource.status` in the FHIR content. */
  expression: string;
  message: string;
  detail: string;
}

/** At most this many unknown keys are named in one issue, each cut to KEY_CHARS characters. */
const LISTED_KEYS = 20;
const KEY_CHARS = 64;

/** The first `max` issues, and when more were found one more issue that says how many were left out. */
export function capIssues(issues: DetailedIssue[], max: number): DetailedIssue[] {
  return issues.length <= max ? issues : [...issues.slice(0, max), leftOut(issues.length - max, max)];
}

function leftOut(left: number, max: number): DetailedIssue {
  const detail = `${left} more issue${left === 1 ? '' : 's'} not listed (at most ${max} are)`;
  return { code: 'too-costly', severity: 'information', expression: '$', message: `$: ${detail}`, detail };
}

function unknownKeys(keys: string[]): string {
  const shown = keys.slice(0, LISTED_KEYS).map((k) => (k.length > KEY_CHARS ? `${k.slice(0, KEY_CHARS)}…` : k));
  return `: ${shown.join(', ')}${keys.length > LISTED_KEYS ? ` and ${keys.length - LISTED_KEYS} more` : ''}`;
}

/** Zod issues as DetailedIssues, with FHIRPath-like expressions such as `patient.identifiers[0].value`. */
export function zodIssues(error: z.ZodError, prefix: ReadonlyArray<PropertyKey> = [], maxIssues = 100): DetailedIssue[] {
  const issues = error.issues.slice(0, maxIssues).map((i): DetailedIssue => {
    const expression = pathToExpression([...prefix, ...i.path]);
    // zod's own message lists every unknown key: name at most LISTED_KEYS of them instead.
    const detail = i.code === 'unrecognized_keys' ? `Unrecognized key${i.keys.length === 1 ? '' : 's'}${unknownKeys(i.keys)}` : i.message;
    return { code: i.code === 'unrecognized_keys' ? 'structure' : 'invalid', expression, message: `${expression}: ${detail}`, detail };
  });
  return error.issues.length > maxIssues ? [...issues, leftOut(error.issues.length - maxIssues, maxIssues)] : issues;
}

// ---- named failures ----

/** 422-kind: the submission (or documents, or a cancel) is readable but not valid; the issues name the fields. */
export const invalidInput = (issues: ReadonlyArray<IssueInput> | IssueInput): Failure => new Failure('invalid', issues);

/** The request cannot be read as sent. */
export const malformed = (issues: ReadonlyArray<IssueInput> | IssueInput): Failure => new Failure('malformed', issues);

/** A referral (or another thing) that does not exist for this caller. */
export const notFound = (message: string, expression?: string): Failure =>
  new Failure('not-found', { code: 'not-found', message, ...(expression ? { expression } : {}) });

export const referralNotFound = (id: string): Failure => notFound(`Referral ${id} not found`);

/** An idempotency key or externalId used before with a different body. */
export const idempotencyConflict = (expression: 'Idempotency-Key' | 'externalId', message: string): Failure =>
  new Failure('conflict', { code: 'conflict', expression, message });

/** The referral's state does not allow this (cancel after work started, documents after a cancel...). */
export const businessRule = (message: string, expression = 'status'): Failure => new Failure('conflict', { code: 'business-rule', expression, message });

/** A referral in this status can no longer be cancelled by the referrer. */
export const notCancellable = (id: string, status: string): Failure =>
  businessRule(
    `referral ${id} is ${status}: it can no longer be cancelled directly${status === 'in-progress' || status === 'on-hold' ? '; ask the centre' : ''}`
  );

export const unauthenticated = (message: string, realm: string): Failure => new Failure('unauthenticated', { code: 'login', message }, { realm });

export const forbidden = (message: string): Failure => new Failure('forbidden', { code: 'forbidden', message });

export const tooLarge = (message: string, expression = '$'): Failure => new Failure('too-large', { code: 'too-costly', message, expression });

export const unsupported = (message: string, expression?: string): Failure =>
  new Failure('unsupported', { code: 'not-supported', message, ...(expression ? { expression } : {}) });

export const bodyTimeout = (message: string): Failure => new Failure('timeout', { code: 'timeout', message, expression: '$' });

/** The centre's server did not answer as it should (a report that could not be read). */
export const centreUnavailable = (message: string, cause?: unknown): Failure => new Failure('centre-failed', { code: 'transient', message }, {}, cause);

/** The gateway has no room for this now (the memory budget). */
/** The blob store has no room for a document (a full disk, a database out of space): nothing of it was kept. */
export const insufficientStorage = (message: string, cause?: unknown): Failure =>
  new Failure('insufficient-storage', { code: 'transient', message }, { retryAfterSeconds: 60 }, cause);

export const intakeBusy = (message: string, retryAfterSeconds: number): Failure => new Failure('busy', { code: 'transient', message }, { retryAfterSeconds });

/** The store cannot be reached or written. */
export const storeUnavailable = (retryAfterSeconds: number, cause?: unknown): Failure =>
  new Failure('unavailable', { code: 'transient', message: 'the referral store is unavailable; try again shortly' }, { retryAfterSeconds }, cause);
