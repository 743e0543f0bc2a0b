// The intake check of a referral submission, shared by the API (ReferralService.check) and the
// offline CLI (src/cli/validate.ts): schema (zod) -> codes (mapping tables) -> routing -> FHIR
// mapping -> validation of the resulting transaction Bundle against the R4 base definitions.
// Pure apart from the clock (createdAt) and the lazily loaded FHIR definitions: sends nothing.
import type { Bundle } from '@medplum/fhirtypes';
import { capIssues, type DetailedIssue, zodIssues } from '../outcomes';
import type { Destination, DestinationDirectory } from '../config';

import { mapReferralToBundle, checkCodes, validateBundle } from '../mapping';
import { type Route, routeReferral } from '../mapping';
import { type Referral, referralSchema } from '../model';

/** Which check rejected the submission; the checks run in this order and stop at the first failing one. */
export type CheckStage = 'schema' | 'codes' | 'routing' | 'fhir';

/**
 * One problem. `code`, `expression` and `message` are exactly what the API puts in its 422
 * OperationOutcome (the message starts with the location, as clients see it today), so an array
 * of these can be given to `invalidInput(issues)` as is. `detail` is the message without the
 * location, for output that shows the expression separately (the CLI).
 */
export type CheckIssue = DetailedIssue;

export type CheckResult =
  | { ok: true; referral: Referral; destination: Destination; route: Route; bundle: Bundle }
  | {
      ok: false;
      stage: CheckStage;
      issues: CheckIssue[];
      /** The mapped bundle when the FHIR validation failed (the issue paths point into it). */
      bundle?: Bundle;
    };

export interface CheckOptions {
  /** Id, client and acceptance time the bundle is mapped with. Default 'ref_validation', 'validation', now. */
  referralId?: string;
  clientId?: string;
  createdAt?: string;
  /**
   * With false, inline document data is left out of the mapped bundle (a placeholder stands in), so
   * intake validation does not decode, hash and re-check every document. Default true (the bundle
   * is the one the worker would send).
   */
  withDocumentData?: boolean;
  /** Cap on the issues returned per stage; past it one more issue gives the count left out. Default 100. */
  maxIssues?: number;
}

/**
 * Runs every intake check on a submitted body, as POST /referrals does before storing it.
 * On success the referral carries the chosen destination (`referral.destination`), and `bundle` is
 * the transaction Bundle the delivery worker would send (mapped with the given id, client and time).
 * Throws only on an internal error of the mapper or validator, never for bad input.
 */
export function checkReferral(body: unknown, destinations: DestinationDirectory, options: CheckOptions = {}): CheckResult {
  const parsed = referralSchema.safeParse(body);
  if (!parsed.success) {
    return { ok: false, stage: 'schema', issues: zodIssues(parsed.error, [], options.maxIssues ?? 100) };
  }
  return checkReferralContent(parsed.data, destinations, options);
}

/**
 * The checks after the schema, on a referral an intake format has read: codes, routing, and the FHIR content
 * it maps to. The same result as checkReferral for the body the referral was read from.
 */
export function checkReferralContent(referral: Referral, destinations: DestinationDirectory, options: CheckOptions = {}): CheckResult {
  const maxIssues = options.maxIssues ?? 100;

  const codeIssues = checkCodes(referral);
  if (codeIssues.length > 0) {
    return {
      ok: false,
      stage: 'codes',
      issues: capIssues(
        codeIssues.map((i) => ({ code: 'code-invalid', expression: i.path, message: `${i.path}: ${i.message}`, detail: i.message })),
        maxIssues
      ),
    };
  }

  const ids = destinations.ids();
  const route = routeReferral(referral, ids);
  const destination = route && destinations.get(route.destination);
  if (!route || !destination) {
    const detail = referral.destination
      ? `unknown destination "${referral.destination}" (known: ${ids.join(', ')})`
      : 'no routing rule matches this diagnosis; name a destination';
    return { ok: false, stage: 'routing', issues: [{ code: 'not-found', expression: 'destination', message: `destination: ${detail}`, detail }] };
  }

  // Inline document bytes were checked as base64 by the schema; validating the FHIR content does not
  // need them, and hashing and re-validating megabytes of base64 per submission costs more than all else.
  const mapped =
    options.withDocumentData === false
      ? { ...referral, documents: referral.documents.map((d) => (d.data !== undefined ? { ...d, data: 'AAAA' } : d)) }
      : referral;
  const bundle = mapReferralToBundle({
    referralId: options.referralId ?? 'ref_validation',
    clientId: options.clientId ?? 'validation',
    referral: mapped,
    destination,
    specialty: route.specialty,
    createdAt: options.createdAt ?? new Date().toISOString(),
  });
  const fhirIssues = validateBundle(bundle);
  if (fhirIssues.length > 0) {
    return {
      ok: false,
      stage: 'fhir',
      bundle,
      issues: capIssues(
        fhirIssues.map((i) => ({ code: 'invariant', expression: i.path, message: `FHIR content: ${i.path}: ${i.message}`, detail: i.message })),
        maxIssues
      ),
    };
  }
  return { ok: true, referral: { ...referral, destination: route.destination }, destination, route, bundle };
}

/** A read-only DestinationDirectory over a list. */
export function destinationDirectory(list: ReadonlyArray<Destination>): DestinationDirectory {
  const map = new Map(list.map((d) => [d.id, d]));
  return { ids: () => [...map.keys()], get: (id) => map.get(id) };
}
