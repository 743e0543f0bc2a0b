import { Counter } from 'prom-client';
import { Webhook } from 'standardwebhooks';
import { errorCode, parseRetryAfterHeader } from '../http';
import { type DispatcherOptions, LeasedQueueRunner, settleRetry, withDefaults } from '../queue';
import { logger, metricsRegistry } from '../observability';
import { ulid } from '../store';
import { type Db, leasedQueue, type Settled, webhookQueue, type WebhookEntry } from '../store';
import { checkCallbackAddress, guardedFetch, type Lookup, NON_PUBLIC_CODE } from './callback-guard';

/** DispatcherOptions (src/queue) with webhook defaults: 10 attempts or 24 h, backoff 10 s to 1 h (Retry-After excepted), 10 s per attempt, 4 in flight. */
export interface WebhookDispatcherOptions extends DispatcherOptions {
  /**
   * WEBHOOK_SECRET. Either a Standard Webhooks secret `whsec_<base64 key>`, or any other string,
   * whose UTF-8 bytes are then the key: the receiver verifies with `whsec_` + base64(secret)
   * (see `receiverSecret`). Without a secret events are sent unsigned (development only).
   */
  secret?: string;
  /**
   * WEBHOOK_ALLOW_PRIVATE_NETWORKS. When false (the default here; the service's default outside production is
   * true), callbacks whose host is or resolves to a loopback, private, link-local or other non-public address
   * are refused (dead-lettered with the reason) and never sent.
   */
  allowPrivateNetworks: boolean;
  /** Resolves a callback host to its addresses (tests); default the system resolver. */
  lookup?: Lookup;
}

export const WEBHOOK_DEFAULTS: Readonly<Omit<WebhookDispatcherOptions, 'secret'>> = Object.freeze({
  maxAttempts: 10,
  maxAgeMs: 24 * 3600_000,
  baseDelayMs: 10_000,
  maxDelayMs: 3600_000,
  timeoutMs: 10_000,
  idleMs: 1000,
  concurrency: 4,
  stopGraceMs: 2000,
  allowPrivateNetworks: false,
});

const WHSEC = 'whsec_';

/**
 * The secret a receiver passes to its Standard Webhooks library (`new Webhook(secret)`):
 * a `whsec_` secret as it is, any other string as `whsec_` + base64 of its UTF-8 bytes.
 */
export function receiverSecret(secret: string): string {
  return secret.startsWith(WHSEC) ? secret : WHSEC + Buffer.from(secret, 'utf8').toString('base64');
}

/** The signer for a configured secret; throws a one-line error naming WEBHOOK_SECRET when it is unusable. */
export function createSigner(secret: string): Webhook {
  if (secret.startsWith(WHSEC) && !/^[A-Za-z0-9+/]+={0,2}$/.test(secret.slice(WHSEC.length))) {
    throw new Error('WEBHOOK_SECRET starts with whsec_ but the rest is not base64');
  }
  try {
    return new Webhook(receiverSecret(secret));
  } catch (err) {
    throw new Error(`WEBHOOK_SECRET is not usable: ${(err as Error).message}`, { cause: err });
  }
}

const webhookAttempts = new Counter({
  name: 'referral_webhook_attempts_total',
  help: 'Status webhook delivery attempts by result (delivered, retry, failed)',
  labelNames: ['result'] as const,
  registers: [metricsRegistry],
});

type Attempt =
  | { kind: 'delivered'; status: number }
  | { kind: 'retry'; reason: string; status?: number; retryAfterMs?: number }
  | { kind: 'fail'; reason: string }
  | { kind: 'aborted' };

/**
 * Sends the status webhooks queued in `webhook_outbox`. Each event is leased to one dispatcher, so
 * several processes may run side by side; a crash leaves the lease to expire and the event is sent
 * again (at least once — the `webhook-id` header is the row id, stable across attempts, for
 * de-duplication). Events of one referral go out in order (see src/store/webhook-queue.ts).
 */
export class WebhookDispatcher extends LeasedQueueRunner<WebhookEntry> {
  readonly workerId = `wh_${ulid()}`;
  protected readonly opts: WebhookDispatcherOptions;
  private readonly fetchImpl: typeof fetch;
  private readonly signer: Webhook | undefined;
  protected readonly kind = 'webhook';
  private shutdown = new AbortController();

  constructor(
    private readonly db: Db,
    opts: Partial<WebhookDispatcherOptions> = {},
    fetchImpl?: typeof fetch
  ) {
    super();
    this.opts = withDefaults(WEBHOOK_DEFAULTS, opts);
    // Without private networks, connections are made only to addresses checked at connect time.
    this.fetchImpl = fetchImpl ?? (this.opts.allowPrivateNetworks ? fetch : guardedFetch(this.opts.lookup));
    this.signer = this.opts.secret ? createSigner(this.opts.secret) : undefined;
  }

  get signed(): boolean {
    return this.signer !== undefined;
  }

  start(): void {
    if (this.running) return;
    this.shutdown = new AbortController();
    if (!this.signer) {
      logger.warn('webhooks are unsigned: set WEBHOOK_SECRET so receivers can verify them');
    }
    this.startLoop();
  }

  protected claim(free: number): Promise<WebhookEntry[]> {
    return leasedQueue.claim(this.db, webhookQueue, this.workerId, free, this.leaseMs());
  }

  /** Long enough that a live attempt never outlasts its lease. */
  private leaseMs(): number {
    return this.opts.timeoutMs * 2 + 10_000;
  }

  /**
   * Stops taking events; requests in flight get `stopGraceMs` to finish, then are aborted. An aborted
   * attempt is not counted and its event stays pending, so it is sent again after the restart.
   */
  async stop(): Promise<void> {
    await this.stopWithGrace(this.opts.stopGraceMs, () => this.shutdown.abort());
    await leasedQueue.releaseLeases(this.db, webhookQueue, this.workerId).catch(() => undefined);
  }

  protected async process(entry: WebhookEntry): Promise<void> {
    const attempts = entry.attempts + 1;
    const ids = { webhookId: entry.id, referralId: entry.referralId, seq: entry.seq };
    const started = Date.now();
    const result = await this.attempt(entry);
    const durationMs = Date.now() - started;
    let applied = true;
    switch (result.kind) {
      case 'aborted':
        // Shutdown: not counted; stop() releases the lease.
        return;
      case 'delivered':
        applied = await this.settle(entry, { state: 'done', attempts });
        webhookAttempts.inc({ result: 'delivered' });
        logger.info('webhook delivered', { ...ids, attempts, status: result.status, durationMs });
        break;
      case 'fail':
        applied = await this.settle(entry, { state: 'failed', attempts, lastError: result.reason });
        webhookAttempts.inc({ result: 'failed' });
        logger.error('webhook failed permanently', { ...ids, attempts, reason: result.reason });
        break;
      case 'retry': {
        const settled = settleRetry(attempts, Date.parse(entry.createdAt), result.reason, this.opts, { retryAfterMs: result.retryAfterMs });
        if (settled.kind === 'dead-letter') {
          applied = await this.settle(entry, { state: 'failed', attempts, lastError: settled.reason });
          webhookAttempts.inc({ result: 'failed' });
          logger.error('webhook failed permanently', { ...ids, attempts, status: result.status, reason: settled.reason });
          break;
        }
        applied = await this.settle(entry, { state: 'retry', attempts, nextAttemptAt: new Date(settled.at).toISOString(), lastError: result.reason });
        webhookAttempts.inc({ result: 'retry' });
        logger.warn('webhook will be retried', { ...ids, attempts, status: result.status, delayMs: settled.delayMs, reason: result.reason, durationMs });
        break;
      }
    }
    if (!applied) {
      logger.warn('webhook lease was lost before the outcome was recorded', { ...ids, attempts });
    }
  }

  /** Records the outcome of an attempt at an event this dispatcher holds; false when its lease was taken over. */
  private settle(entry: WebhookEntry, outcome: Settled): Promise<boolean> {
    return leasedQueue.settle(this.db, webhookQueue, entry.id, this.workerId, outcome);
  }

  /** One POST of the stored payload bytes. Logs and errors name ids and status codes, never the payload or URL. */
  private async attempt(entry: WebhookEntry): Promise<Attempt> {
    let url: URL;
    try {
      url = new URL(entry.url);
    } catch {
      return { kind: 'fail', reason: 'the callback URL is not a valid URL' };
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
      return { kind: 'fail', reason: `the callback URL scheme ${url.protocol} is not supported` };
    }
    if (url.username || url.password) {
      return { kind: 'fail', reason: 'the callback URL carries credentials, which are not sent' };
    }
    if (!this.opts.allowPrivateNetworks) {
      const check = await checkCallbackAddress(url, this.opts.lookup);
      if (!check.ok) return check.permanent ? { kind: 'fail', reason: check.reason } : { kind: 'retry', reason: check.reason };
    }
    const now = new Date();
    const headers: Record<string, string> = {
      'content-type': 'application/json',
      'user-agent': 'referral-gateway-webhooks/1',
      'webhook-id': entry.id,
      'webhook-timestamp': String(Math.floor(now.getTime() / 1000)),
    };
    if (this.signer) {
      headers['webhook-signature'] = this.signer.sign(entry.id, now, entry.payload);
    }
    const timeout = AbortSignal.timeout(this.opts.timeoutMs);
    const signal = AbortSignal.any([timeout, this.shutdown.signal]);
    let res: Response;
    try {
      res = await this.fetchImpl(url, { method: 'POST', headers, body: entry.payload, redirect: 'manual', signal });
    } catch (err) {
      if (this.shutdown.signal.aborted) return { kind: 'aborted' };
      if (timeout.aborted) return { kind: 'retry', reason: `no response within ${this.opts.timeoutMs} ms` };
      if (errorCode(err) === NON_PUBLIC_CODE) {
        return {
          kind: 'fail',
          reason: `when connecting, ${(err as { cause?: Error }).cause?.message ?? 'the callback host resolves to a non-public address'}`,
        };
      }
      return { kind: 'retry', reason: `network error: ${errorCode(err)}` };
    }
    // The receiver's body is not needed (nor logged): free the connection.
    await res.body?.cancel().catch(() => undefined);
    if (res.status >= 200 && res.status < 300) {
      return { kind: 'delivered', status: res.status };
    }
    if (res.status >= 300 && res.status < 400) {
      return { kind: 'retry', status: res.status, reason: `HTTP ${res.status}: redirects are not followed` };
    }
    const retryAfterMs = res.status === 429 || res.status === 503 ? parseRetryAfterHeader(res.headers.get('retry-after'), Date.now()) : undefined;
    return { kind: 'retry', status: res.status, reason: `HTTP ${res.status}`, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) };
  }
}
