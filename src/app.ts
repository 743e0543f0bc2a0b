import { HL7V2_CONTENT_TYPES, type IntakeRegistry } from './intake';
import express, { type Express, type Router } from 'express';
import helmet from 'helmet';
import {
  adminAuth,
  apiKeyAuth,
  correlationMiddleware,
  errorHandler,
  notFoundHandler,
  requireJson,
  adminRouter,
  intakeBudget,
  bodyPrecheck,
  jsonBody,
  openapiRouter,
  referralsRouter,
  hl7v2Router,
  fhirRouter,
  requireJsonOr,
  textBody,
  streamedIntakeRouter,
} from './api';
import type { Config } from './config';
import type { DocumentIntake, ReferralService } from './referral';
import type { Db } from './store';
import type { AdminDoctorDeps, ReportReader } from './api';
import type { MemoryBudget } from './memory';
import { SANDBOX_PATH } from './sandbox';
import { metricsRegistry } from './observability';
import type { RetentionRun } from './retention';

export interface AppDeps {
  config: Config;
  db: Db;
  /** The formats referrals are taken in (POST /referrals chooses by Content-Type). */
  intake: IntakeRegistry;
  service: ReferralService;
  /** Documents that stream in: multipart file parts and PUT .../documents/{n}/content uploads, into the blob store. */
  documents: DocumentIntake;
  reports: ReportReader;
  sandbox?: Router;
  isReady: () => Promise<{ ready: boolean; checks: Record<string, string> }>;
  isShuttingDown: () => boolean;
  /** The memory budget request bodies reserve before they are read (delivery's payloads draw from it too). */
  memory: MemoryBudget;
  /** Status webhook operator endpoints (GET /webhooks, POST /webhooks/:id/retry), mounted under /admin. */
  webhooksAdmin?: Router;
  /** Operator endpoints for the status messages sent back to HL7 v2 senders (GET /hl7-status-messages, POST .../:id/retry), under /admin. */
  hl7ReturnAdmin?: Router;
  /** Runs the retention job now (POST /admin/retention/run). */
  runRetention?: () => Promise<RetentionRun>;
  /** The destination doctor (GET /admin/destinations/:id/doctor): the destinations and the store's lost raw Binary uploads. */
  doctor?: AdminDoctorDeps;
  /** The browser console (src/console), mounted at /console when CONSOLE_ENABLED allows it. */
  console?: Router;
}

/** The HTTP composition root: headers, parsers, routers and the one error handler. */
export function createApp(deps: AppDeps): Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('trust proxy', false);
  app.use(helmet());
  app.use(correlationMiddleware);
  app.use((_req, res, next) => {
    if (deps.isShuttingDown()) res.setHeader('Connection', 'close');
    next();
  });

  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  app.get('/readyz', async (_req, res) => {
    if (deps.isShuttingDown()) {
      res.status(503).json({ status: 'shutting-down' });
      return;
    }
    const r = await deps.isReady();
    res.status(r.ready ? 200 : 503).json({ status: r.ready ? 'ready' : 'not-ready', checks: r.checks });
  });
  app.get('/metrics', async (_req, res) => {
    res.type(metricsRegistry.contentType).send(await metricsRegistry.metrics());
  });

  app.use(openapiRouter());

  if (deps.console) {
    app.use('/console', deps.console);
  }

  if (deps.sandbox) {
    app.use(SANDBOX_PATH, deps.sandbox);
  }

  // Headers first (declared length, encoding, charset: refused before any byte is read or the budget waited
  // for), then the intake budget, then the body (decoded size, deadline, depth, duplicate keys, Unicode).
  const limits = { maxBodyBytes: deps.config.maxBodyBytes, maxDepth: deps.config.intake.maxJsonDepth, bodyTimeoutMs: deps.config.intake.bodyTimeoutMs };
  const precheck = bodyPrecheck(limits);
  const json = jsonBody(limits);
  const budget = intakeBudget({ budget: deps.memory, maxBodyBytes: deps.config.maxBodyBytes, waitMs: deps.config.intakeWaitMs });
  const text = textBody(limits, HL7V2_CONTENT_TYPES);
  const intakeTypes = deps.intake.contentTypes.filter((t) => !t.includes('json'));
  const streamed = streamedIntakeRouter(deps.service, deps.documents, deps.intake, {
    maxBodyBytes: deps.config.maxBodyBytes,
    maxDepth: deps.config.intake.maxJsonDepth,
    idleTimeoutMs: deps.config.intake.bodyTimeoutMs,
    memory: deps.memory,
    waitMs: deps.config.intakeWaitMs,
  });
  app.use(
    '/referrals',
    apiKeyAuth(deps.config.apiKeys),
    // Streamed bodies first (multipart POST, PUT of an upload's bytes); any other request passes on.
    streamed,
    requireJsonOr(intakeTypes),
    precheck,
    budget,
    json,
    text,
    referralsRouter(deps.service, deps.intake, deps.reports)
  );
  // FHIR intake: referral Bundles in, the referral as a Task out (src/api/fhir-router.ts).
  app.use('/fhir/R4', apiKeyAuth(deps.config.apiKeys), requireJson, precheck, budget, json, fhirRouter(deps.service));
  // HL7 v2 over HTTP: one message a request, answered with its acknowledgement (MLLP is src/api/mllp-listener.ts).
  app.use('/hl7/v2', apiKeyAuth(deps.config.apiKeys), requireJsonOr(HL7V2_CONTENT_TYPES), precheck, budget, text, hl7v2Router(deps.service, deps.db));
  app.use(
    '/admin',
    adminAuth(deps.config.adminApiKey),
    requireJson,
    precheck,
    json,
    adminRouter(deps.db, deps.runRetention, deps.doctor),
    ...(deps.webhooksAdmin ? [deps.webhooksAdmin] : []),
    ...(deps.hl7ReturnAdmin ? [deps.hl7ReturnAdmin] : [])
  );

  app.use(notFoundHandler);
  app.use(errorHandler);
  return app;
}
