import type { HistoryEntry, OutboxEntry } from '../store/referral-store';
import type { StoredReferral } from './types';

/** The referral as the public API shows it (shared/api-contract.md, GET /referrals/{id}). */
export interface ReferralView {
  id: string;
  externalId: string;
  status: string;
  statusReason: string | null;
  destination: string;
  createdAt: string;
  updatedAt: string;
  fhir: { baseUrl: string; serviceRequest: string | null; task: string | null; documents: string[] } | null;
  history: Array<{ status: string; at: string; reason?: string }>;
  delivery: { attempts: number; lastError: string | null; nextAttemptAt: string | null };
  report: { reference: string; title?: string; contentType?: string; url: string } | null;
  /** When the retention job removed the inline document bytes (DOCUMENT_RETENTION_DAYS after closing); null while kept. */
  documentsRemovedAt: string | null;
}

export function toView(r: StoredReferral, history: HistoryEntry[], outbox: OutboxEntry[]): ReferralView {
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
    documentsRemovedAt: r.documentsRemovedAt,
  };
}
