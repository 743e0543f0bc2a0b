import type { Db } from '../../src/store/db';
import {
  consoleAuditOf,
  consoleReferralPage,
  createConsoleSession,
  deleteExpiredConsoleSessions,
  findConsoleSession,
  listConsoleAudit,
  openCountAt,
  recordConsoleAudit,
  touchConsoleSession,
} from '../../src/store';
import { fixture } from '../helpers/gateway';
import { referralWithEvents, storeBackends } from '../helpers/db';
import type { Referral } from '../../src/model';

/** The console's repositories (migration 0013_console) on SQLite and PostgreSQL. */
describe.each(storeBackends())('console store on %s', (_name, open) => {
  let db: Db;
  beforeAll(async () => {
    db = await open();
  });
  afterAll(async () => {
    await db.close();
  });

  test('sessions: found by hash, touched, swept when idle or past their lifetime', async () => {
    const at = '2026-01-01T10:00:00.000Z';
    await createConsoleSession(db, {
      idHash: 'a'.repeat(64),
      who: { role: 'admin' },
      csrfToken: 't1',
      createdAt: at,
      lastSeenAt: at,
      expiresAt: '2026-01-01T22:00:00.000Z',
    });
    await createConsoleSession(db, {
      idHash: 'b'.repeat(64),
      who: { role: 'client', clientId: 'city-hospital' },
      csrfToken: 't2',
      createdAt: at,
      lastSeenAt: at,
      expiresAt: '2026-01-01T11:00:00.000Z',
    });
    expect(await findConsoleSession(db, 'b'.repeat(64))).toMatchObject({ who: { role: 'client', clientId: 'city-hospital' }, csrfToken: 't2' });
    await touchConsoleSession(db, 'a'.repeat(64), '2026-01-01T10:50:00.000Z');
    // At 11:00 with a 30-minute idle limit: b is past its lifetime, a was seen 10 minutes ago.
    expect(await deleteExpiredConsoleSessions(db, '2026-01-01T11:00:00.000Z', '2026-01-01T10:30:00.000Z')).toBe(1);
    expect(await findConsoleSession(db, 'b'.repeat(64))).toBeUndefined();
    expect(await findConsoleSession(db, 'a'.repeat(64))).toMatchObject({ lastSeenAt: '2026-01-01T10:50:00.000Z' });
  });

  test('the list pages newest first by keyset across clients, or one client only, with filters', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) {
      await new Promise((resolve) => setTimeout(resolve, 3)); // distinct creation times: the expected order is theirs
      ids.push(await referralWithEvents(db, { ...fixture(), externalId: `EHR-CS-${i}` } as unknown as Referral, i % 2 ? ['queued'] : ['queued', 'sent'], 'X-'));
    }
    const seen: string[] = [];
    let after: { createdAt: string; id: string } | undefined;
    do {
      const page = await consoleReferralPage(db, { limit: 3, after });
      seen.push(...page.items.map((r) => r.id));
      after = page.next;
    } while (after);
    expect(seen.filter((id) => ids.includes(id))).toEqual([...ids].reverse());
    expect(new Set(seen).size).toBe(seen.length);
    const sent = await consoleReferralPage(db, { limit: 50, status: 'sent' });
    expect(sent.items.map((r) => r.id).filter((id) => ids.includes(id))).toEqual([ids[6], ids[4], ids[2], ids[0]]);
    expect((await consoleReferralPage(db, { limit: 50, clientId: 'nobody' })).items).toEqual([]);
    // The destinations view's count of referrals still open at the centre: the four sent ones.
    expect(await openCountAt(db, 'sandbox')).toBe(4);
    expect(await openCountAt(db, 'elsewhere')).toBe(0);
  });

  test('the audit log keeps who showed which referral, and when', async () => {
    await recordConsoleAudit(db, { at: '2026-01-01T10:00:00.000Z', actor: 'admin', action: 'show-patient-identity', referralId: 'ref_X' });
    await recordConsoleAudit(db, { at: '2026-01-01T10:05:00.000Z', actor: 'client:a', action: 'show-patient-identity', referralId: 'ref_X' });
    expect((await consoleAuditOf(db, 'ref_X')).map((a) => a.actor)).toEqual(['admin', 'client:a']);
    await recordConsoleAudit(db, { at: '2026-01-01T10:10:00.000Z', actor: 'admin', action: 'centre-desk-view', referralId: 'ref_Y' });
    // The admin API's listing: newest first, all or one referral's, at most `limit`.
    expect((await listConsoleAudit(db, { limit: 10 })).map((a) => `${a.referralId} ${a.actor}`)).toEqual(['ref_Y admin', 'ref_X client:a', 'ref_X admin']);
    expect((await listConsoleAudit(db, { referralId: 'ref_X', limit: 1 })).map((a) => a.actor)).toEqual(['client:a']);
  });
});
