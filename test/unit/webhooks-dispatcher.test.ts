import { readFileSync } from 'node:fs';
import { Webhook } from 'standardwebhooks';
import { logger, setLogLevel } from '../../src/observability/logger';
import { referralSchema } from '../../src/model';
import type { ReferralStatus } from '../../src/model';
import type { Db } from '../../src/store/db';
import { createSigner, receiverSecret, WebhookDispatcher, type WebhookDispatcherOptions } from '../../src/webhooks/dispatcher';
import { freshSqlite, referralWithEvents as storedReferralWithEvents } from '../helpers/db';
import { eventually } from '../helpers/gateway';
import { leasedQueue, webhookQueue } from '../../src/store';

const TOKEN = 'query-token-must-not-be-logged';
const CALLBACK = `https://ehr.example.org/hooks/referrals?token=${TOKEN}`;
const RAW_SECRET = 'a-raw-secret-of-some-length';
const EXTERNAL_ID = 'EHR-SECRET-EXTERNAL-ID';

const sample = referralSchema.parse({
  ...JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')),
  callbackUrl: CALLBACK,
});

interface Call {
  url: string;
  init: RequestInit;
  headers: Record<string, string>;
  body: string;
}

/** A fake receiver: answers with `respond(call, n)` and records every request. */
function fakeFetch(respond: (call: Call, n: number) => Response | Promise<Response> = () => new Response(null, { status: 204 })) {
  const calls: Call[] = [];
  const impl = (async (input: string | URL | Request, init: RequestInit = {}) => {
    const call: Call = { url: String(input), init, headers: { ...(init.headers as Record<string, string>) }, body: String(init.body) };
    calls.push(call);
    return respond(call, calls.length);
  }) as typeof fetch;
  return { calls, impl };
}

// The receivers in these tests listen on 127.0.0.1.
const FAST: Partial<WebhookDispatcherOptions> = { baseDelayMs: 5, maxDelayMs: 20, idleMs: 20, timeoutMs: 2000, stopGraceMs: 50, allowPrivateNetworks: true };

beforeAll(() => setLogLevel('error'));

describe('webhook dispatcher', () => {
  let db: Db;
  let dispatcher: WebhookDispatcher | undefined;

  beforeEach(async () => {
    db = await freshSqlite();
  });
  afterEach(async () => {
    await dispatcher?.stop();
    dispatcher = undefined;
    jest.restoreAllMocks();
    await db.close();
  });

  const referralWithEvents = (...statuses: ReferralStatus[]): Promise<string> => storedReferralWithEvents(db, sample, statuses, EXTERNAL_ID);

  function start(opts: Partial<WebhookDispatcherOptions>, impl: typeof fetch): WebhookDispatcher {
    dispatcher = new WebhookDispatcher(db, { ...FAST, ...opts }, impl);
    dispatcher.start();
    return dispatcher;
  }

  const settled = (referralId: string, n: number) =>
    eventually(async () => {
      const rows = await leasedQueue.forReferral(db, webhookQueue, referralId);
      return rows.length === n && rows.every((r) => r.state !== 'pending') ? rows : undefined;
    });

  test('POSTs the stored bytes, signed per Standard Webhooks with a raw secret (key = its UTF-8 bytes)', async () => {
    const id = await referralWithEvents('sent');
    const r = fakeFetch();
    start({ secret: RAW_SECRET }, r.impl);
    const [row] = await settled(id, 1);
    expect(row).toMatchObject({ state: 'delivered', attempts: 1, lastError: null });
    expect(r.calls).toHaveLength(1);
    const c = r.calls[0];
    expect(c.url).toBe(CALLBACK);
    expect(c.init.method).toBe('POST');
    expect(c.init.redirect).toBe('manual');
    expect(c.body).toBe(row.payload);
    expect(c.headers['content-type']).toBe('application/json');
    expect(c.headers['webhook-id']).toBe(row.id);
    expect(c.headers['webhook-signature']).toMatch(/^v1,[A-Za-z0-9+/]+=*$/);
    // What a receiver does, with the documented key: whsec_ + base64(secret).
    const receiverKey = `whsec_${Buffer.from(RAW_SECRET, 'utf8').toString('base64')}`;
    expect(receiverSecret(RAW_SECRET)).toBe(receiverKey);
    expect(new Webhook(receiverKey).verify(c.body, c.headers)).toMatchObject({ referralId: id, status: 'sent', previousStatus: 'queued' });
    expect(() => new Webhook(`whsec_${Buffer.from('another-secret-value').toString('base64')}`).verify(c.body, c.headers)).toThrow();
  });

  test('a whsec_ secret is used as it is; a malformed one is refused', async () => {
    const secret = `whsec_${Buffer.from('0123456789abcdef0123456789abcdef').toString('base64')}`;
    const id = await referralWithEvents('sent');
    const r = fakeFetch();
    start({ secret }, r.impl);
    await settled(id, 1);
    expect(new Webhook(secret).verify(r.calls[0].body, r.calls[0].headers)).toMatchObject({ type: 'referral.status-changed' });
    expect(() => createSigner('whsec_not base64!')).toThrow(/WEBHOOK_SECRET/);
  });

  test('without a secret events are sent unsigned, with one warning at start', async () => {
    const warn = jest.spyOn(logger, 'warn');
    const id = await referralWithEvents('sent', 'accepted');
    const r = fakeFetch();
    const d = start({}, r.impl);
    expect(d.signed).toBe(false);
    await settled(id, 2);
    expect(r.calls).toHaveLength(2);
    for (const c of r.calls) {
      expect(c.headers['webhook-signature']).toBeUndefined();
      expect(c.headers['webhook-id']).toMatch(/^wh_/);
      expect(c.headers['webhook-timestamp']).toMatch(/^\d+$/);
    }
    const unsigned = warn.mock.calls.filter(([m]) => typeof m === 'string' && /webhooks are unsigned/.test(m));
    expect(unsigned).toHaveLength(1);
  });

  test('failures are retried with the same webhook-id, and later events of the referral wait in order', async () => {
    const a = await referralWithEvents('sent', 'accepted');
    const b = await referralWithEvents('sent');
    const r = fakeFetch((c) => {
      const event = JSON.parse(c.body) as { referralId: string; status: string };
      const tries = r.calls.filter((x) => x.headers['webhook-id'] === c.headers['webhook-id']).length;
      return new Response('nope', { status: event.referralId === a && event.status === 'sent' && tries <= 3 ? 500 : 200 });
    });
    start({ secret: RAW_SECRET, concurrency: 4 }, r.impl);
    const rows = await settled(a, 2);
    await settled(b, 1);
    const aCalls = r.calls.map((c) => JSON.parse(c.body) as { referralId: string; status: string }).filter((e) => e.referralId === a);
    expect(aCalls.map((e) => e.status)).toEqual(['sent', 'sent', 'sent', 'sent', 'accepted']);
    const ids = r.calls.filter((c) => JSON.parse(c.body).referralId === a).map((c) => c.headers['webhook-id']);
    expect(ids.slice(0, 4)).toEqual([rows[0].id, rows[0].id, rows[0].id, rows[0].id]);
    expect(rows.map((x) => [x.state, x.attempts])).toEqual([
      ['delivered', 4],
      ['delivered', 1],
    ]);
    // Each attempt carries its own valid signature.
    for (const c of r.calls) expect(() => new Webhook(receiverSecret(RAW_SECRET)).verify(c.body, c.headers)).not.toThrow();
    // B was not held back behind A's failures.
    const firstB = r.calls.findIndex((c) => JSON.parse(c.body).referralId === b);
    const lastAttemptOfA1 = r.calls.map((c) => c.headers['webhook-id']).lastIndexOf(rows[0].id);
    expect(firstB).toBeLessThan(lastAttemptOfA1);
  });

  test('a redirect is a failure, not followed', async () => {
    const id = await referralWithEvents('sent');
    const r = fakeFetch(() => new Response(null, { status: 302, headers: { location: 'https://elsewhere.example/' } }));
    start({ maxAttempts: 2 }, r.impl);
    const [row] = await settled(id, 1);
    expect(row.state).toBe('failed');
    expect(row.lastError).toBe('gave up after 2 attempts; last error: HTTP 302: redirects are not followed');
    expect(r.calls.every((c) => c.url === CALLBACK && c.init.redirect === 'manual')).toBe(true);
  });

  test('Retry-After on 429/503 is honoured as a floor on the backoff; on other statuses it is ignored', async () => {
    const a = await referralWithEvents('sent');
    const b = await referralWithEvents('sent');
    const r = fakeFetch((c) => {
      const ref = JSON.parse(c.body).referralId;
      return new Response(null, { status: ref === a ? 429 : 500, headers: { 'retry-after': '120' } });
    });
    const before = Date.now();
    start({ baseDelayMs: 5, maxDelayMs: 20 }, r.impl);
    const ra = await eventually(async () =>
      (await leasedQueue.forReferral(db, webhookQueue, a))[0].attempts === 1 ? (await leasedQueue.forReferral(db, webhookQueue, a))[0] : undefined
    );
    expect(Date.parse(ra.nextAttemptAt) - before).toBeGreaterThanOrEqual(119_000);
    expect(ra.lastError).toBe('HTTP 429');
    // B (500 + Retry-After) is retried quickly, within the 20 ms cap.
    await eventually(async () => (await leasedQueue.forReferral(db, webhookQueue, b))[0].attempts >= 3);
    expect(r.calls.filter((c) => JSON.parse(c.body).referralId === a)).toHaveLength(1);
  });

  test('the age limit dead-letters an event even with attempts left, and then the next event proceeds', async () => {
    const id = await referralWithEvents('sent', 'accepted');
    const r = fakeFetch((c) => new Response(null, { status: JSON.parse(c.body).status === 'sent' ? 503 : 200 }));
    start({ maxAttempts: 1000, maxAgeMs: 150 }, r.impl);
    const rows = await settled(id, 2);
    expect(rows[0].state).toBe('failed');
    expect(rows[0].lastError).toMatch(/^gave up after \d+ attempts; last error: HTTP 503$/);
    expect(rows[1].state).toBe('delivered');
    const statuses = r.calls.map((c) => JSON.parse(c.body).status);
    expect(statuses[statuses.length - 1]).toBe('accepted');
    expect(statuses.indexOf('accepted')).toBe(statuses.length - 1);
  });

  test('no response in time and network errors are retried, then dead-lettered with a reason free of the URL', async () => {
    const slow = await referralWithEvents('sent');
    const broken = await referralWithEvents('sent');
    const r = fakeFetch((c, _n) => {
      if (JSON.parse(c.body).referralId === broken) {
        return Promise.reject(new TypeError('fetch failed', { cause: Object.assign(new Error(`connect ECONNREFUSED ${CALLBACK}`), { code: 'ECONNREFUSED' }) }));
      }
      return new Promise<Response>((_resolve, reject) => {
        c.init.signal?.addEventListener('abort', () => reject(c.init.signal?.reason));
      });
    });
    start({ maxAttempts: 2, timeoutMs: 30 }, r.impl);
    const [s] = await settled(slow, 1);
    const [b] = await settled(broken, 1);
    expect(s.lastError).toBe('gave up after 2 attempts; last error: no response within 30 ms');
    expect(b.lastError).toBe('gave up after 2 attempts; last error: network error: ECONNREFUSED');
  });

  test('an unusable callback URL is dead-lettered at once', async () => {
    const id = await referralWithEvents('sent');
    await db.kysely.updateTable('webhook_outbox').set({ url: 'https://user:pw@ehr.example.org/hook' }).where('referral_id', '=', id).execute();
    const r = fakeFetch();
    start({}, r.impl);
    const [row] = await settled(id, 1);
    expect(row).toMatchObject({ state: 'failed', attempts: 1, lastError: 'the callback URL carries credentials, which are not sent' });
    expect(r.calls).toHaveLength(0);
  });

  test('log lines carry ids and statuses, never the body, the external id or the URL query', async () => {
    const lines: unknown[] = [];
    for (const level of ['info', 'warn', 'error', 'debug'] as const) {
      jest.spyOn(logger, level).mockImplementation(((...args: unknown[]) => {
        lines.push(args);
        return logger;
      }) as never);
    }
    const id = await referralWithEvents('sent', 'accepted');
    const statusOf = (n: number): number => {
      if (n === 1) return 500;
      return n === 2 ? 302 : 200;
    };
    const r = fakeFetch((_c, n) => new Response('body from receiver', { status: statusOf(n) }));
    start({ secret: RAW_SECRET }, r.impl);
    const rows = await settled(id, 2);
    expect(rows.every((x) => x.state === 'delivered')).toBe(true);
    const text = JSON.stringify(lines);
    expect(text).toContain(rows[0].id);
    expect(text).toContain('webhook delivered');
    expect(text).toContain('webhook will be retried');
    for (const secretish of [TOKEN, EXTERNAL_ID, 'ehr.example.org', 'body from receiver', RAW_SECRET, '"status":"sent"']) {
      expect(text).not.toContain(secretish);
    }
  });

  test('stop aborts a request still in flight after the grace period; the attempt is not counted and the event stays pending', async () => {
    const id = await referralWithEvents('sent');
    const r = fakeFetch(
      (c) =>
        new Promise<Response>((_resolve, reject) => {
          c.init.signal?.addEventListener('abort', () => reject(c.init.signal?.reason));
        })
    );
    const d = start({ stopGraceMs: 30, timeoutMs: 60_000 }, r.impl);
    await eventually(async () => r.calls.length === 1);
    const t0 = Date.now();
    await d.stop();
    expect(Date.now() - t0).toBeLessThan(2000);
    const [row] = await leasedQueue.forReferral(db, webhookQueue, id);
    expect(row).toMatchObject({ state: 'pending', attempts: 0, lockedBy: null, lockedUntil: null });
    // Another dispatcher (after a restart) sends it.
    const r2 = fakeFetch();
    start({}, r2.impl);
    const [done] = await settled(id, 1);
    expect(done.state).toBe('delivered');
    expect(r2.calls[0].headers['webhook-id']).toBe(row.id);
  });
});
