import type { IncomingHttpHeaders } from 'node:http';
import type { OperationOutcome } from '@medplum/fhirtypes';
import type { Referral, V2Origin } from '../model';
import type { IssueInput } from '../outcomes';

/** What a piece of intake work calls between its heavy steps, so the event loop can take a turn. */
export type Pause = () => Promise<void>;

/** What a submission reads as: the referral, or the issues (located in the format's own terms) that keep it from being one. */
export type ReadResult = { ok: true; referral: Referral } | { ok: false; issues: IssueInput[] };

/**
 * A referral submission as an intake format reads it, before it is checked. The idempotency keys are read
 * first, so that a replay is answered as the original without checking the submission again; the referral is
 * read (and validated against the schema) only when it is new.
 */
export interface Submission {
  /** The intake format's name (`json`, `hl7v2`, `fhir-bundle`). */
  readonly format: string;
  /** The referrer's own id for the referral, when the submission carries one in a readable place. */
  readonly externalId: string | null;
  /** The idempotency key the sender gave (a header, a message control id), if any. */
  readonly idempotencyKey: string | null;
  /** A stable hash of what was submitted: the same submission again gives the same hash. */
  requestHash(pause: Pause): Promise<string>;
  /** The referral it carries, or the issues in the format's terms. */
  read(): ReadResult;
  /** Where a location in the referral model (`patient.birthDate`, `documents[1].data`) is in this format. */
  locate(modelPath: string): string;
  /** A messaging format's sender, so status changes can go back to it in its own terms (HL7 v2: src/hl7return). */
  readonly origin?: V2Origin;
}

/** What the sender is sent back: a status (for HTTP transports), headers and a body in the format's own terms. */
export interface IntakeReply {
  status: number;
  headers: Record<string, string>;
  contentType: string;
  body: string;
}

/** A submission taken: new (`created`) or a replay answered as the original, and the referral as the API shows it. */
export interface Acceptance {
  created: boolean;
  id: string;
  view: unknown;
}

/**
 * A submission refused, as the edge decided it (src/api/send-outcome.ts): the HTTP status and headers the JSON API
 * would answer with, and the OperationOutcome naming the problems (in the format's locations).
 */
export interface Refusal {
  status: number;
  headers: Record<string, string>;
  outcome: OperationOutcome;
  /** What was thrown (a format may recognise its own refusals, e.g. one that carries the message it refused). */
  cause?: unknown;
}

/**
 * An intake format: how one kind of submission reaches the gateway's use cases (README.md beside this file).
 * The transport (an HTTP route, an MLLP listener) reads the bytes; the format turns them into a Submission and
 * says how the sender is answered.
 */
export interface IntakeFormat<Body = unknown> {
  readonly name: string;
  /** The media types it is chosen for (Content-Type); `type/*+json` style wildcards allowed. */
  readonly contentTypes: readonly string[];
  /** The submission in a body; throws a Failure (`malformed`) when the body or a header cannot be read at all. */
  submission(body: Body, headers: IncomingHttpHeaders): Submission;
  /** How an accepted submission is answered. */
  accepted(acceptance: Acceptance, submission: Submission): IntakeReply;
  /** How a refused one is answered (`submission` is undefined when the body could not be read as one at all). */
  refused(refusal: Refusal, submission: Submission | undefined): IntakeReply;
}
