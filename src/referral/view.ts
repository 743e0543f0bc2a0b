import { z } from 'zod';
import type { HistoryEntry, OutboxEntry } from '../store';
import { referralStatuses, type StoredReferral } from '../model';

/** A public referral status (shared/api-contract.md); the OpenAPI document's ReferralStatus. */
export const referralStatusSchema = z.enum(referralStatuses).meta({
  description:
    'awaiting-documents (stored; waits for the documents declared with upload: true, sent by PUT /referrals/{id}/documents/{n}/content), ' +
    "queued (stored, not yet at the centre), sent (delivered; the centre's Task is requested), received, accepted, rejected, on-hold, in-progress, completed, " +
    "cancelled, failed (the centre's Task failed), delivery-failed (the centre refused the transaction permanently; see delivery.lastError), " +
    'expired (its uploads did not arrive by the deadline, UPLOAD_DEADLINE_HOURS; never sent).',
});

const dateTime = z.iso.datetime();

/**
 * The referral as the public API shows it (shared/api-contract.md, GET /referrals/{id}). Never parsed: it
 * types toView and is the OpenAPI document's Referral, so the two cannot drift.
 */
export const referralViewSchema = z
  .object({
    id: z
      .string()
      .regex(/^ref_/)
      .meta({ examples: ['ref_01JD3QW7Z8K2M4N6P8R0S2T4V6'] }),
    externalId: z.string(),
    status: referralStatusSchema,
    statusReason: z.string().nullable().meta({ description: "The centre's Task.businessStatus / statusReason text." }),
    destination: z.string(),
    createdAt: dateTime,
    updatedAt: dateTime,
    fhir: z
      .object({
        baseUrl: z.url(),
        serviceRequest: z
          .string()
          .nullable()
          .meta({ examples: ['ServiceRequest/123'] }),
        task: z
          .string()
          .nullable()
          .meta({ examples: ['Task/124'] }),
        documents: z.array(z.string().meta({ examples: ['DocumentReference/125'] })),
      })
      .nullable()
      .meta({ description: "What the centre's FHIR server holds for the referral; null until delivered (the contract shows it as always present)." }),
    history: z.array(z.object({ status: referralStatusSchema, at: dateTime, reason: z.string().optional() })),
    delivery: z.object({ attempts: z.int().min(0), lastError: z.string().nullable(), nextAttemptAt: dateTime.nullable() }),
    report: z
      .object({
        reference: z.string().meta({ examples: ['DocumentReference/200'] }),
        title: z.string().optional(),
        contentType: z.string().optional(),
        url: z.string().meta({ description: '/referrals/{id}/report/content' }),
      })
      .nullable()
      .meta({ description: 'The opinion the centre returned (from Task.output) once the Task is completed; null before.' }),
    uploads: z
      .array(
        z.object({
          document: z.int().min(1).meta({ description: 'The document number (1-based position in documents).' }),
          title: z.string(),
          contentType: z.string(),
          url: z.string().meta({ examples: ['/referrals/ref_01JD3QW7Z8K2M4N6P8R0S2T4V6/documents/1/content'] }),
          received: z.boolean(),
        })
      )
      .optional()
      .meta({
        description:
          'While the referral is awaiting-documents: each document declared "upload": true, where to PUT its bytes, and whether they have arrived. ' +
          'Absent otherwise.',
      }),
    /** When the retention job removed the inline document bytes (DOCUMENT_RETENTION_DAYS after closing); null while kept. */
    documentsRemovedAt: dateTime.nullable().meta({
      description:
        'Extension: when the retention job removed the inline document bytes (DOCUMENT_RETENTION_DAYS after the referral closed: completed, rejected, failed or ' +
        'cancelled). Null while the gateway keeps them. The centre and the EHR keep their copies.',
    }),
  })
  .meta({ description: 'A referral as GET /referrals/{id} shows it.' });

export type ReferralView = z.output<typeof referralViewSchema>;

/** A document awaiting its upload, as the view lists it. */
export interface UploadDue {
  n: number;
  title: string;
  contentType: string;
  received: boolean;
}

export function toView(r: StoredReferral, history: HistoryEntry[], outbox: OutboxEntry[], uploads?: UploadDue[]): ReferralView {
  const submit = outbox.find((o) => o.kind === 'submit');
  const pending = outbox.find((o) => o.state === 'pending');
  const lastWithError = [...outbox].reverse().find((o) => o.lastError);
  return {
    id: r.id,
    externalId: r.externalId,
    status: r.status,
    statusReason: r.statusReason,
    destination: r.destination,
    createdAt: r.createdAt,
    updatedAt: r.updatedAt,
    fhir: r.fhir
      ? {
          baseUrl: r.fhir.baseUrl,
          serviceRequest: r.fhir.serviceRequest ?? null,
          task: r.fhir.task ?? null,
          documents: r.fhir.documents,
        }
      : null,
    history: history.map((h) => ({ status: h.status, at: h.at, ...(h.reason ? { reason: h.reason } : {}) })),
    delivery: {
      attempts: (pending ?? submit)?.attempts ?? 0,
      lastError: pending?.lastError ?? (r.status === 'delivery-failed' ? (lastWithError?.lastError ?? null) : null),
      nextAttemptAt: pending ? pending.nextAttemptAt : null,
    },
    report: r.report ? { ...r.report, url: `/referrals/${r.id}/report/content` } : null,
    ...(uploads
      ? {
          uploads: uploads.map((u) => ({
            document: u.n,
            title: u.title,
            contentType: u.contentType,
            url: `/referrals/${r.id}/documents/${u.n}/content`,
            received: u.received,
          })),
        }
      : {}),
    documentsRemovedAt: r.documentsRemovedAt,
  };
}
