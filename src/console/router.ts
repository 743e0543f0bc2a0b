import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createHash } from 'node:crypto';
import type { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import busboy from 'busboy';
import express, { type Request, type Response, Router } from 'express';
import type { Config, DestinationDirectory } from '../config';
import type { FhirClient } from '../destinations';
import { type ReferralStatus, referralStatuses, type StoredReferral } from '../model';
import { listDeliveries, listHl7Returns, listWebhooks, requeueDelivery, requeueHl7Return, requeueWebhook } from '../referral';
import { logger } from '../observability';
import {
  type ConsoleRole,
  type ConsoleSession,
  consoleReferralPage,
  type Db,
  deliveryQueue,
  getReferral,
  getWatermark,
  hl7ReturnQueue,
  leasedQueue,
  openCountAt,
  recordConsoleAudit,
  referralHistory,
  webhookQueue,
} from '../store';
import {
  centreReferral,
  completeTask,
  DeskConflict,
  DeskNotFound,
  deskListPage,
  referralIdOfTask,
  type TaskOwner,
  deskTaskPage,
  documentBytes,
  isDeskAction,
  moveTask,
  waitingTasks,
} from './desk';
import type { Html } from './html';
import { actorOf, crossSite, csrfMatches, csrfOf, Sessions, whoseKey } from './session';
import {
  type DeadLetter,
  deadLettersPage,
  destinationsPage,
  destinationsTable,
  type DestinationRow,
  detailPage,
  type DetailArgs,
  type DocumentRow,
  errorPage,
  identityFragment,
  type ListQuery,
  listPage,
  listRows,
  liveSection,
  type Page,
  signInPage,
} from './views';

export interface ConsoleDeps {
  config: Config;
  db: Db;
  /** The opinion report's bytes, read at the referral's destination. */
  /** The report as the centre serves it, streamed (src/destinations ReportContent); `signal` stops the read. */
  reports: { read(referral: StoredReferral, opts: { signal?: AbortSignal }): Promise<{ contentType: string; bytes?: number; body: Readable }> };
  destinations: DestinationDirectory;
  /** Delivery circuit states by destination (DeliveryWorker.circuitStates: 0 closed, 1 half-open, 2 open). */
  circuits: () => Array<{ destination: string; state: number }>;
  /** What the poller knows of a destination (Poller.status). */
  pollStatus: (destination: string) => { lastCycleAt?: string; lastError?: string; failures: number; nextAttemptAt?: string };
  /** The gateway's FHIR client for a destination (the centre desk). */
  centre: (destination: string) => FhirClient | undefined;
  /** Asks for a poll of a destination now (after a desk action, as a subscription notification would). */
  pollNow?: (destination: string) => void;
  /** Told of status changes made in this process: an open detail page waiting for one is answered at once. */
  statusChanges?: EventEmitter<{ change: [referralId: string] }>;
  isShuttingDown?: () => boolean;
}

interface Signed {
  session: ConsoleSession;
  who: ConsoleRole;
}

const PAGE_SIZE = 50;
/**
 * How long a live request waits for a change before it is answered unchanged. Short: a browser opens at most six
 * connections to one host, and six detail tabs each holding one for long would leave none for navigation.
 */
const LIVE_HOLD_MS = 3_000;
const MAX_OPINION_BYTES = 20 * 1024 * 1024;
const STATUS_SET = new Set<string>(referralStatuses);
const DATE = /^\d{4}-\d{2}-\d{2}$/;
const REFERRAL_ID = /^ref_[0-9A-Z]{26}$/;
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
/** What the pages ask for by themselves (htmx polls): these never restart a session's idle clock. */
const POLL_PATH = /^\/(?:referrals\/rows|destinations\/rows|referrals\/[^/]+\/live)$/;
/** The one route that takes multipart/form-data: the desk's "complete with this opinion". */
const COMPLETE_PATH = /^\/desk\/[^/]+\/tasks\/[^/]+\/complete$/;

const htmxPath = require.resolve('htmx.org/dist/htmx.min.js');
const cssPath = path.join(__dirname, 'console.css');

/** The browser console, mounted at /console (docs/console.md). */
export function consoleRouter(deps: ConsoleDeps): Router {
  const { config, db } = deps;
  const c = config.console;
  const sessions = new Sessions(db, {
    idleMs: c.sessionIdleMs,
    maxMs: c.sessionMaxMs,
    secure: config.nodeEnv === 'production',
    apiKeys: config.apiKeys,
    adminKey: config.adminApiKey,
  });
  const failures = new FailedSignIns();
  const htmx = readFileSync(htmxPath);
  const css = readFileSync(cssPath);
  const r = Router();

  // The console's own policy, stricter than the gateway's: no inline style either (htmx's indicator styles are off),
  // never framed; insecure requests upgraded only in production (a development console on a LAN address is plain HTTP).
  const csp = [
    "default-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "img-src 'self' data:",
    "object-src 'none'",
    "script-src 'self'",
    "script-src-attr 'none'",
    "style-src 'self'",
    "connect-src 'self'",
    ...(config.nodeEnv === 'production' ? ['upgrade-insecure-requests'] : []),
  ].join('; ');
  r.use((_req, res, next) => {
    // Pages hold referral data: never cached; their URLs never sent as a Referer to another site (FHIR links).
    res.setHeader('Cache-Control', 'no-store');
    res.setHeader('Referrer-Policy', 'same-origin');
    res.setHeader('Content-Security-Policy', csp);
    res.setHeader('X-Frame-Options', 'DENY');
    next();
  });
  r.get('/assets/htmx.min.js', (_req, res) => {
    res.setHeader('Cache-Control', 'public, max-age=3600');
    res.type('text/javascript').send(htmx);
  });
  r.get('/assets/console.css', (_req, res) => {
    res.setHeader('Cache-Control', 'public, max-age=3600');
    res.type('text/css').send(css);
  });
  r.use(express.urlencoded({ extended: false, limit: '16kb', parameterLimit: 20 }));

  const send = (res: Response, status: number, body: Html): void => {
    res.status(status).type('html').send(body.text);
  };
  const page = (s: Signed, title: string, current?: Page['current']): Page => ({ title, who: s.who, csrf: s.session.csrfToken, desk: c.centreDesk, current });

  r.get(['/', ''], async (req, res) => {
    res.redirect(303, (await sessions.current(req)) ? '/console/referrals' : '/console/sign-in');
  });
  r.get('/sign-in', (_req, res) => send(res, 200, signInPage()));
  r.post('/sign-in', async (req, res) => {
    if (crossSite(req)) return send(res, 403, signInPage('Sign-in from another site is refused.'));
    const address = req.socket.remoteAddress ?? 'unknown';
    if (failures.blocked(address)) {
      res.setHeader('Retry-After', String(Math.ceil(SIGN_IN_WINDOW_MS / 1000)));
      return send(res, 429, signInPage('Too many failed sign-ins from this address: wait a minute.'));
    }
    const key = typeof req.body?.key === 'string' ? (req.body.key as string) : '';
    const who = key ? whoseKey(key, { apiKeys: config.apiKeys, adminKey: config.adminApiKey }) : undefined;
    if (!who) {
      failures.add(address);
      logger.info('console sign-in refused');
      return send(res, 401, signInPage('That key is not valid.'));
    }
    await sessions.start(req, res, who);
    logger.info('console sign-in', { actor: actorOf(who) });
    res.redirect(303, '/console/referrals');
  });

  // Everything below needs a live session; a POST also needs the session's CSRF token and a same-site origin.
  r.use(async (req, res, next) => {
    // The pages' automatic refreshes (list rows, destination rows, the detail's long poll) do not extend the session.
    const session = await sessions.current(req, { touch: !(req.method === 'GET' && POLL_PATH.test(req.path)) });
    if (!session) {
      if (req.get('hx-request')) {
        res.setHeader('HX-Redirect', '/console/sign-in');
        res.status(401).end();
      } else if (req.method === 'GET') {
        res.redirect(303, '/console/sign-in');
      } else {
        send(res, 401, signInPage('Your session has ended: sign in again.'));
      }
      return;
    }
    res.locals.signed = { session, who: session.who } satisfies Signed;
    const multipart = (req.get('content-type') ?? '').toLowerCase().startsWith('multipart/form-data');
    // Multipart is the opinion upload's alone: its handler checks the token before it reads the file (readMultipart).
    if (req.method === 'POST' && multipart && !crossSite(req) && !COMPLETE_PATH.test(req.path)) {
      logger.warn('console post refused: multipart where a form is expected', { route: req.path.replace(/\/[^/]+/g, '/:x') });
      send(res, 415, errorPage({ title: 'Refused' }, 415, 'This form is not sent as multipart/form-data.'));
      return;
    }
    if (req.method === 'POST' && (crossSite(req) || (!multipart && !csrfMatches(session, csrfOf(req))))) {
      logger.warn('console post refused: cross-site or without its CSRF token', { route: req.path.replace(/\/[^/]+/g, '/:x') });
      send(res, 403, errorPage({ title: 'Refused' }, 403, 'This form was not sent from the console page (missing or wrong CSRF token).'));
      return;
    }
    next();
  });
  const signed = (res: Response): Signed => res.locals.signed as Signed;
  const admin = (req: Request, res: Response): Signed | undefined => {
    const s = signed(res);
    if (s.who.role === 'admin') return s;
    send(res, 403, errorPage(page(s, 'Refused'), 403, 'Only the admin key may see this.'));
    return undefined;
  };
  const clientScope = (s: Signed): string | undefined => (s.who.role === 'client' ? s.who.clientId : undefined);

  r.post('/sign-out', async (req, res) => {
    await sessions.end(req, res);
    res.redirect(303, '/console/sign-in');
  });

  // ---- referral list ----
  const parseList = (req: Request): { q: ListQuery; filter: Parameters<typeof consoleReferralPage>[1] } => {
    const str = (k: string): string | undefined => {
      const v = req.query[k];
      return typeof v === 'string' && v.length > 0 && v.length <= 128 ? v : undefined;
    };
    const q: ListQuery = {
      status: str('status'),
      destination: str('destination'),
      externalId: str('externalId'),
      from: str('from'),
      to: str('to'),
      after: str('after'),
    };
    const status = q.status && STATUS_SET.has(q.status) ? (q.status as ReferralStatus) : undefined;
    const from = q.from && DATE.test(q.from) ? `${q.from}T00:00:00.000Z` : undefined;
    const to = q.to && DATE.test(q.to) ? new Date(Date.parse(`${q.to}T00:00:00.000Z`) + 86_400_000).toISOString() : undefined;
    let after: { createdAt: string; id: string } | undefined;
    if (q.after) {
      const [createdAt, id] = q.after.split('~');
      if (createdAt && id && REFERRAL_ID.test(id) && !Number.isNaN(Date.parse(createdAt))) after = { createdAt, id };
    }
    return {
      q,
      filter: {
        status,
        destination: q.destination,
        externalId: q.externalId,
        createdFrom: from,
        createdBefore: to,
        limit: PAGE_SIZE,
        after,
        clientId: undefined,
      },
    };
  };
  r.get('/referrals', async (req, res) => {
    const s = signed(res);
    const { q, filter } = parseList(req);
    const result = await consoleReferralPage(db, { ...filter, clientId: clientScope(s) });
    send(
      res,
      200,
      listPage(page(s, 'Referrals', 'referrals'), {
        items: result.items,
        q,
        next: result.next ? `${result.next.createdAt}~${result.next.id}` : undefined,
        destinations: deps.destinations.ids(),
        refreshMs: c.refreshMs,
        showClient: s.who.role === 'admin',
      })
    );
  });
  r.get('/referrals/rows', async (req, res) => {
    const s = signed(res);
    const { q, filter } = parseList(req);
    const result = await consoleReferralPage(db, { ...filter, clientId: clientScope(s) });
    send(res, 200, listRows(result.items, q, c.refreshMs, s.who.role === 'admin'));
  });

  // ---- referral detail ----
  /** The referral, only if this session may see it: another client's is answered exactly as an unknown id. */
  const visible = async (req: Request, res: Response, withPayload: boolean): Promise<StoredReferral | undefined> => {
    const s = signed(res);
    const id = String(req.params.id);
    const referral = REFERRAL_ID.test(id) ? await getReferral(db, id, { payload: withPayload, clientId: clientScope(s) }) : null;
    if (!referral) {
      send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such referral.'));
      return undefined;
    }
    return referral;
  };
  const detailArgs = async (referral: StoredReferral, s: Signed, documents: DocumentRow[]): Promise<DetailArgs> => ({
    referral,
    history: await referralHistory(db, referral.id),
    deliveries: await leasedQueue.forReferral(db, deliveryQueue, referral.id),
    webhooks: await leasedQueue.forReferral(db, webhookQueue, referral.id),
    hl7: await leasedQueue.forReferral(db, hl7ReturnQueue, referral.id),
    documents,
    refreshMs: c.refreshMs,
    showClient: s.who.role === 'admin',
  });
  r.get('/referrals/:id', async (req, res) => {
    const s = signed(res);
    const referral = await visible(req, res, true);
    if (!referral) return;
    send(res, 200, detailPage(page(s, `Referral ${referral.externalId}`, 'referrals'), await detailArgs(referral, s, documentRows(referral))));
  });
  // The live part of the detail page is long-polled: asked with the `updatedAt` it shows, it is answered as soon as
  // the referral changes (at once for a change made in this process, else at the next look, every refresh period),
  // or after LIVE_HOLD_MS unchanged (attempt counts and webhooks move without a status change); the answer asks again.
  r.get('/referrals/:id/live', async (req, res) => {
    const s = signed(res);
    let referral = await visible(req, res, false);
    if (!referral) return;
    const since = typeof req.query.since === 'string' ? req.query.since : undefined;
    if (since && referral.updatedAt === since) referral = (await waitForChange(referral, since, res)) ?? referral;
    if (res.writableEnded || res.destroyed) return;
    send(res, 200, liveSection(await detailArgs(referral, s, [])));
  });
  const waitForChange = (referral: StoredReferral, since: string, res: Response): Promise<StoredReferral | undefined> =>
    new Promise((resolve) => {
      let done = false;
      let timer: NodeJS.Timeout | undefined;
      const end = (value?: StoredReferral): void => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        clearTimeout(hold);
        deps.statusChanges?.off('change', onChange);
        res.off('close', onClose);
        resolve(value);
      };
      const look = async (): Promise<void> => {
        if (done) return;
        if (deps.isShuttingDown?.()) return end();
        try {
          const now = await getReferral(db, referral.id, { payload: false, clientId: referral.clientId });
          if (!now || now.updatedAt !== since) return end(now ?? undefined);
        } catch {
          return end();
        }
        if (!done) timer = setTimeout(() => void look(), c.refreshMs);
      };
      const onChange = (id: string): void => {
        if (id !== referral.id) return;
        clearTimeout(timer);
        void look();
      };
      const onClose = (): void => end();
      const hold = setTimeout(() => end(), LIVE_HOLD_MS);
      deps.statusChanges?.on('change', onChange);
      res.on('close', onClose);
      timer = setTimeout(() => void look(), c.refreshMs);
    });
  r.post('/referrals/:id/identity', async (req, res) => {
    const s = signed(res);
    const referral = await visible(req, res, true);
    if (!referral) return;
    // The audit row is written before anything is shown; the log line names the referral, never the patient.
    await recordConsoleAudit(db, { at: new Date().toISOString(), actor: actorOf(s.who), action: 'show-patient-identity', referralId: referral.id });
    logger.info('console: patient identity shown', { actor: actorOf(s.who), referralId: referral.id });
    const p = referral.payload.patient;
    send(
      res,
      200,
      identityFragment({
        name: [...(p.name.given ?? []), p.name.family].filter(Boolean).join(' '),
        birthDate: p.birthDate,
        gender: p.gender,
        identifiers: p.identifiers.map((i) => `${i.value} (${i.system})`),
      })
    );
  });
  r.get('/referrals/:id/report', async (req, res) => {
    const referral = await visible(req, res, false);
    if (!referral) return;
    if (!referral.report) {
      send(res, 404, errorPage(page(signed(res), 'Not found'), 404, 'This referral has no report yet.'));
      return;
    }
    const gone = new AbortController();
    res.once('close', () => gone.abort());
    try {
      const report = await deps.reports.read(referral, { signal: gone.signal });
      const ext = extensionOf(report.contentType);
      res.setHeader('Content-Disposition', `attachment; filename="opinion-${referral.id}.${ext}"`);
      res.setHeader('X-Content-Type-Options', 'nosniff');
      if (report.bytes !== undefined) res.setHeader('Content-Length', String(report.bytes));
      res.type(report.contentType);
      // Streamed as it comes from the centre; a failure part-way cuts the download (never a short file passed as whole).
      await pipeline(report.body, res).catch(() => res.destroy());
    } catch (err) {
      logger.warn('console: report could not be read at the centre', { referralId: referral.id, error: (err as Error).message });
      send(res, 502, errorPage(page(signed(res), 'Refused'), 502, 'The report could not be read at the centre; try again later.'));
    }
  });

  // ---- dead letters (admin) ----
  r.get('/dead-letters', async (req, res) => {
    const s = admin(req, res);
    if (!s) return;
    send(
      res,
      200,
      deadLettersPage(
        page(s, 'Dead letters', 'dead-letters'),
        await deadLetters(db),
        typeof req.query.notice === 'string' ? noticeText(req.query.notice) : undefined
      )
    );
  });
  r.post('/dead-letters/:queue/:id/requeue', async (req, res) => {
    const s = admin(req, res);
    if (!s) return;
    const id = String(req.params.id).slice(0, 100);
    const requeue = { delivery: requeueDelivery, webhook: requeueWebhook, hl7: requeueHl7Return }[String(req.params.queue)];
    if (!requeue) return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such queue.'));
    try {
      await requeue(db, id);
    } catch {
      return send(res, 404, errorPage(page(s, 'Not found'), 404, 'Nothing failed under that id (already re-queued?).'));
    }
    logger.info('console: dead letter re-queued', { actor: actorOf(s.who), queue: req.params.queue, id });
    res.redirect(303, '/console/dead-letters?notice=requeued');
  });

  // ---- destinations (admin) ----
  const destinationRows = async (): Promise<DestinationRow[]> => {
    const circuits = new Map(deps.circuits().map((x) => [x.destination, x.state]));
    const names = ['closed', 'half-open', 'open'] as const;
    return Promise.all(
      deps.destinations.ids().map(async (id) => {
        const d = deps.destinations.get(id);
        const watermark = await getWatermark(db, id);
        const poll = deps.pollStatus(id);
        const state = circuits.get(id);
        return {
          id,
          name: d?.name ?? id,
          baseUrl: d?.baseUrl ?? '',
          circuit: state === undefined ? 'unused' : (names[state] ?? 'closed'),
          watermark,
          lastPollAt: poll.lastCycleAt,
          lagSeconds: watermark ? Math.max(0, Math.round((Date.now() - Date.parse(watermark)) / 1000)) : undefined,
          failures: poll.failures,
          lastError: poll.lastError,
          nextAttemptAt: poll.nextAttemptAt,
          openReferrals: await openCountAt(db, id),
        } satisfies DestinationRow;
      })
    );
  };
  r.get('/destinations', async (req, res) => {
    const s = admin(req, res);
    if (!s) return;
    send(res, 200, destinationsPage(page(s, 'Destinations', 'destinations'), await destinationRows(), c.refreshMs));
  });
  r.get('/destinations/rows', async (req, res) => {
    if (!admin(req, res)) return;
    send(res, 200, destinationsTable(await destinationRows()));
  });

  // ---- centre desk (admin, CONSOLE_CENTRE_DESK) ----
  const desk = (req: Request, res: Response): Signed | undefined => {
    const s = admin(req, res);
    if (!s) return undefined;
    if (!c.centreDesk) {
      send(res, 404, errorPage(page(s, 'Not found'), 404, 'The centre desk is off (CONSOLE_CENTRE_DESK).'));
      return undefined;
    }
    return s;
  };
  const deskClient = (req: Request, res: Response, s: Signed): FhirClient | undefined => {
    const client = deps.centre(String(req.params.dest));
    if (!client) send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such destination.'));
    return client;
  };
  /** A Task is the gateway's at `destination` when it names a referral sent there whose recorded Task it is. */
  const ownedAt =
    (destination: string): TaskOwner =>
    async (task) => {
      const referralId = referralIdOfTask(task);
      if (!task.id || !referralId || !REFERRAL_ID.test(referralId)) return false;
      const referral = await getReferral(db, referralId, { payload: false });
      return referral?.destination === destination && (referral.fhir?.task ?? '').replace(/\/_history\/.*$/, '').endsWith(`Task/${task.id}`);
    };
  r.get('/desk', async (req, res) => {
    const s = desk(req, res);
    if (!s) return;
    const groups = await Promise.all(
      deps.destinations.ids().map(async (id) => {
        const name = deps.destinations.get(id)?.name ?? id;
        const client = deps.centre(id);
        if (!client) return { destination: id, name, error: 'no client' };
        try {
          return { destination: id, name, tasks: (await waitingTasks(client, id, ownedAt(id))).map((w) => w.task) };
        } catch (err) {
          return { destination: id, name, error: (err as Error).message };
        }
      })
    );
    send(res, 200, deskListPage(page(s, 'Centre desk', 'desk'), groups));
  });
  r.get('/desk/:dest/tasks/:task', async (req, res) => {
    const s = desk(req, res);
    if (!s) return;
    const client = deskClient(req, res, s);
    if (!client) return;
    const taskId = String(req.params.task);
    if (!FHIR_ID.test(taskId)) return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such Task.'));
    try {
      const notice = typeof req.query.notice === 'string' ? noticeText(req.query.notice) : undefined;
      const centre = await centreReferral(client, taskId, ownedAt(String(req.params.dest)));
      // The desk shows the patient as the centre holds it: each view is audited like "Show patient identity".
      const referralId = referralIdOfTask(centre.task) ?? `Task/${taskId}`;
      await recordConsoleAudit(db, { at: new Date().toISOString(), actor: actorOf(s.who), action: 'centre-desk-view', referralId });
      send(res, 200, deskTaskPage(page(s, `Task/${taskId}`, 'desk'), String(req.params.dest), centre, notice));
    } catch (err) {
      if (err instanceof DeskNotFound || (err as { status?: number }).status === 404 || (err as { status?: number }).status === 410) {
        return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such Task among those the gateway placed.'));
      }
      send(res, 502, errorPage(page(s, 'Refused'), 502, `The centre's server did not give the Task: ${(err as Error).message}`));
    }
  });
  r.get('/desk/:dest/documents/:doc', async (req, res) => {
    const s = desk(req, res);
    if (!s) return;
    const client = deskClient(req, res, s);
    if (!client) return;
    const id = String(req.params.doc);
    if (!FHIR_ID.test(id)) return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such document.'));
    try {
      const d = await documentBytes(client, id);
      res.setHeader('Content-Disposition', `attachment; filename="document-${id}.${extensionOf(d.contentType)}"`);
      res.setHeader('X-Content-Type-Options', 'nosniff');
      res.type(d.contentType).send(d.body);
    } catch (err) {
      if (err instanceof DeskNotFound || (err as { status?: number }).status === 404 || (err as { status?: number }).status === 410) {
        return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such document among those the gateway placed.'));
      }
      send(res, 502, errorPage(page(s, 'Refused'), 502, `The document could not be read: ${(err as Error).message}`));
    }
  });
  r.post('/desk/:dest/tasks/:task/:action', async (req, res) => {
    const s = desk(req, res);
    if (!s) return;
    const client = deskClient(req, res, s);
    if (!client) return;
    const taskId = String(req.params.task);
    const action = String(req.params.action);
    if (!FHIR_ID.test(taskId) || !isDeskAction(action)) return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such Task or action.'));
    const back = `/console/desk/${String(req.params.dest)}/tasks/${taskId}`;
    try {
      if (action === 'complete') {
        // The token is checked before a byte of the file is read: the X-CSRF-Token header, or the form's `_csrf` field
        // sent before the file (the page puts it first); a file part before a valid token ends the read (403).
        const form = await readMultipart(req, MAX_OPINION_BYTES, (fields) => csrfMatches(s.session, csrfOf(req, fields)));
        if (!form.file || form.file.bytes.length === 0) return send(res, 422, errorPage(page(s, 'Refused'), 422, 'Choose the opinion PDF to upload.'));
        if (form.file.contentType !== 'application/pdf' || !form.file.bytes.subarray(0, 5).equals(Buffer.from('%PDF-'))) {
          return send(res, 422, errorPage(page(s, 'Refused'), 422, 'The opinion must be a PDF file.'));
        }
        await completeTask(client, taskId, ownedAt(String(req.params.dest)), {
          title: (form.fields.title ?? '').trim() || 'Second opinion',
          contentType: 'application/pdf',
          bytes: form.file.bytes,
        });
      } else {
        const reason = typeof req.body?.reason === 'string' ? (req.body.reason as string).trim().slice(0, 500) : '';
        if (action === 'reject' && !reason) return send(res, 422, errorPage(page(s, 'Refused'), 422, 'Give a reason for rejecting.'));
        await moveTask(client, taskId, ownedAt(String(req.params.dest)), action, reason || undefined);
      }
    } catch (err) {
      if (err instanceof DeskConflict) return send(res, 409, errorPage(page(s, 'Refused'), 409, err.message));
      if (err instanceof DeskNotFound || (err as { status?: number }).status === 404 || (err as { status?: number }).status === 410) {
        return send(res, 404, errorPage(page(s, 'Not found'), 404, 'No such Task among those the gateway placed.'));
      }
      // Refused part-way through an upload: the connection closes after the answer, so the rest is not read.
      if (err instanceof MultipartTooLarge || err instanceof MultipartWithoutToken) res.setHeader('Connection', 'close');
      if (err instanceof MultipartTooLarge) return send(res, 413, errorPage(page(s, 'Refused'), 413, err.message));
      if (err instanceof MultipartWithoutToken) {
        logger.warn('console post refused: upload without its CSRF token', { route: 'desk complete' });
        return send(res, 403, errorPage({ title: 'Refused' }, 403, 'This form was not sent from the console page (missing or wrong CSRF token).'));
      }
      logger.warn('console desk: the centre refused a Task change', { destination: req.params.dest, task: taskId, action, error: (err as Error).message });
      return send(res, 502, errorPage(page(s, 'Refused'), 502, `The centre's server refused the change: ${(err as Error).message}`));
    }
    logger.info('console desk: Task changed', { actor: actorOf(s.who), destination: req.params.dest, task: taskId, action });
    deps.pollNow?.(String(req.params.dest));
    res.redirect(303, `${back}?notice=${action}`);
  });

  return r;
}

const SIGN_IN_WINDOW_MS = 60_000;
const SIGN_IN_MAX_FAILURES = 10;

/** Failed sign-ins by remote address in the last minute: past SIGN_IN_MAX_FAILURES, that address waits (429). */
class FailedSignIns {
  private readonly byAddress = new Map<string, number[]>();

  private recent(address: string, now: number): number[] {
    const list = (this.byAddress.get(address) ?? []).filter((t) => now - t < SIGN_IN_WINDOW_MS);
    if (list.length) this.byAddress.set(address, list);
    else this.byAddress.delete(address);
    return list;
  }

  blocked(address: string, now = Date.now()): boolean {
    return this.recent(address, now).length >= SIGN_IN_MAX_FAILURES;
  }

  add(address: string, now = Date.now()): void {
    if (this.byAddress.size > 10_000) this.byAddress.clear();
    this.byAddress.set(address, [...this.recent(address, now), now]);
  }
}

/** A download's file name extension by its content type (`bin` for any other). */
const EXTENSIONS: Record<string, string> = {
  'application/pdf': 'pdf',
  'text/plain': 'txt',
  'text/html': 'html',
  'text/xml': 'xml',
  'application/xml': 'xml',
  'application/json': 'json',
  'application/fhir+json': 'json',
  'application/dicom': 'dcm',
  'image/png': 'png',
  'image/jpeg': 'jpg',
  'image/tiff': 'tif',
  'image/gif': 'gif',
  'application/rtf': 'rtf',
  'application/msword': 'doc',
  'application/vnd.openxmlformats-officedocument.wordprocessingml.document': 'docx',
};
const extensionOf = (contentType: string): string => EXTENSIONS[contentType.split(';')[0].trim().toLowerCase()] ?? 'bin';

const NOTICES: Record<string, string> = {
  requeued: 'Re-queued: it will be attempted again shortly.',
  accept: 'Accepted.',
  reject: 'Rejected.',
  start: 'Started.',
  hold: 'Put on hold.',
  complete: 'Completed with the opinion.',
};
const noticeText = (key: string): string | undefined => NOTICES[key];

/** The documents of a referral as the detail page lists them: kind, size, SHA-256, where the bytes are, removed or not. */
function documentRows(referral: StoredReferral): DocumentRow[] {
  type Doc = {
    kind: string;
    title: string;
    contentType: string;
    data?: string;
    url?: string;
    blob?: { sha256: string; bytes: number };
    dataRemoved?: { bytes: number; sha256: string };
    study?: unknown;
  };
  const docs = (referral.payload.documents ?? []) as unknown as Doc[];
  return docs.map((d, i) => {
    let bytes: number | undefined;
    let sha256: string | undefined;
    let source = 'reference';
    if (d.dataRemoved) {
      bytes = d.dataRemoved.bytes;
      sha256 = d.dataRemoved.sha256;
    } else if (d.blob) {
      bytes = Number(d.blob.bytes);
      sha256 = d.blob.sha256;
      source = 'stored';
    } else if (d.data) {
      const buf = Buffer.from(d.data, 'base64');
      bytes = buf.length;
      sha256 = createHash('sha256').update(buf).digest('hex');
      source = 'inline';
    } else if (d.url) {
      source = 'by URL';
    } else if (d.study) {
      source = 'DICOMweb study';
    } else {
      source = 'awaiting upload';
    }
    return { n: i + 1, kind: d.kind, title: d.title, contentType: d.contentType, bytes, sha256, source, removed: d.dataRemoved !== undefined };
  });
}

/** Every dead letter: failed deliveries, webhooks and HL7 v2 status messages, most recent first. */
async function deadLetters(db: Db): Promise<DeadLetter[]> {
  const [deliveries, webhooks, hl7] = await Promise.all([
    listDeliveries(db, 'failed', 200),
    listWebhooks(db, 'failed', 200),
    listHl7Returns(db, 'failed', 200),
  ]);
  return [
    ...deliveries.map((d) => ({
      queue: 'delivery' as const,
      id: d.id,
      referralId: d.referralId,
      what: d.kind,
      attempts: d.attempts,
      error: d.lastError,
      at: d.nextAttemptAt,
    })),
    ...webhooks.map((w) => ({
      queue: 'webhook' as const,
      id: w.id,
      referralId: w.referralId,
      what: `event #${w.seq}`,
      attempts: w.attempts,
      error: w.lastError,
      at: w.nextAttemptAt,
    })),
    ...hl7.map((m) => ({
      queue: 'hl7' as const,
      id: m.id,
      referralId: m.referralId,
      what: `${m.message} ${m.status}`,
      attempts: m.attempts,
      error: m.lastError,
      at: m.nextAttemptAt,
    })),
  ];
}

class MultipartTooLarge extends Error {}
class MultipartWithoutToken extends Error {}

/**
 * A small multipart form (the opinion upload): its text fields and one file, held in memory up to `maxBytes`.
 * `authorised(fieldsSoFar)` is asked when the file part starts: unless it says yes, nothing of the file is read, the
 * rest of the request is not parsed, and the promise rejects with MultipartWithoutToken.
 */
function readMultipart(
  req: Request,
  maxBytes: number,
  authorised: (fields: Record<string, string>) => boolean
): Promise<{ fields: Record<string, string>; file?: { contentType: string; bytes: Buffer } }> {
  return new Promise((resolve, reject) => {
    let bb: busboy.Busboy;
    try {
      bb = busboy({ headers: req.headers, limits: { fileSize: maxBytes, files: 1, fields: 10, fieldSize: 4096, parts: 12 } });
    } catch (err) {
      reject(err as Error);
      return;
    }
    const fields: Record<string, string> = {};
    let file: { contentType: string; bytes: Buffer } | undefined;
    let tooLarge = false;
    let settled = false;
    const fail = (err: Error): void => {
      if (settled) return;
      settled = true;
      req.unpipe(bb);
      bb.removeAllListeners();
      bb.on('error', () => undefined);
      // The body is drained (and dropped) only until the refusal is sent, which closes the connection.
      req.resume();
      reject(err);
    };
    bb.on('field', (name, value) => {
      fields[name] = value;
    });
    bb.on('file', (_name, stream, info) => {
      if (!authorised(fields)) {
        stream.resume();
        fail(new MultipartWithoutToken('no CSRF token before the file'));
        return;
      }
      const chunks: Buffer[] = [];
      stream.on('data', (d: Buffer) => chunks.push(d));
      stream.on('limit', () => {
        tooLarge = true;
      });
      stream.on('end', () => {
        file = { contentType: info.mimeType, bytes: Buffer.concat(chunks) };
      });
    });
    bb.on('error', (err) => fail(err as Error));
    bb.on('close', () => {
      if (settled) return;
      if (tooLarge) return fail(new MultipartTooLarge(`the opinion is larger than ${maxBytes} bytes`));
      // A form with no file part at all still needs its token.
      if (!authorised(fields)) return fail(new MultipartWithoutToken('no CSRF token'));
      settled = true;
      resolve({ fields, file });
    });
    req.pipe(bb);
  });
}
