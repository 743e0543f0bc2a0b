import { mkdirSync, readFileSync } from 'node:fs';
import { type Browser, type BrowserContext, chromium, type Page } from 'playwright-core';
import type { Gateway } from '../../src/gateway';
import { logger } from '../../src/observability/logger';
import { consoleAuditOf, getReferral } from '../../src/store';
import { ADMIN_KEY, eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { LogCapture } from '../helpers/log-capture';

// The console in a real browser (Debian's Chromium driven by playwright-core): one gateway with its sandbox and
// one browser for the whole file. Screenshots of each view go to docs/console-*.png (docs/console.md shows them).

const AXE = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const PHI = ['Asha', 'Rao', 'MRN-0042', '1968-04-12', '98xxxxxx01', 'asha@example.org'];
const PDF = Buffer.from(
  '%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n2 0 obj <</Type /Pages /Kids [] /Count 0>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n'
);

describe('the browser console', () => {
  let gw: Gateway;
  let browser: Browser;
  const contexts: BrowserContext[] = [];
  const urls: string[] = [];
  /** Errors in the pages' consoles (a Content-Security-Policy violation shows there). */
  const pageErrors: string[] = [];
  const capture = new LogCapture({ level: 'info' });
  let referralId = '';

  beforeAll(async () => {
    mkdirSync('docs', { recursive: true });
    logger.add(capture);
    for (const t of logger.transports) if (t !== capture) t.silent = true;
    [gw, browser] = await Promise.all([
      startGateway({ LOG_LEVEL: 'info', DELIVERY_MAX_ATTEMPTS: '2' }),
      chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] }),
    ]);
  }, 60_000);
  afterAll(async () => {
    for (const t of logger.transports) t.silent = false;
    logger.remove(capture);
    logger.level = 'error';
    await browser?.close();
    await gw?.stop();
  });

  /** A fresh browser context signed in with `key` on the console's sign-in form. */
  async function signIn(key: string): Promise<Page> {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    contexts.push(context);
    const page = await context.newPage();
    page.on('request', (r) => urls.push(r.url()));
    page.on('console', (m) => {
      if (m.type() === 'error') pageErrors.push(m.text());
    });
    page.on('pageerror', (e) => pageErrors.push(e.message));
    await page.goto(`${gw.url}/console/sign-in`);
    await page.getByLabel('API key or admin key').fill(key);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForURL(`${gw.url}/console/referrals`);
    return page;
  }

  /** axe-core's serious and critical violations on the page as it is (run through the DevTools protocol: the page's CSP allows no inline script). */
  async function axeProblems(page: Page): Promise<string[]> {
    await page.evaluate(AXE);
    const result = await page.evaluate(async () => {
      const r = await (globalThis as unknown as { axe: { run(): Promise<{ violations: Array<{ id: string; impact: string; nodes: unknown[] }> }> } }).axe.run();
      return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.length }));
    });
    return result.filter((v) => v.impact === 'serious' || v.impact === 'critical').map((v) => `${v.id} (${v.impact}, ${v.nodes} nodes)`);
  }

  async function view(page: Page, name: string): Promise<void> {
    expect(await axeProblems(page)).toEqual([]);
    await page.screenshot({ path: `docs/console-${name}.png`, fullPage: true });
  }

  async function submit(externalId: string, key = KEY_A): Promise<string> {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId }),
    });
    expect(res.status).toBe(202);
    return ((await res.json()) as { id: string }).id;
  }

  test('sign-in: the key goes in a POST body only, the session cookie is HttpOnly, SameSite=Strict, Path=/console, and nothing is kept in storage', async () => {
    const anonymous = await browser.newPage();
    await anonymous.goto(`${gw.url}/console/referrals`);
    expect(anonymous.url()).toBe(`${gw.url}/console/sign-in`);
    await view(anonymous, 'sign-in');
    // By keyboard alone: Tab to the key field, type, Enter.
    for (let i = 0; i < 5 && (await anonymous.evaluate('document.activeElement && document.activeElement.id')) !== 'key'; i++) {
      await anonymous.keyboard.press('Tab');
    }
    expect(await anonymous.evaluate('document.activeElement.id')).toBe('key');
    await anonymous.keyboard.type('not-a-key-at-all');
    await anonymous.keyboard.press('Enter');
    await anonymous.getByRole('alert').waitFor();
    expect(await anonymous.getByRole('alert').textContent()).toContain('not valid');
    await anonymous.close();

    const page = await signIn(ADMIN_KEY);
    const cookies = await page.context().cookies();
    expect(cookies).toHaveLength(1);
    expect(cookies[0]).toMatchObject({ name: 'rg_console', httpOnly: true, sameSite: 'Strict', path: '/console', secure: false });
    expect(cookies[0].value).not.toContain(ADMIN_KEY);
    const storage = await page.evaluate(() => ({ local: JSON.stringify(localStorage), session: JSON.stringify(sessionStorage) }));
    // Nothing in local storage (htmx's page snapshots are off); session storage holds only htmx's note of the current path.
    expect(storage).toEqual({ local: '{}', session: JSON.stringify({ 'htmx-current-path-for-history': '/console/referrals' }) });
    expect(urls.some((u) => u.includes(ADMIN_KEY) || u.includes(KEY_A))).toBe(false);

    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.waitForURL(`${gw.url}/console/sign-in`);
    await page.goto(`${gw.url}/console/referrals`);
    expect(page.url()).toBe(`${gw.url}/console/sign-in`);
  });

  test('end to end: a referral appears as sent, the centre desk accepts and completes it with a PDF, the operator sees completed and downloads the report', async () => {
    const page = await signIn(ADMIN_KEY);
    referralId = await submit('EHR-CONSOLE-1');
    // The list refreshes itself (htmx polling): the row turns to sent without a reload.
    const row = page.locator(`tr[data-referral="${referralId}"]`);
    await row.locator('[data-status="sent"]').waitFor({ timeout: 15_000 });
    await view(page, 'referrals');

    await row.getByRole('link').click();
    await page.locator('#live [data-status="sent"]').first().waitFor();
    expect(await page.locator('#identity').textContent()).not.toContain('Rao');
    await view(page, 'referral');

    // Patient identity: masked until asked for, and the asking is audited.
    await page.getByRole('button', { name: 'Show patient identity' }).click();
    await page.locator('#identity', { hasText: 'Asha Rao' }).waitFor();
    const audit = await consoleAuditOf(gw.db, referralId);
    expect(audit).toEqual([expect.objectContaining({ actor: 'admin', action: 'show-patient-identity', referralId })]);

    // The centre desk: the Task waits there; accept, start, complete with a PDF.
    const task = (await getReferral(gw.db, referralId, { payload: false }))?.fhir?.task?.split('/')[1] as string;
    await page.getByRole('link', { name: 'Centre desk' }).click();
    await page.locator(`tr[data-task="${task}"]`).waitFor();
    await view(page, 'desk');
    await page.locator(`tr[data-task="${task}"] a`).click();
    expect(await page.locator('main').textContent()).toContain('Malignant neoplasm');
    await view(page, 'desk-task');
    await page.getByRole('button', { name: 'Accept' }).click();
    await page.locator('[data-task-status="accepted"]').waitFor();
    await page.getByRole('button', { name: 'Start' }).click();
    await page.locator('[data-task-status="in-progress"]').waitFor();
    await page.getByLabel('Opinion (PDF)').setInputFiles({ name: 'opinion.pdf', mimeType: 'application/pdf', buffer: PDF });
    await page.getByRole('button', { name: 'Complete with this opinion' }).click();
    await page.locator('[data-task-status="completed"]').waitFor();

    // Back in the operator's view, the status updates by itself to completed, and the report downloads.
    await page.goto(`${gw.url}/console/referrals/${referralId}`);
    await page.locator('#live [data-status="completed"]').first().waitFor({ timeout: 15_000 });
    const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('link', { name: /Download/ }).click()]);
    const bytes = readFileSync(await download.path());
    expect(bytes.equals(PDF)).toBe(true);
  });

  test('a dead letter from a failing destination is re-queued from the console and then delivered', async () => {
    // The sandbox refuses the next transaction's ServiceRequest with a 400: a permanent refusal, dead-lettered at once.
    gw.sandbox?.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 400 });
    const id = await submit('EHR-CONSOLE-DEAD');
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'delivery-failed');

    const page = await signIn(ADMIN_KEY);
    await page.getByRole('link', { name: 'Dead letters' }).click();
    const row = page.locator('tr', { has: page.locator(`a[href="/console/referrals/${id}"]`) });
    await row.waitFor();
    await view(page, 'dead-letters');
    await row.getByRole('button', { name: /Re-queue/ }).click();
    await page.getByRole('status').waitFor();
    expect(await page.getByRole('status').textContent()).toContain('Re-queued');
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent');

    await page.getByRole('link', { name: 'Destinations' }).click();
    await page.locator('tr[data-destination="sandbox"]').waitFor();
    expect(await page.locator('tr[data-destination="sandbox"]').textContent()).toContain('closed');
    await view(page, 'destinations');
  });

  test('a client key sees only its own referrals, in every view and behind it; a post without the CSRF token is refused', async () => {
    const mine = await submit('EHR-OTHER-1', KEY_B);
    const page = await signIn(KEY_B);
    await page.locator(`tr[data-referral="${mine}"]`).waitFor();
    expect(await page.locator(`tr[data-referral="${referralId}"]`).count()).toBe(0);
    expect(await page.locator('main').textContent()).not.toContain('EHR-CONSOLE-1');

    const request = page.context().request;
    for (const path of [`/console/referrals/${referralId}`, `/console/referrals/${referralId}/live`, `/console/referrals/${referralId}/report`]) {
      expect({ path, status: (await request.get(`${gw.url}${path}`)).status() }).toEqual({ path, status: 404 });
    }
    expect((await request.get(`${gw.url}/console/referrals/rows?externalId=EHR-CONSOLE-1`)).status()).toBe(200);
    expect(await (await request.get(`${gw.url}/console/referrals/rows?externalId=EHR-CONSOLE-1`)).text()).not.toContain(referralId);
    for (const path of ['/console/dead-letters', '/console/destinations', '/console/desk']) {
      expect({ path, status: (await request.get(`${gw.url}${path}`)).status() }).toEqual({ path, status: 403 });
    }

    // Without the token (same origin, valid session): 403, and nothing was audited.
    const noToken = await request.post(`${gw.url}/console/referrals/${mine}/identity`, { headers: { Origin: gw.url } });
    expect(noToken.status()).toBe(403);
    const wrongToken = await request.post(`${gw.url}/console/referrals/${mine}/identity`, { headers: { Origin: gw.url, 'X-CSRF-Token': 'guess' } });
    expect(wrongToken.status()).toBe(403);
    expect(await consoleAuditOf(gw.db, mine)).toEqual([]);
    // Another client's referral, even with the session's own token: answered as unknown, not audited.
    const token = await page.locator('input[name="_csrf"]').first().inputValue();
    const other = await request.post(`${gw.url}/console/referrals/${referralId}/identity`, { headers: { Origin: gw.url, 'X-CSRF-Token': token } });
    expect(other.status()).toBe(404);
    expect((await consoleAuditOf(gw.db, referralId)).every((a) => a.actor === 'admin')).toBe(true);
    // From another site, even with the token: refused.
    const crossSite = await request.post(`${gw.url}/console/referrals/${mine}/identity`, {
      headers: { Origin: 'https://evil.example', 'X-CSRF-Token': token },
    });
    expect(crossSite.status()).toBe(403);
    // With it, from the page (htmx sends the header): shown and audited as this client.
    await page.goto(`${gw.url}/console/referrals/${mine}`);
    await page.getByRole('button', { name: 'Show patient identity' }).click();
    await page.locator('#identity', { hasText: 'Asha Rao' }).waitFor();
    expect(await consoleAuditOf(gw.db, mine)).toEqual([expect.objectContaining({ actor: 'client:other-clinic' })]);
  });

  test('the pages ran without a script error or a Content-Security-Policy violation', () => {
    expect(pageErrors.filter((e) => !/status of 40[34]/.test(e))).toEqual([]);
  });

  test('no patient data in any URL the browser asked for, nor in any log line', () => {
    expect(urls.length).toBeGreaterThan(20);
    for (const word of PHI) {
      expect(urls.filter((u) => decodeURIComponent(u).includes(word))).toEqual([]);
      expect(capture.lines.filter((l) => l.includes(word))).toEqual([]);
    }
    expect(capture.lines.some((l) => l.includes('console: patient identity shown'))).toBe(true);
  });
});
