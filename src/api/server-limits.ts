import { createServer, type IncomingMessage, type RequestListener, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { Counter, Gauge } from 'prom-client';
import { logger, metricsRegistry } from '../observability';

export interface ServerLimits {
  /** HEADERS_TIMEOUT_MS: the request line and headers must have arrived within this (Node answers 408 and closes). */
  headersTimeoutMs: number;
  /** REQUEST_TIMEOUT_MS: the whole request, body included, must have arrived within this (at least INTAKE_BODY_TIMEOUT_MS). */
  requestTimeoutMs: number;
  /** MAX_CONNECTIONS_PER_ADDRESS: open connections one remote address may hold; 0: no cap. */
  maxConnectionsPerAddress: number;
  /** How long an idle keep-alive connection is kept (default 65 s: longer than the 60 s of common load balancers). */
  keepAliveTimeoutMs?: number;
  /**
   * Requests exempt from REQUEST_TIMEOUT_MS: streamed document uploads, which may take far longer and are cut off
   * instead when they send nothing for INTAKE_BODY_TIMEOUT_MS (src/api/streamed-intake.ts). With it, the deadline
   * of the other requests is kept by this server rather than by Node (whose deadline has no exemptions).
   */
  streamed?: (req: IncomingMessage) => boolean;
}

const REQUEST_TIMEOUT_ANSWER = 'HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n';

/**
 * REQUEST_TIMEOUT_MS for every request but the streamed ones: one whose body has not all arrived in time is answered
 * 408 (as Node does) and its connection closed.
 */
function requestDeadline(server: Server, ms: number, streamed: (req: IncomingMessage) => boolean): void {
  server.on('request', (req: IncomingMessage, res: ServerResponse) => {
    if (streamed(req) || req.complete) return;
    const timer = setTimeout(() => {
      if (req.complete) return;
      if (!res.headersSent) req.socket.end(REQUEST_TIMEOUT_ANSWER);
      req.socket.destroySoon();
    }, ms);
    timer.unref();
    const clear = (): void => clearTimeout(timer);
    req.once('end', clear);
    res.once('close', clear);
  });
}

/** A refused connection is closed after this even when the client neither reads nor closes. */
const REFUSED_LINGER_MS = 1000;

const refusedCounter = new Counter({
  name: 'http_connections_refused_total',
  help: 'Connections refused with 503 because their remote address already had MAX_CONNECTIONS_PER_ADDRESS open',
  registers: [metricsRegistry],
});

const openGauge = new Gauge({
  name: 'http_connections_open',
  help: 'Open HTTP connections (served, not refused)',
  registers: [metricsRegistry],
});

const REFUSAL_TEXT = 'too many open connections from this address\n';
const REFUSAL = Buffer.from(
  `HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(REFUSAL_TEXT)}\r\n\r\n${REFUSAL_TEXT}`
);

/**
 * The HTTP server of the service with its limits set deliberately instead of Node's defaults (300 s per request,
 * timeouts checked every 30 s, any number of connections): headers within HEADERS_TIMEOUT_MS and the whole
 * request within REQUEST_TIMEOUT_MS (Node answers 408 and closes the connection), checked often enough that a
 * slow client is cut off close to its deadline, and at most MAX_CONNECTIONS_PER_ADDRESS connections per remote
 * address (the next is answered a bare 503 with Retry-After and closed).
 */
export function createLimitedServer(app: RequestListener, limits: ServerLimits): Server {
  const requestTimeout = limits.streamed ? 0 : limits.requestTimeoutMs;
  // Node refuses headersTimeout > requestTimeout.
  const headersTimeout = limits.requestTimeoutMs > 0 ? Math.min(limits.headersTimeoutMs, limits.requestTimeoutMs) : limits.headersTimeoutMs;
  const server = createServer(
    {
      headersTimeout,
      requestTimeout,
      keepAliveTimeout: limits.keepAliveTimeoutMs ?? 65_000,
      // How often Node looks for connections past those deadlines (its default, 30 s, would let a slow
      // client stay up to 30 s past them).
      connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(headersTimeout / 4))),
    },
    app
  );
  if (limits.streamed && limits.requestTimeoutMs > 0) requestDeadline(server, limits.requestTimeoutMs, limits.streamed);
  capConnectionsPerAddress(server, limits.maxConnectionsPerAddress);
  return server;
}

/** `::ffff:127.0.0.1` and `127.0.0.1` are the same client. */
const addressKey = (socket: Socket): string => {
  const a = socket.remoteAddress ?? '';
  return a.startsWith('::ffff:') ? a.slice(7) : a;
};

/**
 * Caps the open connections per remote address. Over the cap the connection never reaches the HTTP server:
 * it gets a bare `503` with `Retry-After` and `Connection: close`, what it sends is discarded, and it is
 * destroyed after REFUSED_LINGER_MS at the latest.
 */
export function capConnectionsPerAddress(server: Server, max: number): void {
  if (max <= 0) return;
  const open = new Map<string, number>();
  // The HTTP server's own connection listener runs only for the connections under the cap.
  const serve = server.listeners('connection') as Array<(socket: Socket) => void>;
  server.removeAllListeners('connection');
  let warnedAt = 0;
  server.on('connection', (socket: Socket) => {
    const address = addressKey(socket);
    const n = open.get(address) ?? 0;
    if (n >= max) {
      refusedCounter.inc();
      if (Date.now() - warnedAt > 60_000) {
        warnedAt = Date.now();
        logger.warn('connection refused: too many open connections from one address (MAX_CONNECTIONS_PER_ADDRESS)', { max });
      }
      refuse(socket);
      return;
    }
    open.set(address, n + 1);
    openGauge.inc();
    socket.once('close', () => {
      openGauge.dec();
      const m = (open.get(address) ?? 1) - 1;
      if (m <= 0) open.delete(address);
      else open.set(address, m);
    });
    for (const listener of serve) listener.call(server, socket);
  });
}

function refuse(socket: Socket): void {
  socket.on('error', () => undefined);
  const timer = setTimeout(() => socket.destroy(), REFUSED_LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  // Read and drop what the client sends, so it is not reset before it has read the answer.
  socket.resume();
  socket.end(REFUSAL);
}
