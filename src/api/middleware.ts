import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import { requestContext } from '../observability/context';
import { logger } from '../observability/logger';
import { isStoreUnavailable } from '../store/errors';
import { HttpError, outcome } from './outcome';

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
      next(
        new HttpError(401, { code: 'login', message: token ? 'the API key is not valid' : 'Authorization: Bearer <api key> is required' }, {
          'WWW-Authenticate': 'Bearer realm="referral-gateway"',
        })
      );
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
      next(new HttpError(403, { code: 'forbidden', message: 'admin endpoints are disabled: set ADMIN_API_KEY' }));
      return;
    }
    if (!token || !timingSafeEqual(digest(token), digest(adminKey))) {
      next(new HttpError(401, { code: 'login', message: 'the admin API key is required' }, { 'WWW-Authenticate': 'Bearer realm="referral-gateway-admin"' }));
      return;
    }
    req.clientId = 'admin';
    next();
  };
}

/** POST and PUT bodies must be JSON (415 otherwise). */
export function requireJson(req: Request, _res: Response, next: NextFunction): void {
  const hasBody = req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0');
  if ((req.method === 'POST' || req.method === 'PUT') && hasBody && !req.is(['application/json', 'application/*+json'])) {
    next(new HttpError(415, { code: 'not-supported', message: 'the body must be JSON (Content-Type: application/json)' }));
    return;
  }
  next();
}

/** The one error handler: every failure becomes an OperationOutcome; unknown ones a bare 500. */
export function errorHandler(err: unknown, req: Request, res: Response, _next: NextFunction): void {
  if (res.headersSent) {
    res.end();
    return;
  }
  const send = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
    for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
    res.status(status).type('application/fhir+json').send(JSON.stringify(body));
  };
  if (err instanceof HttpError) {
    send(err.status, err.outcome, err.headers);
    return;
  }
  if (isStoreUnavailable(err)) {
    // The original error (locked, read-only, out of space, unreachable), never a stack, in the log only.
    const cause = (err as Error).cause;
    logger.warn('store unavailable', {
      correlationId: req.correlationId,
      error: (err as Error).message,
      ...(cause instanceof Error && cause.message !== (err as Error).message ? { cause: cause.message } : {}),
    });
    send(503, outcome([{ code: 'transient', message: 'the referral store is unavailable; try again shortly' }]), {
      'Retry-After': String(Math.max(1, Math.ceil(err.retryAfterSeconds))),
    });
    return;
  }
  const e = err as { type?: string; status?: number; statusCode?: number; limit?: number; message?: string };
  switch (e?.type) {
    case 'entity.parse.failed':
      send(400, outcome([{ code: 'structure', message: 'the body is not valid JSON', expression: '$' }]));
      return;
    case 'entity.too.large':
      send(413, outcome([{ code: 'too-costly', message: `the body is larger than the limit of ${e.limit} bytes (MAX_BODY_BYTES)`, expression: '$' }]));
      return;
    case 'encoding.unsupported':
    case 'charset.unsupported':
      send(415, outcome([{ code: 'not-supported', message: 'unsupported body encoding or charset', expression: '$' }]));
      return;
    case 'request.aborted':
      send(400, outcome([{ code: 'incomplete', message: 'the request was aborted' }]));
      return;
  }
  const status = e?.status ?? e?.statusCode;
  if (typeof status === 'number' && status >= 400 && status < 500) {
    send(status, outcome([{ code: 'invalid', message: 'the request could not be processed' }]));
    return;
  }
  logger.error('unhandled error', { correlationId: req.correlationId, error: e?.message, stack: (err as Error)?.stack });
  send(500, outcome([{ code: 'exception', message: `internal error; quote request id ${req.correlationId ?? ''}` }]));
}

export function notFoundHandler(_req: Request, _res: Response, next: NextFunction): void {
  next(new HttpError(404, { code: 'not-found', message: 'no such endpoint' }));
}
