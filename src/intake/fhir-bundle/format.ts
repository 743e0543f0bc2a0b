import type { Bundle, OperationOutcome, Task } from '@medplum/fhirtypes';
import { canonicalHash } from '../../json';
import { referralSchema } from '../../model';
import { type DetailedIssue, invalidInput, malformed, zodIssues } from '../../outcomes';
import type { IntakeFormat, IntakeReply, Submission } from '../types';
import { readReferralBundle } from './map';

/** The FHIR media types a referral Bundle comes in. */
export const FHIR_CONTENT_TYPES = ['application/fhir+json', 'application/json'] as const;

/** The system of the Task identifier that carries the referrer's own id (the ServiceRequest identifier it sent). */
export const EXTERNAL_ID_SYSTEM = 'urn:referral-gateway:external-id';

/** What the Task mirror needs of a referral as the API shows it (src/referral's ReferralView). */
export interface MirroredReferral {
  id: string;
  externalId: string;
  status: string;
  statusReason: string | null;
  createdAt: string;
  updatedAt: string;
  report: { reference: string; title?: string; contentType?: string; url: string } | null;
}

/** The gateway's status as the FHIR Task state machine says it (the centre's Task status, mirrored). */
const TASK_STATUS: Record<string, Task['status']> = {
  queued: 'requested',
  sent: 'requested',
  received: 'received',
  accepted: 'accepted',
  rejected: 'rejected',
  'on-hold': 'on-hold',
  'in-progress': 'in-progress',
  completed: 'completed',
  cancelled: 'cancelled',
  failed: 'failed',
  'delivery-failed': 'failed',
};

/**
 * A referral as a FHIR Task (GET /fhir/R4/Task/{id}): its status mirrors the centre's Task (delivery-failed is
 * failed), businessStatus says the gateway's own status, statusReason the centre's reason, and once completed the
 * output holds the opinion report (its content at /referrals/{id}/report/content).
 */
export function taskMirror(r: MirroredReferral): Task {
  return {
    resourceType: 'Task',
    id: r.id,
    meta: { lastUpdated: r.updatedAt },
    identifier: [{ system: EXTERNAL_ID_SYSTEM, value: r.externalId }],
    status: TASK_STATUS[r.status] ?? 'requested',
    intent: 'order',
    businessStatus: { text: r.status },
    ...(r.statusReason ? { statusReason: { text: r.statusReason } } : {}),
    authoredOn: r.createdAt,
    lastModified: r.updatedAt,
    ...(r.report
      ? {
          output: [
            {
              type: { text: 'opinion report' },
              valueAttachment: {
                url: r.report.url,
                ...(r.report.contentType ? { contentType: r.report.contentType } : {}),
                ...(r.report.title ? { title: r.report.title } : {}),
              },
            },
          ],
        }
      : {}),
  };
}

/** A searchset of Task mirrors (GET /fhir/R4/Task?identifier=...). */
export function taskSearchset(referrals: readonly MirroredReferral[]): Bundle<Task> {
  return {
    resourceType: 'Bundle',
    type: 'searchset',
    total: referrals.length,
    entry: referrals.map((r) => ({ fullUrl: `Task/${r.id}`, resource: taskMirror(r) })),
  };
}

/** FHIR JSON of a resource, with its status and headers. */
function fhirReply(status: number, headers: Record<string, string>, body: Task | OperationOutcome): IntakeReply {
  return { status, headers, contentType: 'application/fhir+json', body: JSON.stringify(body) };
}

/**
 * A FHIR referral Bundle (BSeR / Gravity style: a transaction, collection or message Bundle with a ServiceRequest,
 * its Patient, requester, Condition, Consent and DocumentReferences), POSTed to /fhir/R4/Bundle or /fhir/R4.
 * Answers 201 with the Location and body of the gateway's Task for the referral (200 for a replay); refusals are
 * OperationOutcomes whose expressions point into the submitted bundle (`Bundle.entry[2].resource.birthDate`).
 */
export const fhirBundleFormat: IntakeFormat = {
  name: 'fhir-bundle',
  contentTypes: FHIR_CONTENT_TYPES,
  submission(body, headers): Submission {
    if (body === null || typeof body !== 'object' || Array.isArray(body) || (body as { resourceType?: unknown }).resourceType !== 'Bundle') {
      throw invalidInput({ code: 'structure', message: 'Bundle: the body must be a FHIR Bundle (resourceType Bundle)', expression: 'Bundle' });
    }
    const header = headers['idempotency-key'];
    const key = Array.isArray(header) ? header[0] : header;
    if (key !== undefined && !/^[\x21-\x7e]{1,255}$/.test(key)) {
      throw malformed({ code: 'invalid', message: 'Idempotency-Key must be 1-255 visible ASCII characters', expression: 'Idempotency-Key' });
    }
    const reading = readReferralBundle(body);
    return {
      format: 'fhir-bundle',
      externalId: reading.externalId,
      idempotencyKey: key ?? null,
      // The referral read from the bundle: the same referral in a re-built bundle (new urn:uuids) is the same.
      requestHash: (pause) => canonicalHash(reading.referral, pause),
      read() {
        if (reading.issues.length > 0) return { ok: false, issues: reading.issues };
        const parsed = referralSchema.safeParse(reading.referral);
        if (parsed.success) return { ok: true, referral: parsed.data };
        return {
          ok: false,
          issues: zodIssues(parsed.error).map((i: DetailedIssue) => {
            const where = reading.locate(i.expression);
            return { ...i, expression: where, message: `${where}: ${i.detail} (${i.expression})` };
          }),
        };
      },
      locate: (modelPath) => reading.locate(modelPath),
    };
  },
  accepted: ({ created, id, view }) => fhirReply(created ? 201 : 200, { Location: `/fhir/R4/Task/${id}` }, taskMirror(view as MirroredReferral)),
  refused: ({ status, headers, outcome }) => fhirReply(status, headers, outcome),
};
