import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import { requestContext, logger } from '../observability';
import { isStoreUnavailable } from '../store';
import { Failure, operationOutcome, unauthenticated } from '../outcomes';
import { httpAnswer } from './send-outcome';

declare module 'express-serve-static-core' {
  interface Request {
    clientId?: string;
    correlationId?: string;
  }
}

/** Correlation id from X-Request-Id (when sane) or a new one; echoed back and put on every log line. */
export function correlationMiddleware(req: Request, res: Response, next: NextFunction): void {
  const given = req.get('x-request-id');
  const id = given && /^[\w.:-]{1,128}$/.test(given) ? given : randomUUID();
  req.correlationId = id;
  res.setHeader('X-Request-Id', id);
  const started = process.hrtime.bigint();
  res.on('finish', () => {
    // The path only: query strings (FHIR searches) and bodies may carry patient data.
    logger.http('request', {
      correlationId: id,
      method: req.method,
      path: req.originalUrl.split('?')[0].slice(0, 200),
      status: res.statusCode,
      durationMs: Number(process.hrtime.bigint() - started) / 1e6,
      clientId: req.clientId,
    });
  });
  requestContext.run({ correlationId: id }, () => next());
}

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();

/** Matches a presented key against every configured key in constant time per key. */
function findClient(keys: Map<string, string>, presented: string): string | undefined {
  const p = digest(presented);
  let found: string | undefined;
  for (const [clientId, key] of keys) {
    if (timingSafeEqual(digest(key), p)) {
      found = clientId;
    }
  }
  return found;
}

function bearer(req: Request): string | undefined {
  const h = req.get('authorization');
  const m = h ? /^Bearer\s+(\S+)\s*$/i.exec(h) : null;
  return m?.[1];
}

export function apiKeyAuth(keys: Map<string, string>) {
  return (req: Request, _res: Response, next: NextFunction): void => {
    const token = bearer(req);
    const clientId = token ? findClient(keys, token) : undefined;
    if (!clientId) {
      next(unauthenticated(token ? 'the API key is not valid' : 'Authorization: Bearer <api key> is required', 'referral-gateway'));
      return;
    }
    req.clientId = clientId;
    const ctx = requestContext.getStore();
    if (ctx) ctx.clientId = clientId;
    next();
  };
}

export function adminAuth(adminKey: string | undefined) {
  return (req: Request, _res: Response, next: NextFunction): void => {
    const token = bearer(req);
    if (!adminKey) {
      next(new Failure('forbidden', { code: 'forbidden', message: 'admin endpoints are disabled: set ADMIN_API_KEY' }));
      return;
    }
    if (!token || !timingSafeEqual(digest(token), digest(adminKey))) {
      next(unauthenticated('the admin API key is required', 'referral-gateway-admin'));
      return;
    }
    req.clientId = 'admin';
    next();
  };
}

/** POST and PUT bodies must be JSON (415 otherwise). */
export function requireJson(req: Request, res: Response, next: NextFunction): void {
  requireJsonOr([])(req, res, next);
}

/** Like requireJson, but a body of one of `types` (an intake format's, e.g. HL7 v2 ER7) is taken too. */
export function requireJsonOr(types: readonly string[]): (req: Request, res: Response, next: NextFunction) => void {
  const accepted = ['application/json', 'application/*+json', ...types];
  const named = types.length > 0 ? `JSON (Content-Type: application/json) or ${types.join(', ')}` : 'JSON (Content-Type: application/json)';
  return (req, _res, next) => {
    const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0');
    if ((req.method === 'POST' || req.method === 'PUT') && hasBody && !req.is(accepted)) {
      next(new Failure('unsupported', { code: 'not-supported', message: `the body must be ${named}` }));
      return;
    }
    next();
  };
}

/** Logs a store that refused (locked, read-only, out of space, unreachable): the original error, never a stack. */
export function noteStoreUnavailable(err: unknown, correlationId: string | undefined): void {
  if (!isStoreUnavailable(err)) return;
  const cause = (err as Error).cause;
  logger.warn('store unavailable', {
    correlationId,
    error: (err as Error).message,
    ...(cause instanceof Error && cause.message !== (err as Error).message ? { cause: cause.message } : {}),
  });
}

/** The one error handler: every failure becomes an OperationOutcome with the status httpAnswer gives it; unknown ones a bare 500. */
export function errorHandler(err: unknown, req: Request, res: Response, _next: NextFunction): void {
  if (res.headersSent) {
    res.end();
    return;
  }
  const send = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
    for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
    res.status(status).type('application/fhir+json').send(JSON.stringify(body));
  };
  noteStoreUnavailable(err, req.correlationId);
  const answer = httpAnswer(err);
  if (answer) {
    send(answer.status, answer.outcome, answer.headers);
    return;
  }
  const e = err as { message?: string; stack?: string };
  logger.error('unhandled error', { correlationId: req.correlationId, error: e?.message, stack: e?.stack });
  send(500, operationOutcome([{ code: 'exception', message: `internal error; quote request id ${req.correlationId ?? ''}` }]));
}

export function notFoundHandler(_req: Request, _res: Response, next: NextFunction): void {
  next(new Failure('not-found', { code: 'not-found', message: 'no such endpoint' }));
}
