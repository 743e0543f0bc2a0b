import type { Referral } from './schema';

/** Public referral statuses (shared/api-contract.md). */
export const referralStatuses = [
  'awaiting-documents',
  'queued',
  'sent',
  'received',
  'accepted',
  'rejected',
  'on-hold',
  'in-progress',
  'completed',
  'cancelled',
  'failed',
  'delivery-failed',
  'expired',
] as const;
export type ReferralStatus = (typeof referralStatuses)[number];

/** Server-assigned ids of what the centre's FHIR server holds for a referral. */
export interface FhirRefs {
  baseUrl: string;
  serviceRequest?: string;
  task?: string;
  patient?: string;
  documents: string[];
}

export interface ReportInfo {
  reference: string;
  title?: string;
  contentType?: string;
  url: string;
}

/** A referral as the gateway stores it. */
export interface StoredReferral {
  id: string;
  clientId: string;
  externalId: string;
  destination: string;
  status: ReferralStatus;
  statusReason: string | null;
  createdAt: string;
  updatedAt: string;
  /** The validated submission. */
  payload: Referral;
  fhir: FhirRefs | null;
  report: ReportInfo | null;
  /** Task.meta.versionId last seen at the centre. */
  taskVersion: string | null;
  /** When the retention job removed the inline document bytes of this closed referral; null while kept. */
  documentsRemovedAt: string | null;
}
