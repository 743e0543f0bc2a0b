import type { IncomingMessage } from 'node:http';
import type { RequestHandler } from 'express';
import { Counter, Gauge } from 'prom-client';
import { metricsRegistry } from '../observability/metrics';
import { HttpError } from './outcome';

export interface IntakeBudgetOptions {
  /** Request body bytes the service parses, checks and stores at once (MAX_INTAKE_BYTES_IN_FLIGHT). */
  maxBytesInFlight: number;
  /** MAX_BODY_BYTES: what a request without Content-Length, or with a Content-Encoding, is counted as. */
  maxBodyBytes: number;
  /** How long a request may wait for room before it is answered 503 (INTAKE_WAIT_MS). */
  waitMs: number;
  /** INTAKE_CLIENT_SHARE: the fraction of maxBytesInFlight one client may hold (1: no per-client limit). Default 1. */
  clientShare?: number;
}

const inFlightGauge = new Gauge({
  name: 'referral_intake_bytes_in_flight',
  help: 'Request body bytes being received, parsed and stored (bounded by MAX_INTAKE_BYTES_IN_FLIGHT)',
  registers: [metricsRegistry],
});

const clientGauge = new Gauge({
  name: 'referral_intake_client_bytes_in_flight',
  help: 'Request body bytes in flight per client (bounded by INTAKE_CLIENT_SHARE x MAX_INTAKE_BYTES_IN_FLIGHT)',
  labelNames: ['client'] as const,
  registers: [metricsRegistry],
});

const waitedOutCounter = new Counter({
  name: 'referral_intake_wait_timeouts_total',
  help: 'Requests answered 503 because no room in the intake budget came within INTAKE_WAIT_MS, per client',
  labelNames: ['client'] as const,
  registers: [metricsRegistry],
});

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

interface Waiter {
  client: string;
  cost: number;
  admit: () => void;
}

/**
 * Bounds the memory that request bodies can take at once, and shares it fairly between clients. A referral's
 * body is held while it is parsed, checked and stored, so fifty clients uploading 20 MB documents at the same
 * moment could exhaust the heap. Each request with a body reserves its cost (intakeCost) before its body is
 * read, until its answer has been sent.
 *
 * - The budget: the reservations in flight stay within maxBytesInFlight; one request is always admitted when
 *   nothing else is in flight, so a body the size of MAX_BODY_BYTES never waits forever.
 * - The client share: one client (req.clientId) holds at most clientShare x maxBytesInFlight, so a client that
 *   opens many slow uploads cannot take the room the others need; a client that holds nothing always has one
 *   request admitted (when the budget has room for it), so a single big body still passes.
 * - Order: waiting requests are admitted in arrival order, except that the requests of a client over its share
 *   are passed over (they wait for that client's own requests to end) and the next client's go first.
 * - A request that gets no room within `waitMs` is answered 503 with Retry-After.
 *
 * Mounted after authentication (unauthenticated requests cannot spend the budget) and before the body reader,
 * which gives a body INTAKE_BODY_TIMEOUT_MS from admission to arrive (408 after, and the room is released).
 */
export function intakeBudget(opts: IntakeBudgetOptions): RequestHandler {
  let inFlight = 0;
  const held = new Map<string, number>();
  const waiting: Waiter[] = [];
  const shareBytes = Math.max(1, Math.floor(Math.min(1, opts.clientShare ?? 1) * opts.maxBytesInFlight));

  const globalFits = (cost: number): boolean => inFlight === 0 || inFlight + cost <= opts.maxBytesInFlight;
  const clientFits = (client: string, cost: number): boolean => {
    const h = held.get(client) ?? 0;
    return h === 0 || h + cost <= shareBytes;
  };

  /** Admits waiting requests in order; a client over its share is passed over, the first other that does not fit stops it. */
  let pumping = false;
  let again = false;
  const pump = (): void => {
    // An admission runs the next handler, which may release room and call pump again: run once more instead.
    if (pumping) {
      again = true;
      return;
    }
    pumping = true;
    try {
      do {
        again = false;
        let passedOver: Set<string> | undefined;
        for (let i = 0; i < waiting.length; ) {
          const w = waiting[i];
          if (passedOver?.has(w.client) || !clientFits(w.client, w.cost)) {
            (passedOver ??= new Set()).add(w.client);
            i++;
            continue;
          }
          if (!globalFits(w.cost)) break;
          waiting.splice(i, 1);
          w.admit();
        }
      } while (again);
    } finally {
      pumping = false;
    }
  };

  const setHeld = (client: string, delta: number): void => {
    const h = (held.get(client) ?? 0) + delta;
    if (h <= 0) {
      held.delete(client);
      clientGauge.remove({ client });
    } else {
      held.set(client, h);
      clientGauge.set({ client }, h);
    }
    inFlight += delta;
    inFlightGauge.set(inFlight);
  };

  return (req, res, next) => {
    if (req.method === 'GET' || req.method === 'HEAD' || req.method === 'OPTIONS') {
      next();
      return;
    }
    const cost = intakeCost(req.headers, opts.maxBodyBytes);
    if (cost === 0) {
      next();
      return;
    }
    const client = req.clientId ?? '';

    let timer: NodeJS.Timeout | undefined;
    const gone = (): void => {
      // The client gave up while waiting: nothing to answer.
      clearTimeout(timer);
      leave();
    };
    const leave = (): void => {
      const i = waiting.indexOf(entry);
      if (i >= 0) waiting.splice(i, 1);
      // It may have held back others (the oldest that did not fit, or its client's later requests).
      pump();
    };
    const entry: Waiter = {
      client,
      cost,
      admit: (): void => {
        clearTimeout(timer);
        req.off('close', gone);
        setHeld(client, cost);
        let released = false;
        const release = (): void => {
          if (released) return;
          released = true;
          releases.delete(req);
          setHeld(client, -cost);
          pump();
        };
        releases.set(req, release);
        res.once('finish', release);
        res.once('close', release);
        next();
      },
    };
    waiting.push(entry);
    pump();
    if (!waiting.includes(entry)) return; // admitted

    timer = setTimeout(() => {
      leave();
      req.off('close', gone);
      waitedOutCounter.inc({ client });
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
  };
}
