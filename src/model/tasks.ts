import type { ReferralDocument } from './schema';

/** Documents added to a referral after its submission, numbered on from `startIndex`. */
export interface DocumentsTask {
  documents: ReferralDocument[];
  startIndex: number;
}

/** A referrer's cancel, with its reason. */
export interface CancelTask {
  reason: string;
}

/** Work queued for a referral's destination (a delivery outbox row): its kind and the payload of that kind. */
export type DeliveryTask = { kind: 'submit'; payload: null } | { kind: 'documents'; payload: DocumentsTask } | { kind: 'cancel'; payload: CancelTask };

/**
 * A stored row this version cannot carry out: a kind it does not know (written by a newer version) or a payload
 * not of its kind's shape. The worker dead-letters it with `problem`.
 */
export interface UnreadableTask {
  kind: 'unreadable';
  storedKind: string;
  payload: null;
  problem: string;
}

export type DeliveryKind = DeliveryTask['kind'];

/** A stored task, read back: its kind and payload checked (the documents themselves were checked at intake). */
export function readDeliveryTask(kind: string, payload: unknown): DeliveryTask | UnreadableTask {
  const unreadable = (problem: string): UnreadableTask => ({ kind: 'unreadable', storedKind: kind, payload: null, problem });
  switch (kind) {
    case 'submit':
      return { kind, payload: null };
    case 'documents': {
      const p = payload as Partial<DocumentsTask> | null;
      if (!p || !Array.isArray(p.documents) || !Number.isInteger(p.startIndex) || (p.startIndex as number) < 0) {
        return unreadable('malformed documents entry (expected { documents, startIndex })');
      }
      return { kind, payload: { documents: p.documents, startIndex: p.startIndex as number } };
    }
    case 'cancel': {
      const p = payload as { reason?: unknown } | null;
      return { kind, payload: { reason: typeof p?.reason === 'string' ? p.reason : 'cancelled by the referrer' } };
    }
    default:
      return unreadable(`outbox kind ${kind} is not supported by this version`);
  }
}
