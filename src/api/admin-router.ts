import { Router } from 'express';
import { z } from 'zod';
import { type Db, listConsoleAudit } from '../store';
import { Failure, zodIssues } from '../outcomes';
import { listDeliveries, requeueDelivery } from '../referral';
import { progressOf, queueAdminRoutes } from './queue-admin';

import type { RetentionRun } from '../retention';
import type { Destination } from '../config';
import { type OrphanedBinary, QUICK_SIZES, runDoctor } from '../doctor';

/** What GET /admin/destinations/:id/doctor needs: the destinations (e.g. the gateway's DestinationDirectory). */
export interface AdminDoctorDeps {
  destinations: { get(id: string): Destination | undefined };
  /** Environment holding the destinations' secrets (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Raw Binary uploads of this destination whose answer was lost (shown as a warn line). */
  orphanedBinaries?: (destinationId: string) => Promise<OrphanedBinary[]>;
}

/** The query of GET /admin/deliveries. */
export const deliveriesQuery = z.strictObject({
  state: z.enum(['pending', 'done', 'failed']).default('failed'),
  limit: z.coerce.number().int().min(1).max(500).default(100),
});

/** The query of GET /admin/console-audit. */
export const consoleAuditQuery = z.strictObject({
  referral: z
    .string()
    .regex(/^ref_[0-9A-Z]{26}$/)
    .optional()
    .meta({ description: 'Only this referral (ref_...).' }),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
});

/**
 * Operator endpoints (ADMIN_API_KEY): the delivery dead letter and its replay; retention on demand; the
 * destination doctor (with `doctor`).
 */
export function adminRouter(db: Db, runRetention?: () => Promise<RetentionRun>, doctor?: AdminDoctorDeps): Router {
  const r = Router();

  /**
   * Probes the destination's FHIR server (tagged test resources, deleted afterwards): 200 with the report, even
   * when it cannot work; 404 for an unknown destination. ?quick=true: smaller size probes (JSON up to 4 MiB,
   * raw Binary 1 MiB).
   */
  r.get('/destinations/:id/doctor', async (req, res) => {
    if (!doctor) throw new Failure('not-found', { code: 'not-found', message: 'the destination doctor is not available here' });
    const destination = doctor.destinations.get(req.params.id);
    if (!destination) throw new Failure('not-found', { code: 'not-found', message: `no destination ${req.params.id}` });
    const orphans = doctor.orphanedBinaries;
    const quick = req.query.quick === 'true' || req.query.quick === '1';
    res.json(
      await runDoctor(destination, {
        env: doctor.env,
        ...(quick ? { sizes: QUICK_SIZES } : {}),
        ...(orphans ? { orphanedBinaries: () => orphans(destination.id) } : {}),
      })
    );
  });

  /** The console's audit log (who was shown a patient's identity, on which referral, when), most recent first. */
  r.get('/console-audit', async (req, res) => {
    const q = consoleAuditQuery.safeParse(req.query);
    if (!q.success) throw new Failure('malformed', zodIssues(q.error));
    res.json({ items: await listConsoleAudit(db, { referralId: q.data.referral, limit: q.data.limit }) });
  });

  /** Applies the retention policy now (as RETENTION_CRON would) and answers what it did. */
  r.post('/retention/run', async (_req, res) => {
    if (!runRetention) throw new Failure('not-found', { code: 'not-found', message: 'retention is not available here' });
    res.json(await runRetention());
  });

  /** The delivery dead letter (or queue); a retry's {id} is the referral id or the outbox entry id. */
  queueAdminRoutes(r, '/deliveries', {
    query: deliveriesQuery,
    list: (state, limit) => listDeliveries(db, state, limit),
    view: (e) => ({
      id: e.id,
      referralId: e.referralId,
      kind: e.kind === 'unreadable' ? e.storedKind : e.kind,
      ...progressOf(e),
    }),
    requeue: (id) => requeueDelivery(db, id),
  });

  return r;
}
