import type { RequestHandler } from 'express';
import { Gauge } from 'prom-client';
import { metricsRegistry } from '../observability/metrics';
import { HttpError } from './outcome';

export interface IntakeBudgetOptions {
  /** Request body bytes the service parses, checks and stores at once (MAX_INTAKE_BYTES_IN_FLIGHT). */
  maxBytesInFlight: number;
  /** MAX_BODY_BYTES: what a request without Content-Length is counted as. */
  maxBodyBytes: number;
  /** How long a request may wait for room before it is answered 503 (INTAKE_WAIT_MS). */
  waitMs: number;
}

const inFlightGauge = new Gauge({
  name: 'referral_intake_bytes_in_flight',
  help: 'Request body bytes being received, parsed and stored (bounded by MAX_INTAKE_BYTES_IN_FLIGHT)',
  registers: [metricsRegistry],
});

/**
 * Bounds the memory that request bodies can take at once. A referral's body is held several times over
 * while it is parsed, checked and stored (text, object, stored JSON), so fifty clients uploading 20 MB
 * documents at the same moment could exhaust the heap. Each request with a body reserves its
 * Content-Length (or MAX_BODY_BYTES when it has none) before its body is read; when the budget is spent
 * it waits, in arrival order, and after `waitMs` is answered 503 with Retry-After. One request is always
 * admitted when nothing else is in flight, so a body the size of MAX_BODY_BYTES never waits forever.
 * Mounted after authentication: unauthenticated requests cannot spend the budget.
 */
export function intakeBudget(opts: IntakeBudgetOptions): RequestHandler {
  let inFlight = 0;
  const waiting: Array<{ cost: number; admit: () => void }> = [];

  const fits = (cost: number): boolean => inFlight === 0 || inFlight + cost <= opts.maxBytesInFlight;
  const pump = (): void => {
    while (waiting.length > 0 && fits(waiting[0].cost)) {
      const next = waiting.shift() as { cost: number; admit: () => void };
      next.admit();
    }
  };

  return (req, res, next) => {
    if (req.method === 'GET' || req.method === 'HEAD' || req.method === 'OPTIONS') {
      next();
      return;
    }
    const declared = Number(req.headers['content-length']);
    const cost = Number.isFinite(declared) && declared >= 0 ? Math.min(declared, opts.maxBodyBytes) : opts.maxBodyBytes;
    const admit = (): void => {
      inFlight += cost;
      inFlightGauge.set(inFlight);
      let released = false;
      const release = (): void => {
        if (released) return;
        released = true;
        inFlight -= cost;
        inFlightGauge.set(inFlight);
        pump();
      };
      res.once('finish', release);
      res.once('close', release);
      next();
    };
    if (waiting.length === 0 && fits(cost)) {
      admit();
      return;
    }
    const entry = {
      cost,
      admit: (): void => {
        clearTimeout(timer);
        req.off('close', gone);
        admit();
      },
    };
    const leave = (): void => {
      const i = waiting.indexOf(entry);
      if (i >= 0) waiting.splice(i, 1);
    };
    // The client gave up while waiting: nothing to answer.
    const gone = (): void => {
      clearTimeout(timer);
      leave();
    };
    const timer = setTimeout(() => {
      leave();
      req.off('close', gone);
      // Discard the body as it arrives (nothing is kept), so the client finishes sending and reads the 503.
      req.resume();
      next(
        new HttpError(
          503,
          { code: 'transient', message: 'the service is receiving as many documents as it can hold at once; try again shortly' },
          { 'Retry-After': String(Math.max(1, Math.ceil(opts.waitMs / 1000))) }
        )
      );
    }, opts.waitMs);
    req.once('close', gone);
    waiting.push(entry);
  };
}
