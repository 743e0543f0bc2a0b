import type { IncomingHttpHeaders } from 'node:http';
import { canonicalHash } from '../json';
import { referralSchema } from '../model';
import { invalidInput, malformed, zodIssues } from '../outcomes';
import type { IntakeFormat, Submission } from './types';

/**
 * The gateway's own JSON referral (the public contract, POST /referrals with application/json). The body was
 * read by the JSON body reader (depth, duplicate keys, Unicode); here it must be an object, the
 * Idempotency-Key header must be visible ASCII, and the referral is the body validated by `referralSchema`.
 * Locations are the JSON paths themselves (`patient.identifiers[0].value`).
 */
export const jsonFormat: IntakeFormat = {
  name: 'json',
  contentTypes: ['application/json', 'application/*+json'],
  submission(body: unknown, headers: IncomingHttpHeaders): Submission {
    const header = headers['idempotency-key'];
    const key = Array.isArray(header) ? header[0] : header;
    if (key !== undefined && !/^[\x21-\x7e]{1,255}$/.test(key)) {
      throw malformed({ code: 'invalid', message: 'Idempotency-Key must be 1-255 visible ASCII characters', expression: 'Idempotency-Key' });
    }
    if (body === undefined || body === null || typeof body !== 'object' || Array.isArray(body)) {
      throw invalidInput({ code: 'structure', message: 'the body must be a JSON object', expression: '$' });
    }
    const externalId = (body as { externalId?: unknown }).externalId;
    return {
      format: 'json',
      externalId: typeof externalId === 'string' ? externalId : null,
      idempotencyKey: key ?? null,
      requestHash: (pause) => canonicalHash(body, pause),
      read() {
        const parsed = referralSchema.safeParse(body);
        return parsed.success ? { ok: true, referral: parsed.data } : { ok: false, issues: zodIssues(parsed.error) };
      },
      locate: (modelPath) => modelPath,
    };
  },
  /** 202 with the new referral (200 for a replay) and its Location, as the public contract says. */
  accepted: ({ created, id, view }) => ({
    status: created ? 202 : 200,
    headers: { Location: `/referrals/${id}` },
    contentType: 'application/json',
    body: JSON.stringify(view),
  }),
  /** The OperationOutcome with the status and headers every other route answers a failure with. */
  refused: ({ status, headers, outcome }) => ({ status, headers, contentType: 'application/fhir+json', body: JSON.stringify(outcome) }),
};
