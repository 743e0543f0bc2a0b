/**
 * bench/console: what the browser console costs and how fast it shows a change (issue 14).
 *
 *  1. List latency: the real gateway (in this process, SQLite file store, built-in sandbox) with REFERRALS referral
 *     rows written straight into the store (two clients, 13 statuses, 90 days of creation times; the open ones at a
 *     destination nobody polls). GET /console/referrals (the whole page) and /console/referrals/rows (the fragment
 *     the page polls), signed in as the admin and as one client, with each filter and a deep keyset page:
 *     SAMPLES sequential requests each after a warm-up; p50, p95 and max in milliseconds.
 *  2. First paint: Debian's Chromium (playwright-core) opens the list and a detail page PAINTS times each in a
 *     fresh tab; first-contentful-paint from the browser's own Performance timeline.
 *  3. Status after a Task change: POLL_CRON every second, a referral delivered to the sandbox, its detail page open;
 *     the Task is moved at the centre (plain FHIR PUT) CHANGES times at random moments, and the time from the PUT
 *     to the new status on the page is recorded (the gateway's poll, then the page's long-polled live section).
 *
 *   npx tsx bench/console.ts
 *   REFERRALS=20000 SAMPLES=50 npx tsx bench/console.ts
 *
 * Environment: REFERRALS (100000), SAMPLES (200), PAINTS (10), CHANGES (10), CHROMIUM (/usr/bin/chromium).
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Task } from '@medplum/fhirtypes';
import { chromium, type Page } from 'playwright-core';
import { loadConfig } from '../src/config/config';
import { Gateway } from '../src/gateway';
import { getReferral, ulid } from '../src/store';

const REFERRALS = Number(process.env.REFERRALS ?? 100_000);
const SAMPLES = Number(process.env.SAMPLES ?? 200);
const PAINTS = Number(process.env.PAINTS ?? 10);
const CHANGES = Number(process.env.CHANGES ?? 10);
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const KEY_A = 'bench-key-city-hospital-000001';
const KEY_B = 'bench-key-other-clinic-0000002';
const ADMIN = 'bench-admin-key-00000000000003';
const OPEN = ['queued', 'sent', 'received', 'accepted', 'on-hold', 'in-progress'] as const;
const CLOSED = ['completed', 'completed', 'completed', 'completed', 'rejected', 'cancelled', 'failed', 'delivery-failed', 'expired'] as const;

const pct = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
};
const fmt = (n: number): string => (n >= 100 ? n.toFixed(0) : n.toFixed(1));

async function seed(gw: Gateway): Promise<{ externalId: string; deepCursor: string }> {
  const t0 = Date.now();
  const start = Date.now() - 90 * 86_400_000;
  const step = (90 * 86_400_000) / REFERRALS;
  const batch = 1000;
  let externalId = '';
  let deepCursor = '';
  for (let i = 0; i < REFERRALS; i += batch) {
    const rows = [];
    for (let j = i; j < Math.min(REFERRALS, i + batch); j++) {
      const created = new Date(start + j * step).toISOString();
      // Every 20th referral is still open, at a destination the gateway does not poll (the poller stays idle).
      const open = j % 20 === 0;
      const status = open ? OPEN[(j / 20) % OPEN.length] : CLOSED[j % CLOSED.length];
      const id = `ref_${ulid(Date.parse(created))}`;
      const ext = `EHR-BENCH-${String(j).padStart(7, '0')}`;
      if (j === Math.floor(REFERRALS / 2)) {
        externalId = ext;
        deepCursor = `${created}~${id}`;
      }
      rows.push({
        id,
        client_id: j % 2 === 0 ? 'city-hospital' : 'other-clinic',
        external_id: ext,
        idempotency_key: null,
        request_hash: 'bench',
        destination: open ? 'other-centre' : 'sandbox',
        status,
        status_reason: null,
        fhir: null,
        report: null,
        task_version: null,
        callback_url: null,
        documents_added: 0,
        documents_removed_at: null,
        created_at: created,
        updated_at: created,
      });
    }
    await gw.db.kysely.insertInto('referrals').values(rows).execute();
  }
  console.log(`seeded ${REFERRALS} referrals in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  return { externalId, deepCursor };
}

async function signIn(url: string, key: string): Promise<string> {
  const res = await fetch(`${url}/console/sign-in`, { method: 'POST', body: new URLSearchParams({ key }), redirect: 'manual' });
  if (res.status !== 303) throw new Error(`sign-in: ${res.status}`);
  return (res.headers.get('set-cookie') ?? '').split(';')[0];
}

async function listLatency(gw: Gateway, externalId: string, deepCursor: string): Promise<void> {
  const admin = await signIn(gw.url, ADMIN);
  const client = await signIn(gw.url, KEY_A);
  const week = new Date(Date.now() - 30 * 86_400_000).toISOString().slice(0, 10);
  const weekEnd = new Date(Date.now() - 23 * 86_400_000).toISOString().slice(0, 10);
  const cases: Array<[string, string, string]> = [
    ['admin, first page', admin, '/console/referrals'],
    ['admin, polled rows fragment', admin, '/console/referrals/rows'],
    ['admin, status=completed', admin, '/console/referrals?status=completed'],
    ['admin, status=sent (rare)', admin, '/console/referrals?status=sent'],
    ['admin, destination=other-centre', admin, '/console/referrals?destination=other-centre'],
    ['admin, one week', admin, `/console/referrals?from=${week}&to=${weekEnd}`],
    ['admin, external id', admin, `/console/referrals?externalId=${externalId}`],
    ['admin, page at the middle (keyset)', admin, `/console/referrals?after=${encodeURIComponent(deepCursor)}`],
    ['client, first page', client, '/console/referrals'],
    ['client, status=delivery-failed', client, '/console/referrals?status=delivery-failed'],
  ];
  console.log(`\nlist latency at ${REFERRALS} referrals (${SAMPLES} sequential requests each, ms):`);
  console.log('| view | rows | p50 | p95 | max |\n|---|---|---|---|---|');
  for (const [name, cookie, path] of cases) {
    let rows = 0;
    const times: number[] = [];
    for (let i = 0; i < SAMPLES + 10; i++) {
      const t = performance.now();
      const res = await fetch(`${gw.url}${path}`, { headers: { cookie } });
      const text = await res.text();
      if (res.status !== 200) throw new Error(`${path}: ${res.status}`);
      if (i >= 10) times.push(performance.now() - t);
      rows = (text.match(/data-referral="/g) ?? []).length;
    }
    console.log(`| ${name} | ${rows} | ${fmt(pct(times, 50))} | ${fmt(pct(times, 95))} | ${fmt(Math.max(...times))} |`);
  }
}

async function firstPaint(page: Page, url: string): Promise<number> {
  await page.goto(url);
  return page.evaluate(
    () =>
      new Promise<number>((resolve) => {
        // Runs in the page: its Performance timeline has paint entries (Node's types do not know the 'paint' type).
        const now = performance.getEntriesByName('first-contentful-paint')[0];
        if (now) return resolve(now.startTime);
        new PerformanceObserver((list) => resolve(list.getEntries()[0].startTime)).observe({ type: 'paint' as never, buffered: true });
      })
  );
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'bench-console-'));
  const config = loadConfig({
    NODE_ENV: 'test',
    PORT: '0',
    HOST: '127.0.0.1',
    DATABASE_URL: `sqlite:${join(dir, 'gateway.db')}`,
    DESTINATIONS_FILE: 'test/does-not-exist.json',
    API_KEYS: `city-hospital:${KEY_A},other-clinic:${KEY_B}`,
    ADMIN_API_KEY: ADMIN,
    LOG_LEVEL: 'error',
    POLL_CRON: '* * * * * *',
    CONSOLE_REFRESH_SECONDS: '1',
    MAX_CONNECTIONS_PER_ADDRESS: '0',
  });
  const gw = new Gateway(config, { deliveryIdleMs: 100, webhookFetch: () => Promise.resolve(new Response(null, { status: 204 })) });
  await gw.start();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
  try {
    const { externalId, deepCursor } = await seed(gw);
    await listLatency(gw, externalId, deepCursor);

    // A referral delivered to the sandbox, for the detail page and the status changes.
    const fixture = JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')) as Record<string, unknown>;
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture, externalId: 'EHR-BENCH-LIVE' }),
    });
    const id = ((await res.json()) as { id: string }).id;
    let taskRef: string | undefined;
    for (let i = 0; i < 200 && !taskRef; i++) {
      const r = await getReferral(gw.db, id, { payload: false });
      if (r?.status === 'sent') taskRef = r.fhir?.task;
      else await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (!taskRef) throw new Error('the referral was not delivered');

    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    await page.goto(`${gw.url}/console/sign-in`);
    await page.getByLabel('API key or admin key').fill(ADMIN);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForURL(`${gw.url}/console/referrals`);
    const paints: Record<string, number[]> = { list: [], detail: [] };
    for (let i = 0; i < PAINTS; i++) {
      const tab = await context.newPage();
      paints.list.push(await firstPaint(tab, `${gw.url}/console/referrals`));
      paints.detail.push(await firstPaint(tab, `${gw.url}/console/referrals/${id}`));
      await tab.close();
    }
    console.log(`\nfirst contentful paint (${PAINTS} fresh tabs, ms):`);
    console.log('| page | p50 | p95 |\n|---|---|---|');
    for (const [name, xs] of Object.entries(paints)) console.log(`| ${name} | ${fmt(pct(xs, 50))} | ${fmt(pct(xs, 95))} |`);

    // Task changes at the centre, each at a random moment within the poll second; timed until the page shows them.
    // The operator's tab in front (a background tab's timers, htmx's swap among them, are throttled to once a second).
    await page.bringToFront();
    await page.goto(`${gw.url}/console/referrals/${id}`);
    await page.locator('#live [data-status="sent"]').first().waitFor();
    const fhir = `${gw.url}/sandbox/fhir/R4`;
    const steps: Array<Task['status']> = ['accepted', 'in-progress'];
    for (let i = 0; steps.length < CHANGES; i++) steps.push(i % 2 === 0 ? 'on-hold' : 'in-progress');
    const delays: number[] = [];
    const polled: number[] = [];
    const shown: number[] = [];
    for (const status of steps) {
      await new Promise((resolve) => setTimeout(resolve, 300 + Math.random() * 1000));
      const task = (await (await fetch(`${fhir}/${taskRef}`)).json()) as Task;
      // The page notes (its own clock: the same machine's) when the new status is in its DOM: Playwright's own
      // waiting polls at growing intervals (up to 500 ms) and would add its own delay to the figure.
      const selector = `#live .status-line [data-status="${status}"]`;
      const seen = page.evaluate(
        `new Promise((resolve) => { const f = () => document.querySelector(${JSON.stringify(selector)}) && (resolve(Date.now()), true); ` +
          `if (!f()) new MutationObserver(f).observe(document.body, { subtree: true, childList: true }); })`
      ) as Promise<number>;
      const t0 = Date.now();
      const put = await fetch(`${fhir}/${taskRef}`, {
        method: 'PUT',
        headers: { 'Content-Type': 'application/fhir+json' },
        body: JSON.stringify({ ...task, status }),
      });
      if (!put.ok) throw new Error(`PUT Task: ${put.status}`);
      // When the gateway's store has the new status (its poll), watched in parallel with the page.
      let inStore = 0;
      while (!inStore) {
        const r = await getReferral(gw.db, id, { payload: false });
        if (r?.status === status) inStore = Date.now() - t0;
        else await new Promise((resolve) => setTimeout(resolve, 5));
      }
      const onPage = (await seen) - t0;
      delays.push(onPage);
      polled.push(inStore);
      shown.push(onPage - inStore);
    }
    console.log(`\nTask change at the centre to the new status on the open detail page (POLL_CRON every 1 s, ${delays.length} changes, ms):`);
    console.log(`| span | p50 | p95 | max | mean |\n|---|---|---|---|---|`);
    const row = (name: string, xs: number[]): string =>
      `| ${name} | ${fmt(pct(xs, 50))} | ${fmt(pct(xs, 95))} | ${fmt(Math.max(...xs))} | ${fmt(xs.reduce((a, b) => a + b, 0) / xs.length)} |`;
    console.log(row('PUT to the new status on the page', delays));
    console.log(row('  of which: PUT to the status in the store (the poll)', polled));
    console.log(row('  of which: store to the page (the console)', shown));
  } finally {
    await browser.close();
    await gw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
