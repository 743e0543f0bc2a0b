import type { ReferralStatus } from '../model';

/** FHIR R4 Task.status values (http://hl7.org/fhir/task-status). */
export const taskStatuses = [
  'draft',
  'requested',
  'received',
  'accepted',
  'rejected',
  'ready',
  'cancelled',
  'in-progress',
  'on-hold',
  'failed',
  'completed',
  'entered-in-error',
] as const;
export type TaskStatus = (typeof taskStatuses)[number];

/** The gateway status a centre's Task status means (shared/domain.md §4). */
export function referralStatusFor(task: string): ReferralStatus | undefined {
  switch (task) {
    case 'draft':
    case 'requested':
      return 'sent';
    case 'received':
      return 'received';
    case 'accepted':
    case 'ready':
      return 'accepted';
    case 'rejected':
      return 'rejected';
    case 'on-hold':
      return 'on-hold';
    case 'in-progress':
      return 'in-progress';
    case 'completed':
      return 'completed';
    case 'failed':
      return 'failed';
    case 'cancelled':
    case 'entered-in-error':
      return 'cancelled';
    default:
      return undefined;
  }
}

export const terminalStatuses: ReadonlySet<ReferralStatus> = new Set(['rejected', 'completed', 'failed', 'cancelled', 'delivery-failed', 'expired']);

/** Forward order of the tracked statuses; skipping forward is fine (requested straight to completed). */
const rank: Partial<Record<ReferralStatus, number>> = {
  queued: 0,
  sent: 1,
  received: 2,
  accepted: 3,
  'in-progress': 4,
  'on-hold': 4,
  rejected: 5,
  completed: 5,
  failed: 5,
  cancelled: 5,
};

export type Transition =
  { kind: 'same' } | { kind: 'move'; to: ReferralStatus } | { kind: 'impossible'; to: ReferralStatus; why: string } | { kind: 'unknown'; why: string };

/**
 * Decides what a newly seen Task status does to a referral. Tolerant: skipped states are accepted,
 * repeats are ignored, moves the R4 diagram cannot draw (out of a terminal state, or backwards) are
 * reported as impossible and not applied, and unknown values never throw.
 */
export function decideTransition(current: ReferralStatus, taskStatus: string): Transition {
  const to = referralStatusFor(taskStatus);
  if (!to) return { kind: 'unknown', why: `unknown Task.status "${String(taskStatus).slice(0, 40)}"` };
  if (to === current) return { kind: 'same' };
  if (current === 'queued' || current === 'delivery-failed') {
    return { kind: 'move', to };
  }
  if (terminalStatuses.has(current)) {
    return { kind: 'impossible', to, why: `Task moved from terminal ${current} to ${taskStatus}` };
  }
  if (current === 'in-progress' && to === 'on-hold') return { kind: 'move', to };
  if (current === 'on-hold' && to === 'in-progress') return { kind: 'move', to };
  if (to === 'cancelled' && (current === 'in-progress' || current === 'on-hold')) {
    // The diagram draws no arrow, but a centre may still do it; it is the centre's call.
    return { kind: 'move', to };
  }
  if ((rank[to] ?? 0) < (rank[current] ?? 0)) {
    return { kind: 'impossible', to, why: `Task moved backwards from ${current} to ${taskStatus}` };
  }
  return { kind: 'move', to };
}

/** Whether the referrer may still cancel directly (before work starts at the centre). */
export function cancellable(current: ReferralStatus): boolean {
  return current === 'awaiting-documents' || current === 'queued' || current === 'sent' || current === 'received' || current === 'accepted';
}
