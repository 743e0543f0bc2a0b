import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promisify } from 'node:util';
import express from 'express';
import { sql } from 'kysely';
import request from 'supertest';
import { loadConfig } from '../../src/config/config';
import { destinationSchema } from '../../src/config';
import { consoleRouter, escapeHtml, html } from '../../src/console';
import type { Gateway } from '../../src/gateway';
import type { DocumentReference, Task } from '@medplum/fhirtypes';
import type { FhirClient } from '../../src/destinations';
import { consoleAuditOf, getReferral } from '../../src/store';
import { ADMIN_KEY, eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';

// The console over plain HTTP (no browser): session expiry, production refusal and the Secure flag, the list's
// filters and keyset paging, and the escaping every page relies on.

describe('console sessions and lists', () => {
  let gw: Gateway;

  beforeAll(async () => {
    gw = await startGateway({ CONSOLE_SESSION_IDLE_MINUTES: '5', CONSOLE_SESSION_MAX_HOURS: '1' });
  });
  afterAll(async () => {
    await gw.stop();
  });

  async function signIn(key: string): Promise<string> {
    const res = await fetch(`${gw.url}/console/sign-in`, { method: 'POST', body: new URLSearchParams({ key }), redirect: 'manual' });
    expect(res.status).toBe(303);
    return (res.headers.get('set-cookie') ?? '').split(';')[0];
  }
  const get = (path: string, cookie: string, headers: Record<string, string> = {}): Promise<Response> =>
    fetch(`${gw.url}${path}`, { headers: { cookie, ...headers }, redirect: 'manual' });

  async function submit(externalId: string, key = KEY_A): Promise<string> {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId }),
    });
    expect(res.status).toBe(202);
    return ((await res.json()) as { id: string }).id;
  }

  test('the store keeps only a hash of the session id; an idle session and one past its absolute lifetime end', async () => {
    const cookie = await signIn(ADMIN_KEY);
    const id = cookie.split('=')[1];
    const rows = (await sql<{ id_hash: string; expires_at: string; created_at: string }>`select * from console_sessions`.execute(gw.db.kysely)).rows;
    expect(rows.some((r) => r.id_hash === id)).toBe(false);
    const row = rows[rows.length - 1];
    expect(row.id_hash).toMatch(/^[0-9a-f]{64}$/);
    expect(Date.parse(row.expires_at) - Date.parse(row.created_at)).toBe(3_600_000);
    expect((await get('/console/referrals', cookie)).status).toBe(200);

    // Idle for longer than CONSOLE_SESSION_IDLE_MINUTES: signed out, and an htmx poll is told where to go.
    await sql`update console_sessions set last_seen_at = ${new Date(Date.now() - 6 * 60_000).toISOString()} where id_hash = ${row.id_hash}`.execute(
      gw.db.kysely
    );
    const idle = await get('/console/referrals/rows', cookie, { 'HX-Request': 'true' });
    expect(idle.status).toBe(401);
    expect(idle.headers.get('hx-redirect')).toBe('/console/sign-in');
    expect((await get('/console/referrals', cookie)).headers.get('location')).toBe('/console/sign-in');

    // Active, but past the absolute lifetime.
    const second = await signIn(KEY_A);
    await sql`update console_sessions set expires_at = ${new Date(Date.now() - 1000).toISOString()} where last_seen_at = created_at`.execute(gw.db.kysely);
    expect((await get('/console/referrals', second)).status).toBe(303);
    expect((await sql<{ n: number }>`select count(*) as n from console_sessions`.execute(gw.db.kysely)).rows[0].n).toEqual(0);
  });

  test('signing in again ends the session the browser had (its cookie no longer works)', async () => {
    const first = await signIn(KEY_A);
    expect((await get('/console/referrals', first)).status).toBe(200);
    const res = await fetch(`${gw.url}/console/sign-in`, {
      method: 'POST',
      headers: { cookie: first },
      body: new URLSearchParams({ key: ADMIN_KEY }),
      redirect: 'manual',
    });
    expect(res.status).toBe(303);
    const second = (res.headers.get('set-cookie') ?? '').split(';')[0];
    expect(second).not.toBe(first);
    expect((await get('/console/referrals', first)).headers.get('location')).toBe('/console/sign-in');
    expect((await get('/console/dead-letters', second)).status).toBe(200);
  });

  test("a page's own polls do not keep an idle session alive; navigation does", async () => {
    const id = await submit('EHR-IDLE-1');
    const cookie = await signIn(ADMIN_KEY);
    const idHash = (await sql<{ id_hash: string }>`select id_hash from console_sessions order by created_at desc limit 1`.execute(gw.db.kysely)).rows[0]
      .id_hash;
    const lastSeen = async (): Promise<number> =>
      Date.parse(
        (await sql<{ last_seen_at: string }>`select last_seen_at from console_sessions where id_hash = ${idHash}`.execute(gw.db.kysely)).rows[0]
          ?.last_seen_at ?? '1970-01-01T00:00:00Z'
      );
    const idleFor = async (minutes: number): Promise<void> => {
      await sql`update console_sessions set last_seen_at = ${new Date(Date.now() - minutes * 60_000).toISOString()} where id_hash = ${idHash}`.execute(
        gw.db.kysely
      );
    };
    const hx = { 'HX-Request': 'true' };
    // Idle 4 of 5 minutes, the tab polling all the while: the idle clock is not restarted...
    await idleFor(4);
    const before = await lastSeen();
    expect((await get('/console/referrals/rows', cookie, hx)).status).toBe(200);
    expect((await get('/console/destinations/rows', cookie, hx)).status).toBe(200);
    expect((await get(`/console/referrals/${id}/live`, cookie, hx)).status).toBe(200);
    expect(await lastSeen()).toBe(before);
    // ...so past the limit the next poll finds the session ended.
    await idleFor(5.5);
    const polled = await get('/console/referrals/rows', cookie, hx);
    expect(polled.status).toBe(401);
    expect(polled.headers.get('hx-redirect')).toBe('/console/sign-in');

    // A person navigating does restart it.
    const other = await signIn(ADMIN_KEY);
    const otherHash = (await sql<{ id_hash: string }>`select id_hash from console_sessions order by created_at desc limit 1`.execute(gw.db.kysely)).rows[0]
      .id_hash;
    await sql`update console_sessions set last_seen_at = ${new Date(Date.now() - 4 * 60_000).toISOString()} where id_hash = ${otherHash}`.execute(gw.db.kysely);
    expect((await get(`/console/referrals/${id}`, other)).status).toBe(200);
    const seen = (await sql<{ last_seen_at: string }>`select last_seen_at from console_sessions where id_hash = ${otherHash}`.execute(gw.db.kysely)).rows[0];
    expect(Date.now() - Date.parse(seen.last_seen_at)).toBeLessThan(60_000);
  });

  test('/console sends a visitor to sign in, and a signed-in one to the referrals', async () => {
    expect((await fetch(`${gw.url}/console`, { redirect: 'manual' })).headers.get('location')).toBe('/console/sign-in');
    expect((await get('/console/', await signIn(KEY_A))).headers.get('location')).toBe('/console/referrals');
  });

  test('sign-out ends the session on the server, not just in the browser', async () => {
    const cookie = await signIn(KEY_A);
    const page = await (await get('/console/referrals', cookie)).text();
    const token = /name="_csrf" value="([^"]+)"/.exec(page)?.[1] as string;
    const out = await fetch(`${gw.url}/console/sign-out`, {
      method: 'POST',
      headers: { cookie, 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ _csrf: token }),
      redirect: 'manual',
    });
    expect(out.status).toBe(303);
    expect(out.headers.get('set-cookie')).toMatch(/rg_console=;.*Expires=Thu, 01 Jan 1970/);
    expect((await get('/console/referrals', cookie)).status).toBe(303);
  });

  test('the list filters by status, destination, date range and external id, and pages by keyset without repeats or gaps', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 55; i++) ids.push(await submit(`EHR-PAGE-${String(i).padStart(3, '0')}`));
    const other = await submit('EHR-PAGE-OTHER', KEY_B);
    const cookie = await signIn(KEY_A);
    const rowIds = (text: string): string[] => [...text.matchAll(/data-referral="(ref_[0-9A-Z]+)"/g)].map((m) => m[1]);

    const seen: string[] = [];
    let path = '/console/referrals';
    for (let pages = 0; pages < 10 && path; pages++) {
      const text = await (await get(path, cookie)).text();
      seen.push(...rowIds(text));
      path = /rel="next" href="([^"]+)"/.exec(text)?.[1]?.replaceAll('&amp;', '&') ?? '';
    }
    expect(new Set(seen).size).toBe(seen.length);
    expect(seen).toEqual(expect.arrayContaining(ids));
    expect(seen).not.toContain(other);

    const one = await (await get('/console/referrals?externalId=EHR-PAGE-007', cookie)).text();
    expect(rowIds(one)).toEqual([ids[7]]);
    const today = new Date().toISOString().slice(0, 10);
    const dated = rowIds(await (await get(`/console/referrals?from=${today}&to=${today}&destination=sandbox`, cookie)).text());
    expect(dated.length).toBe(50);
    expect(rowIds(await (await get('/console/referrals?to=2000-01-01', cookie)).text())).toEqual([]);
    expect(rowIds(await (await get('/console/referrals?status=cancelled', cookie)).text())).toEqual([]);
    expect(rowIds(await (await get('/console/referrals?destination=elsewhere', cookie)).text())).toEqual([]);
    // Bad filter values are ignored, never a 500.
    expect((await get('/console/referrals?status=nonsense&from=yesterday&after=garbage', cookie)).status).toBe(200);
  });

  test('CONSOLE_ENABLED=false: no console at all', async () => {
    const off = await startGateway({ CONSOLE_ENABLED: 'false' });
    try {
      expect((await fetch(`${off.url}/console/sign-in`)).status).toBe(404);
    } finally {
      await off.stop();
    }
  });

  test('production: off unless CONSOLE_ENABLED=true, and then its cookie is Secure', async () => {
    const env = {
      NODE_ENV: 'production',
      API_KEYS: 'city-hospital:city-hospital-key-0000000000001',
      ADMIN_API_KEY: 'admin-key-000000000000000000001',
      WEBHOOK_SECRET: 'a-webhook-secret-of-some-length',
      FHIR_BASE_URL: 'https://centre.example/fhir/R4',
      DATABASE_URL: 'sqlite::memory:',
    };
    expect(loadConfig(env).console.enabled).toBe(false);
    const config = loadConfig({ ...env, CONSOLE_ENABLED: 'true' });
    expect(config.console).toMatchObject({ enabled: true, centreDesk: false });
    const app = express();
    app.use(
      '/console',
      consoleRouter({
        config,
        db: gw.db,
        reports: { read: () => Promise.reject(new Error('none')) },
        destinations: { ids: () => [], get: () => undefined },
        circuits: () => [],
        pollStatus: () => ({ failures: 0 }),
        centre: () => undefined,
      })
    );
    const res = await request(app).post('/console/sign-in').type('form').send({ key: 'admin-key-000000000000000000001' });
    expect(res.status).toBe(303);
    expect(res.headers['set-cookie'][0]).toMatch(/; Path=\/console; .*HttpOnly; Secure; SameSite=Strict/);
    const page = await request(app).get('/console/sign-in');
    expect(page.headers['content-security-policy']).toContain("frame-ancestors 'none'");
    expect(page.headers['content-security-policy']).toContain('upgrade-insecure-requests');
    expect(page.headers['cache-control']).toBe('no-store');

    // Guessing keys: after 10 failures in a minute from one address, even the right key waits.
    for (let i = 0; i < 10; i++) {
      expect(
        (
          await request(app)
            .post('/console/sign-in')
            .type('form')
            .send({ key: `guess-${i}` })
        ).status
      ).toBe(401);
    }
    const blocked = await request(app).post('/console/sign-in').type('form').send({ key: 'admin-key-000000000000000000001' });
    expect(blocked.status).toBe(429);
    expect(blocked.headers['retry-after']).toBe('60');
  });

  test('centre desk: reject needs a reason and lands at the centre; a step the Task state machine does not allow is 409; only a PDF completes; a multipart post without the token is 403', async () => {
    const id = await submit('EHR-DESK-1');
    const cookie = await signIn(ADMIN_KEY);
    const task = (await eventually(async () => {
      const r = await getReferral(gw.db, id, { payload: false });
      return r?.status === 'sent' ? r.fhir?.task : undefined;
    })) as string;
    const taskId = task.split('/')[1];
    const page = await (await get(`/console/desk/sandbox/tasks/${taskId}`, cookie)).text();
    expect(page).toContain('Malignant neoplasm');
    // Viewing the patient on the desk is audited against the referral.
    expect(await consoleAuditOf(gw.db, id)).toEqual([expect.objectContaining({ actor: 'admin', action: 'centre-desk-view' })]);
    // The referral's pathology report (inline in the submission) downloads from the centre, byte for byte.
    const docLink = /href="(\/console\/desk\/sandbox\/documents\/[^"]+)" download\s*>Core biopsy pathology report/.exec(page)?.[1] as string;
    const doc = await get(docLink, cookie);
    expect(doc.headers.get('content-type')).toBe('application/pdf');
    expect(doc.headers.get('content-disposition')).toMatch(/^attachment; filename="document-[A-Za-z0-9\-.]+\.pdf"$/);
    expect(Buffer.from(await doc.arrayBuffer()).equals(Buffer.from(fixture().documents[0].data as string, 'base64'))).toBe(true);
    const token = /name="_csrf" value="([^"]+)"/.exec(page)?.[1] as string;
    const post = (action: string, body: URLSearchParams | FormData): Promise<Response> =>
      fetch(`${gw.url}/console/desk/sandbox/tasks/${taskId}/${action}`, { method: 'POST', headers: { cookie }, body, redirect: 'manual' });
    const centreTask = async (): Promise<Task> => (await (await fetch(`${gw.url}/sandbox/fhir/R4/${task}`)).json()) as Task;

    // Complete is not allowed from requested; an upload without the token is refused before anything is read into FHIR.
    const noToken = new FormData();
    noToken.set('file', new Blob(['%PDF-1.4 x'], { type: 'application/pdf' }), 'opinion.pdf');
    expect((await post('complete', noToken)).status).toBe(403);
    const early = new FormData();
    early.set('_csrf', token);
    early.set('file', new Blob(['%PDF-1.4 x'], { type: 'application/pdf' }), 'opinion.pdf');
    expect((await post('complete', early)).status).toBe(409);
    expect((await centreTask()).status).toBe('requested');

    expect((await post('reject', new URLSearchParams({ _csrf: token, reason: '' }))).status).toBe(422);
    const rejected = await post('reject', new URLSearchParams({ _csrf: token, reason: 'Outside our remit' }));
    expect(rejected.status).toBe(303);
    const t = await centreTask();
    expect(t).toMatchObject({ status: 'rejected', statusReason: { text: 'Outside our remit' } });
    // The gateway polls the destination after a desk change: the referrer sees the rejection with its reason.
    const after = await eventually(async () => {
      const r = await getReferral(gw.db, id, { payload: false });
      return r?.status === 'rejected' ? r : undefined;
    });
    expect(after.statusReason).toContain('Outside our remit');
    expect((await post('accept', new URLSearchParams({ _csrf: token }))).status).toBe(409);

    // Another referral, accepted and started: a file that is not a PDF does not complete it.
    const id2 = await submit('EHR-DESK-2');
    const task2 = (await eventually(async () => {
      const r = await getReferral(gw.db, id2, { payload: false });
      return r?.status === 'sent' ? r.fhir?.task : undefined;
    })) as string;
    const post2 = (action: string, body: URLSearchParams | FormData): Promise<Response> =>
      fetch(`${gw.url}/console/desk/sandbox/tasks/${task2.split('/')[1]}/${action}`, { method: 'POST', headers: { cookie }, body, redirect: 'manual' });
    expect((await post2('accept', new URLSearchParams({ _csrf: token }))).status).toBe(303);
    expect((await post2('start', new URLSearchParams({ _csrf: token }))).status).toBe(303);
    const notPdf = new FormData();
    notPdf.set('_csrf', token);
    notPdf.set('file', new Blob(['<html>not a pdf</html>'], { type: 'application/pdf' }), 'opinion.pdf');
    expect((await post2('complete', notPdf)).status).toBe(422);
    expect((await post2('hold', new URLSearchParams({ _csrf: token, reason: 'waiting for slides' }))).status).toBe(303);
    expect(((await (await fetch(`${gw.url}/sandbox/fhir/R4/${task2}`)).json()) as Task).status).toBe('on-hold');
  });

  test('a multipart post is refused everywhere but the opinion upload, and there the token must come before the file', async () => {
    const id = await submit('EHR-MULTI-1');
    const taskRef = (await eventually(async () => {
      const r = await getReferral(gw.db, id, { payload: false });
      return r?.status === 'sent' ? r.fhir?.task : undefined;
    })) as string;
    const taskId = taskRef.split('/')[1];
    // A dead letter to re-queue.
    gw.sandbox?.faults.failNextEntry({ resourceType: 'ServiceRequest', status: 400 });
    const dead = await submit('EHR-MULTI-DEAD');
    await eventually(async () => (await getReferral(gw.db, dead, { payload: false }))?.status === 'delivery-failed');
    const failed = (await sql<{ id: string }>`select id from outbox where referral_id = ${dead}`.execute(gw.db.kysely)).rows[0]?.id;
    expect(failed).toBeDefined();

    const cookie = await signIn(ADMIN_KEY);
    const token = /name="_csrf" value="([^"]+)"/.exec(await (await get('/console/referrals', cookie)).text())?.[1] as string;
    // Same-origin multipart posts with a valid cookie and no token: nothing happens.
    const multipart = (path: string, form: FormData): Promise<Response> =>
      fetch(`${gw.url}${path}`, { method: 'POST', headers: { cookie, 'Sec-Fetch-Site': 'same-origin' }, body: form, redirect: 'manual' });
    const empty = (): FormData => {
      const f = new FormData();
      f.set('reason', 'x');
      return f;
    };
    expect((await multipart(`/console/referrals/${id}/identity`, empty())).status).toBe(415);
    expect((await multipart(`/console/desk/sandbox/tasks/${taskId}/accept`, empty())).status).toBe(415);
    expect((await multipart(`/console/dead-letters/delivery/${failed}/requeue`, empty())).status).toBe(415);
    expect((await multipart('/console/sign-out', empty())).status).toBe(415);
    // Even with the token, a form that is not the upload is not taken as multipart.
    const withToken = empty();
    withToken.set('_csrf', token);
    expect((await multipart(`/console/desk/sandbox/tasks/${taskId}/accept`, withToken)).status).toBe(415);

    expect(await consoleAuditOf(gw.db, id)).toEqual([]);
    expect(((await (await fetch(`${gw.url}/sandbox/fhir/R4/${taskRef}`)).json()) as Task).status).toBe('requested');
    expect((await getReferral(gw.db, dead, { payload: false }))?.status).toBe('delivery-failed');
    expect((await get('/console/referrals', cookie)).status).toBe(200);

    // The upload: a token sent after the file is not waited for.
    const late = new FormData();
    late.set('file', new Blob(['%PDF-1.4 x'], { type: 'application/pdf' }), 'opinion.pdf');
    late.set('_csrf', token);
    const refused = await multipart(`/console/desk/sandbox/tasks/${taskId}/complete`, late);
    expect(refused.status).toBe(403);
    expect(await refused.text()).toContain('CSRF');
    // A file over the 20 MiB limit ahead of the token is refused for the token (403), not read to its end (413).
    const big = new FormData();
    big.set('file', new Blob([Buffer.alloc(21 * 1024 * 1024, 0x41)], { type: 'application/pdf' }), 'opinion.pdf');
    big.set('_csrf', token);
    expect((await multipart(`/console/desk/sandbox/tasks/${taskId}/complete`, big)).status).toBe(403);
    // In the X-CSRF-Token header it is checked before the body is read (here the Task is not in progress: 409).
    const headed = new FormData();
    headed.set('file', new Blob(['%PDF-1.4 x'], { type: 'application/pdf' }), 'opinion.pdf');
    const viaHeader = await fetch(`${gw.url}/console/desk/sandbox/tasks/${taskId}/complete`, {
      method: 'POST',
      headers: { cookie, 'X-CSRF-Token': token },
      body: headed,
      redirect: 'manual',
    });
    expect(viaHeader.status).toBe(409);
  });

  test("centre desk: another system's Tasks at the centre are neither listed nor opened nor moved, even one dressed as the gateway's", async () => {
    const id = await submit('EHR-DESK-OWN');
    const ours = (await eventually(async () => {
      const r = await getReferral(gw.db, id, { payload: false });
      return r?.status === 'sent' ? r.fhir?.task : undefined;
    })) as string;
    const create = async (task: Task): Promise<string> => {
      const res = await fetch(`${gw.url}/sandbox/fhir/R4/Task`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/fhir+json' },
        body: JSON.stringify(task),
      });
      expect(res.status).toBe(201);
      return ((await res.json()) as Task).id as string;
    };
    const plain = await create({ resourceType: 'Task', status: 'requested', intent: 'order' });
    // The gateway's tag and a real referral's identifier, but not the Task the gateway recorded for it.
    const forged = await create({
      resourceType: 'Task',
      status: 'requested',
      intent: 'order',
      meta: { tag: [{ system: 'https://referral-gateway.dev/fhir/CodeSystem/tags', code: 'referral-gateway' }] },
      identifier: [{ system: 'https://referral-gateway.dev/fhir/sid/referral', value: id }],
    });
    const cookie = await signIn(ADMIN_KEY);
    const token = /name="_csrf" value="([^"]+)"/.exec(await (await get('/console/referrals', cookie)).text())?.[1] as string;
    const list = await (await get('/console/desk', cookie)).text();
    expect(list).toContain(`data-task="${ours.split('/')[1]}"`);
    for (const other of [plain, forged]) {
      expect(list).not.toContain(`data-task="${other}"`);
      expect((await get(`/console/desk/sandbox/tasks/${other}`, cookie)).status).toBe(404);
      const accept = await fetch(`${gw.url}/console/desk/sandbox/tasks/${other}/accept`, {
        method: 'POST',
        headers: { cookie },
        body: new URLSearchParams({ _csrf: token }),
        redirect: 'manual',
      });
      expect(accept.status).toBe(404);
      expect(((await (await fetch(`${gw.url}/sandbox/fhir/R4/Task/${other}`)).json()) as Task).status).toBe('requested');
    }
    // Nor is another system's document downloadable through the desk.
    const doc = await fetch(`${gw.url}/sandbox/fhir/R4/DocumentReference`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ resourceType: 'DocumentReference', status: 'current', content: [{ attachment: { contentType: 'text/plain', data: 'aGk=' } }] }),
    });
    expect((await get(`/console/desk/sandbox/documents/${((await doc.json()) as { id: string }).id}`, cookie)).status).toBe(404);
  });

  /** A referral accepted and started at the sandbox through the desk; its Task id and a poster for desk actions. */
  async function started(
    g: Gateway,
    cookie: string,
    externalId: string
  ): Promise<{ id: string; taskRef: string; token: string; post: (action: string, body: URLSearchParams | FormData, url?: string) => Promise<Response> }> {
    const res = await fetch(`${g.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId }),
    });
    expect(res.status).toBe(202);
    const id = ((await res.json()) as { id: string }).id;
    const taskRef = (await eventually(async () => {
      const r = await getReferral(g.db, id, { payload: false });
      return r?.status === 'sent' ? r.fhir?.task : undefined;
    })) as string;
    const token = /name="_csrf" value="([^"]+)"/.exec(await (await fetch(`${g.url}/console/referrals`, { headers: { cookie } })).text())?.[1] as string;
    const post = (action: string, body: URLSearchParams | FormData, url = g.url): Promise<Response> =>
      fetch(`${url}/console/desk/sandbox/tasks/${taskRef.split('/')[1]}/${action}`, { method: 'POST', headers: { cookie }, body, redirect: 'manual' });
    expect((await post('accept', new URLSearchParams({ _csrf: token }))).status).toBe(303);
    expect((await post('start', new URLSearchParams({ _csrf: token }))).status).toBe(303);
    return { id, taskRef, token, post };
  }
  const opinionForm = (token: string, bytes: Buffer): FormData => {
    const f = new FormData();
    f.set('_csrf', token);
    f.set('title', 'Tumour board opinion');
    f.set('file', new Blob([bytes], { type: 'application/pdf' }), 'opinion.pdf');
    return f;
  };
  const bigPdf = (n: number): Buffer => Buffer.concat([Buffer.from('%PDF-1.4\n'), Buffer.alloc(n, 0x41), Buffer.from('\n%%EOF\n')]);

  test('centre desk: a 1.5 MB opinion goes up as a raw Binary, the DocumentReference names it by url (with size, SHA-1, the request), and the report downloads byte for byte (medplum profile)', async () => {
    const mp = await startGateway({ SANDBOX_PROFILE: 'medplum' });
    try {
      const res = await fetch(`${mp.url}/console/sign-in`, { method: 'POST', body: new URLSearchParams({ key: ADMIN_KEY }), redirect: 'manual' });
      const cookie = (res.headers.get('set-cookie') ?? '').split(';')[0];
      const { id, taskRef, token, post } = await started(mp, cookie, 'EHR-DESK-BIG');
      const pdf = bigPdf(1_500_000);
      expect((await post('complete', opinionForm(token, pdf))).status).toBe(303);

      const task = (await (await fetch(`${mp.url}/sandbox/fhir/R4/${taskRef}`)).json()) as Task;
      expect(task.status).toBe('completed');
      const docRef = task.output?.[0]?.valueReference?.reference as string;
      const doc = (await (await fetch(`${mp.url}/sandbox/fhir/R4/${docRef}`)).json()) as DocumentReference;
      const a = doc.content[0].attachment;
      expect(a.data).toBeUndefined();
      // Written as Binary/<id>; read back from Medplum (as from this profile) as a signed storage URL for that Binary.
      expect(a.url).toMatch(/^(?:Binary\/[A-Za-z0-9\-.]+|http:\/\/127\.0\.0\.1:\d+\/storage\/.*)$/);
      expect(a.size).toBe(pdf.length);
      expect(a.hash).toBe(createHash('sha1').update(pdf).digest('base64'));
      expect(doc.context?.related).toEqual([{ reference: task.focus?.reference }]);

      await eventually(async () => (await getReferral(mp.db, id, { payload: false }))?.status === 'completed');
      const report = await fetch(`${mp.url}/console/referrals/${id}/report`, { headers: { cookie } });
      expect(report.status).toBe(200);
      expect(Buffer.from(await report.arrayBuffer()).equals(pdf)).toBe(true);
    } finally {
      await mp.stop();
    }
  });

  test('centre desk: a Task changed behind the desk between its read and its update is a 409 "reload" page, and completing leaves no orphan document', async () => {
    const cookie = await signIn(ADMIN_KEY);
    const { taskRef, token } = await started(gw, cookie, 'EHR-DESK-RACE');
    const taskId = taskRef.split('/')[1];
    const real = gw.clients.get(gw.destinations.get('sandbox')!) as FhirClient;
    // The centre's own system touches the Task just before each desk update (If-Match now names an old version).
    const racing: FhirClient = {
      ...real,
      medplum: real.medplum,
      update: async (resource, version, opts) => {
        const now = (await (await fetch(`${gw.url}/sandbox/fhir/R4/${taskRef}`)).json()) as Task;
        await fetch(`${gw.url}/sandbox/fhir/R4/${taskRef}`, {
          method: 'PUT',
          headers: { 'Content-Type': 'application/fhir+json' },
          body: JSON.stringify({ ...now, note: [...(now.note ?? []), { text: 'touched by the centre' }] }),
        });
        return real.update(resource, version, opts);
      },
    };
    const app = express();
    app.use(
      '/console',
      consoleRouter({
        config: gw.config,
        db: gw.db,
        reports: { read: () => Promise.reject(new Error('none')) },
        destinations: gw.destinations,
        circuits: () => [],
        pollStatus: () => ({ failures: 0 }),
        centre: () => racing,
      })
    );
    const server = app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
    try {
      const docsBefore = ((await (await fetch(`${gw.url}/sandbox/fhir/R4/DocumentReference?_summary=count`)).json()) as { total: number }).total;
      const post = (action: string, body: URLSearchParams | FormData): Promise<Response> =>
        fetch(`${url}/console/desk/sandbox/tasks/${taskId}/${action}`, { method: 'POST', headers: { cookie }, body, redirect: 'manual' });
      const hold = await post('hold', new URLSearchParams({ _csrf: token }));
      expect(hold.status).toBe(409);
      expect(await hold.text()).toContain('reload');
      const complete = await post('complete', opinionForm(token, bigPdf(1000)));
      expect(complete.status).toBe(409);
      expect(await complete.text()).toContain('reload');
      expect(((await (await fetch(`${gw.url}/sandbox/fhir/R4/${taskRef}`)).json()) as Task).status).toBe('in-progress');
      const docsAfter = ((await (await fetch(`${gw.url}/sandbox/fhir/R4/DocumentReference?_summary=count`)).json()) as { total: number }).total;
      expect(docsAfter).toBe(docsBefore);
    } finally {
      server.close();
    }
  });

  test('the identity audit log is read through GET /admin/console-audit and `npm run admin -- console-audit`', async () => {
    const id = await submit('EHR-AUDIT-1');
    const cookie = await signIn(KEY_A);
    const token = /name="_csrf" value="([^"]+)"/.exec(await (await get(`/console/referrals/${id}`, cookie)).text())?.[1] as string;
    const shown = await fetch(`${gw.url}/console/referrals/${id}/identity`, { method: 'POST', headers: { cookie, 'X-CSRF-Token': token } });
    expect(shown.status).toBe(200);

    const api = (query: string, key = ADMIN_KEY): Promise<Response> =>
      fetch(`${gw.url}/admin/console-audit${query}`, { headers: { Authorization: `Bearer ${key}` } });
    const res = await api(`?referral=${id}`);
    expect(res.status).toBe(200);
    const body = (await res.json()) as { items: Array<{ at: string; actor: string; action: string; referralId: string }> };
    expect(body.items).toEqual([{ at: expect.any(String), actor: expect.stringMatching(/^client:/), action: 'show-patient-identity', referralId: id }]);
    expect(((await (await api('?limit=1')).json()) as { items: unknown[] }).items).toHaveLength(1);
    expect((await api(`?referral=${id}`, KEY_A)).status).toBe(401);
    expect((await api('?referral=nonsense')).status).toBe(400);
    expect((await api('?limit=0')).status).toBe(400);

    const cli = async (args: string[]): Promise<{ code: number; stdout: string }> => {
      try {
        const r = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'src/cli/admin.ts', ...args], {
          env: { ...process.env, GATEWAY_URL: gw.url, ADMIN_API_KEY: ADMIN_KEY },
        });
        return { code: 0, stdout: r.stdout };
      } catch (err) {
        return { code: (err as { code: number }).code, stdout: (err as { stdout: string }).stdout };
      }
    };
    const out = await cli(['console-audit', id]);
    expect(out.code).toBe(0);
    expect(out.stdout).toMatch(new RegExp(`^\\d{4}-\\d{2}-\\d{2}T\\S+  client:\\S+  show-patient-identity  ${id}$`, 'm'));
    expect((await cli(['console-audit', 'not-a-referral'])).code).toBe(2);
  });

  test('a detail page left open answers its long poll within a few seconds when nothing changes (six tabs must not hold every connection)', async () => {
    const id = await submit('EHR-LIVE-1');
    const cookie = await signIn(KEY_A);
    const since = /\/live\?since=([^"&]+)/.exec(await (await get(`/console/referrals/${id}`, cookie)).text())?.[1] as string;
    expect(since).toBeDefined();
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent');
    const now = (await getReferral(gw.db, id, { payload: false }))?.updatedAt as string;
    const started = Date.now();
    const polls = await Promise.all(
      Array.from({ length: 6 }, () => get(`/console/referrals/${id}/live?since=${encodeURIComponent(now)}`, cookie, { 'HX-Request': 'true' }))
    );
    expect(polls.map((p) => p.status)).toEqual([200, 200, 200, 200, 200, 200]);
    expect(Date.now() - started).toBeLessThan(6_000);
  });

  test('destinations: a centre that cannot be polled shows its errors in a row, the sandbox its last poll and lag', async () => {
    // A referral open at a centre that is down, so its poll has something to ask.
    const id = await submit('EHR-DOWN-1');
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent');
    gw.destinations.add(
      destinationSchema.parse({
        id: 'down-centre',
        name: 'Down centre',
        organization: { system: 'https://referral-gateway.dev/fhir/sid/destination', value: 'down' },
        baseUrl: 'http://127.0.0.1:9/fhir/R4',
        timeoutMs: 500,
      })
    );
    await sql`update referrals set destination = 'down-centre' where id = ${id}`.execute(gw.db.kysely);
    await gw.poller.pollOnce({ force: true });
    await gw.poller.pollOnce({ force: true });
    const cookie = await signIn(ADMIN_KEY);
    const text = await (await get('/console/destinations/rows', cookie)).text();
    const rows = new Map([...text.matchAll(/<tr data-destination="([^"]+)">([\s\S]*?)<\/tr>/g)].map((m) => [m[1], m[2]]));
    const row = (id: string): string => rows.get(id) ?? '';
    expect(row('down-centre')).toMatch(/2 in a row: .*next try/);
    expect(row('sandbox')).toMatch(/\d{4}-\d{2}-\d{2}T/);
    expect(row('sandbox')).not.toContain('in a row');
  });

  test('every interpolated value is escaped', () => {
    const evil = `"><script>alert(1)</script>'`;
    expect(html`<p title="${evil}">${evil}</p>`.text).toBe(`<p title="${escapeHtml(evil)}">${escapeHtml(evil)}</p>`);
    expect(html`${evil}`.text).not.toMatch(/[<>"']/);
    expect(
      html`<ul>
        ${['a<b', html`<li>ok</li>`]}
      </ul>`.text.replace(/\s+/g, '')
    ).toBe('<ul>a&lt;b<li>ok</li></ul>');
  });
});
