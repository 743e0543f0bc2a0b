import type { Router } from 'express';
import type { z } from 'zod';
import { Failure, zodIssues } from '../outcomes';

/**
 * The two operator routes of a leased queue (the delivery outbox, status webhooks, HL7 status messages):
 * GET `path`?state=&limit= lists its rows as `view` shows them; POST `path`/:id/retry re-queues a dead letter
 * through the use case `requeue` (202 with the ids; its not-found is the use case's).
 */
export function queueAdminRoutes<S extends string, E, V>(
  router: Router,
  path: string,
  spec: {
    query: z.ZodType<{ state: S; limit: number }>;
    list: (state: S, limit: number) => Promise<E[]>;
    view: (entry: E) => V;
    requeue: (id: string) => Promise<string[]>;
  }
): void {
  router.get(path, async (req, res) => {
    const q = spec.query.safeParse(req.query);
    if (!q.success) throw new Failure('malformed', zodIssues(q.error));
    const entries = await spec.list(q.data.state, q.data.limit);
    res.json({ items: entries.map(spec.view) });
  });
  router.post(`${path}/:id/retry`, async (req, res) => {
    res.status(202).json({ requeued: await spec.requeue(req.params.id as string) });
  });
}

/**
 * How a queue row is getting on, as every operator listing shows it: state, attempts, last error, the next attempt
 * (only a pending row has one) and when its current round began.
 */
export function progressOf<S extends string>(e: { state: S; attempts: number; lastError: string | null; nextAttemptAt: string; createdAt: string }) {
  return {
    state: e.state,
    attempts: e.attempts,
    lastError: e.lastError,
    nextAttemptAt: e.state === 'pending' ? e.nextAttemptAt : null,
    createdAt: e.createdAt,
  };
}
