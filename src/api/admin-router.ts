import { Router } from 'express';
import { z } from 'zod';
import type { ReferralStore } from '../store/referral-store';
import { HttpError } from './outcome';
import { zodIssues } from '../referral/service';
import type { RetentionRun } from '../retention/job';

const stateQuery = z.strictObject({
  state: z.enum(['pending', 'done', 'failed']).default('failed'),
  limit: z.coerce.number().int().min(1).max(500).default(100),
});

/** Operator endpoints (ADMIN_API_KEY): the delivery dead letter and its replay; retention on demand. */
export function adminRouter(store: ReferralStore, runRetention?: () => Promise<RetentionRun>): Router {
  const r = Router();

  /** Applies the retention policy now (as RETENTION_CRON would) and answers what it did. */
  r.post('/retention/run', async (_req, res) => {
    if (!runRetention) throw new HttpError(404, { code: 'not-found', message: 'retention is not available here' });
    res.json(await runRetention());
  });

  r.get('/deliveries', async (req, res) => {
    const q = stateQuery.safeParse(req.query);
    if (!q.success) throw new HttpError(400, zodIssues(q.error));
    const entries = await store.listOutbox(q.data.state, q.data.limit);
    res.json({
      items: entries.map((e) => ({
        id: e.id,
        referralId: e.referralId,
        kind: e.kind,
        state: e.state,
        attempts: e.attempts,
        lastError: e.lastError,
        nextAttemptAt: e.state === 'pending' ? e.nextAttemptAt : null,
        createdAt: e.createdAt,
      })),
    });
  });

  /** Re-queues a failed delivery; {id} is the referral id or the outbox entry id. */
  r.post('/deliveries/:id/retry', async (req, res) => {
    const id = req.params.id;
    const entries = id.startsWith('ref_') ? (await store.outboxFor(id)).filter((e) => e.state === 'failed') : (await store.listOutbox('failed', 10_000)).filter((e) => e.id === id);
    if (entries.length === 0) {
      throw new HttpError(404, { code: 'not-found', message: `no failed delivery ${id}` });
    }
    for (const e of entries) {
      await store.requeueOutbox(e.id);
      const referral = await store.getById(e.referralId, { payload: false });
      if (referral?.status === 'delivery-failed') {
        await store.changeStatus(referral.id, { status: 'queued', reason: 'delivery re-queued by an operator' });
      }
    }
    res.status(202).json({ requeued: entries.map((e) => e.id) });
  });

  return r;
}
