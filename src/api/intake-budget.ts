import type { IncomingMessage } from 'node:http';
import type { RequestHandler } from 'express';
import type { MemoryBudget } from '../memory';
import { intakeBusy } from '../outcomes';

export interface IntakeBudgetOptions {
  /** The process's memory budget (MAX_INTAKE_BYTES_IN_FLIGHT, shared with delivery; INTAKE_CLIENT_SHARE per client). */
  budget: MemoryBudget;
  /** MAX_BODY_BYTES: what a request without Content-Length, or with a Content-Encoding, is counted as. */
  maxBodyBytes: number;
  /** How long a request may wait for room before it is answered 503 (INTAKE_WAIT_MS). */
  waitMs: number;
  /** What a request reserves; default intakeCost (its whole body is held). Streamed bodies reserve what they hold at once. */
  cost?: (req: IncomingMessage) => number;
}

/** What a streamed body holds at once (its stream buffers and a chunk being written), whatever its length. */
export const STREAM_WINDOW_BYTES = 2 * 1024 * 1024;

/** The release of each admitted request, for the body reader to give the room back the moment it fails. */
const releases = new WeakMap<IncomingMessage, () => void>();

/**
 * Gives the request's reserved room back now (idempotent; the room is otherwise given back when the answer
 * has been sent). The body reader calls it when it refuses a body part-way (413, 408, aborted), since the
 * bytes received so far have been dropped.
 */
export function releaseIntake(req: IncomingMessage): void {
  releases.get(req)?.();
}

/**
 * What a request reserves: its Content-Length, or MAX_BODY_BYTES when it has none or has a Content-Encoding
 * (the decoded size is what is held, and it is only known once read); nothing without a body.
 */
export function intakeCost(headers: IncomingMessage['headers'], maxBodyBytes: number): number {
  const te = headers['transfer-encoding'];
  const cl = headers['content-length'];
  if (te === undefined && cl === undefined) return 0;
  const encoding = (headers['content-encoding'] ?? 'identity').trim().toLowerCase();
  if (encoding !== 'identity' && encoding !== '') return maxBodyBytes;
  const declared = Number(cl);
  return te === undefined && Number.isFinite(declared) && declared >= 0 ? Math.min(declared, maxBodyBytes) : maxBodyBytes;
}

/**
 * Bounds the memory that request bodies can take at once, and shares it fairly between clients (the
 * MemoryBudget, which delivery's payloads draw from too): each request with a body reserves its cost
 * (intakeCost) under its client's name before its body is read, until its answer has been sent. A request
 * that gets no room within `waitMs` is answered 503 with Retry-After; one whose client goes away while it
 * waits leaves the queue.
 *
 * Mounted after authentication (unauthenticated requests cannot spend the budget) and before the body reader,
 * which gives a body INTAKE_BODY_TIMEOUT_MS from admission to arrive (408 after, and the room is released).
 */
export function intakeBudget(opts: IntakeBudgetOptions): RequestHandler {
  const budget = opts.budget;
  return (req, res, next) => {
    if (req.method === 'GET' || req.method === 'HEAD' || req.method === 'OPTIONS') {
      next();
      return;
    }
    const cost = opts.cost ? opts.cost(req) : intakeCost(req.headers, opts.maxBodyBytes);
    if (cost === 0) {
      next();
      return;
    }
    const gone = new AbortController();
    const onClose = (): void => gone.abort();
    req.once('close', onClose);
    budget.reserve(req.clientId ?? '', cost, { waitMs: opts.waitMs, signal: gone.signal }).then(
      (granted) => {
        req.off('close', onClose);
        if (granted === 'aborted') return; // the client gave up while waiting: nothing to answer
        if (granted === 'timeout') {
          // Discard the body as it arrives (nothing is kept), so the client finishes sending and reads the 503.
          req.resume();
          next(intakeBusy('the service is receiving as many documents as it can hold at once; try again shortly', opts.waitMs / 1000));
          return;
        }
        const release = (): void => {
          releases.delete(req);
          granted();
        };
        releases.set(req, release);
        res.once('finish', release);
        res.once('close', release);
        next();
      },
      (err: unknown) => next(err)
    );
  };
}
