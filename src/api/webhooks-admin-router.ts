import { Router } from 'express';
import { z } from 'zod';

import type { Db, WebhookEntry } from '../store';
import { listWebhooks, requeueWebhook } from '../referral';
import { progressOf, queueAdminRoutes } from './queue-admin';

/** The query of GET /admin/webhooks. */
export const webhooksQuery = z.strictObject({
  state: z.enum(['pending', 'delivered', 'failed']).default('failed'),
  limit: z.coerce.number().int().min(1).max(500).default(100),
});

/** The event's status fields, for the operator; the rest of the body is not shown. */
function eventSummary(payload: string): { type?: string; status?: string; previousStatus?: string; at?: string } {
  try {
    const e = JSON.parse(payload) as Record<string, unknown>;
    const s = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
    return { type: s(e.type), status: s(e.status), previousStatus: s(e.previousStatus), at: s(e.at) };
  } catch {
    return {};
  }
}

/** Scheme, host and path only: a query string may carry the receiver's token. */
function safeUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.origin}${u.pathname}`;
  } catch {
    return '(invalid URL)';
  }
}

function view(e: WebhookEntry) {
  return {
    id: e.id,
    referralId: e.referralId,
    seq: e.seq,
    event: eventSummary(e.payload),
    url: safeUrl(e.url),
    ...progressOf(e),
    updatedAt: e.updatedAt,
  };
}

/**
 * Operator endpoints for status webhooks (mounted under /admin, behind ADMIN_API_KEY):
 * GET /webhooks?state=failed|pending|delivered&limit=  — the dead letter (default) or the queue;
 * POST /webhooks/:id/retry — re-queues a failed event (same webhook-id) and wakes the dispatcher.
 */
export function webhooksAdminRouter(db: Db): Router {
  const r = Router();

  queueAdminRoutes(r, '/webhooks', {
    query: webhooksQuery,
    list: (state, limit) => listWebhooks(db, state, limit),
    view,
    requeue: (id) => requeueWebhook(db, id),
  });

  return r;
}
