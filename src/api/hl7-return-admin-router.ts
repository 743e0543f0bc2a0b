import { Router } from 'express';
import { z } from 'zod';
import { listHl7Returns, requeueHl7Return } from '../referral';
import type { Db, Hl7ReturnEntry } from '../store';
import { progressOf, queueAdminRoutes } from './queue-admin';

/** The query of GET /admin/hl7-status-messages. */
export const hl7StatusMessagesQuery = z.strictObject({
  state: z.enum(['pending', 'acknowledged', 'failed']).default('failed'),
  limit: z.coerce.number().int().min(1).max(500).default(100),
});

/** What the operator sees of a status message: the change and where it goes, never the message (it carries the patient). */
function view(e: Hl7ReturnEntry) {
  return {
    id: e.id,
    referralId: e.referralId,
    seq: e.seq,
    status: e.status,
    previousStatus: e.previousStatus,
    at: e.at,
    family: e.family,
    channel: `${e.channel.host.includes(':') ? `[${e.channel.host}]` : e.channel.host}:${e.channel.port}`,
    message: e.message,
    appointmentStart: e.appointmentStart,
    ...progressOf(e),
    updatedAt: e.updatedAt,
  };
}

/**
 * Operator endpoints for the status messages sent back to HL7 v2 senders (mounted under /admin, behind ADMIN_API_KEY):
 * GET /hl7-status-messages?state=failed|pending|acknowledged&limit= — the dead letter (default) or the queue;
 * POST /hl7-status-messages/:id/retry — re-queues a failed message (same control ids) and wakes the dispatcher.
 */
export function hl7ReturnAdminRouter(db: Db): Router {
  const r = Router();

  queueAdminRoutes(r, '/hl7-status-messages', {
    query: hl7StatusMessagesQuery,
    list: (state, limit) => listHl7Returns(db, state, limit),
    view,
    requeue: (id) => requeueHl7Return(db, id),
  });

  return r;
}
