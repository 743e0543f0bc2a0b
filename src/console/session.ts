import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import {
  type ConsoleRole,
  type ConsoleSession,
  createConsoleSession,
  type Db,
  deleteConsoleSession,
  deleteExpiredConsoleSessions,
  findConsoleSession,
  touchConsoleSession,
} from '../store';

// Console sessions: a random id in an HttpOnly, SameSite=Strict cookie scoped to /console (Secure in production),
// the SHA-256 of that id in the store, an idle and an absolute expiry, and a CSRF token (synchronizer pattern)
// checked on every POST, taken from the X-CSRF-Token header (htmx sends it) or the form's `_csrf` field.

export const COOKIE = 'rg_console';
export const CSRF_HEADER = 'x-csrf-token';

export interface SessionSettings {
  idleMs: number;
  maxMs: number;
  secure: boolean;
  /** API keys by client id, and the admin key. */
  apiKeys: Map<string, string>;
  adminKey?: string;
}

export interface SignedIn {
  session: ConsoleSession;
  /** Who the session is, for the audit log and the views: `admin` or `client:<id>`. */
  actor: string;
}

const hashId = (id: string): string => createHash('sha256').update(id).digest('hex');

function sameSecret(a: string, b: string): boolean {
  // Compare digests so the lengths are equal and the comparison takes the same time whatever the key.
  return timingSafeEqual(createHash('sha256').update(a).digest(), createHash('sha256').update(b).digest());
}

/** Who a key is: the admin, one client, or nobody. Every key is compared (no early exit on a match). */
export function whoseKey(key: string, s: Pick<SessionSettings, 'apiKeys' | 'adminKey'>): ConsoleRole | undefined {
  let found: ConsoleRole | undefined;
  if (s.adminKey !== undefined && sameSecret(key, s.adminKey)) found = { role: 'admin' };
  for (const [clientId, k] of s.apiKeys) {
    if (sameSecret(key, k) && !found) found = { role: 'client', clientId };
  }
  return found;
}

export const actorOf = (who: ConsoleRole): string => (who.role === 'admin' ? 'admin' : `client:${who.clientId}`);

function cookieValue(req: Request): string | undefined {
  const header = req.headers.cookie;
  if (!header) return undefined;
  for (const part of header.split(';')) {
    const i = part.indexOf('=');
    if (i > 0 && part.slice(0, i).trim() === COOKIE) return part.slice(i + 1).trim();
  }
  return undefined;
}

function setCookie(res: Response, value: string, s: SessionSettings, maxAgeMs: number): void {
  res.cookie(COOKIE, value, { httpOnly: true, sameSite: 'strict', secure: s.secure, path: '/console', maxAge: maxAgeMs });
}

export class Sessions {
  private lastSweep = 0;

  constructor(
    private readonly db: Db,
    private readonly s: SessionSettings
  ) {}

  /** Starts a session for `who`, ending the one the request's cookie names (if any); the cookie carries its id, the store its hash. */
  async start(req: Request, res: Response, who: ConsoleRole, now = new Date()): Promise<ConsoleSession> {
    const previous = cookieValue(req);
    if (previous && previous.length <= 100) await deleteConsoleSession(this.db, hashId(previous));
    const id = randomBytes(32).toString('base64url');
    const session: ConsoleSession = {
      idHash: hashId(id),
      who,
      csrfToken: randomBytes(32).toString('base64url'),
      createdAt: now.toISOString(),
      lastSeenAt: now.toISOString(),
      expiresAt: new Date(now.getTime() + this.s.maxMs).toISOString(),
    };
    await createConsoleSession(this.db, session);
    setCookie(res, id, this.s, this.s.maxMs);
    return session;
  }

  /**
   * The request's live session, or undefined; an expired one is deleted. Its idle clock restarts unless `touch` is
   * false: a page's own refresh (an htmx poll) is not the person at the keyboard and must not keep the session alive.
   */
  async current(req: Request, opts: { touch?: boolean } = {}, now = new Date()): Promise<ConsoleSession | undefined> {
    await this.sweep(now);
    const id = cookieValue(req);
    if (!id || id.length > 100) return undefined;
    const session = await findConsoleSession(this.db, hashId(id));
    if (!session) return undefined;
    const idleSince = now.getTime() - Date.parse(session.lastSeenAt);
    if (Date.parse(session.expiresAt) <= now.getTime() || idleSince >= this.s.idleMs) {
      await deleteConsoleSession(this.db, session.idHash);
      return undefined;
    }
    // Written at most every few seconds: a page polling every second does not rewrite the row each time.
    if (opts.touch !== false && idleSince > Math.min(5_000, this.s.idleMs / 10)) await touchConsoleSession(this.db, session.idHash, now.toISOString());
    return session;
  }

  async end(req: Request, res: Response): Promise<void> {
    const id = cookieValue(req);
    if (id) await deleteConsoleSession(this.db, hashId(id));
    res.clearCookie(COOKIE, { httpOnly: true, sameSite: 'strict', secure: this.s.secure, path: '/console' });
  }

  /** Expired sessions are deleted about once a minute, on some request. */
  private async sweep(now: Date): Promise<void> {
    if (now.getTime() - this.lastSweep < 60_000) return;
    this.lastSweep = now.getTime();
    await deleteExpiredConsoleSessions(this.db, now.toISOString(), new Date(now.getTime() - this.s.idleMs).toISOString());
  }
}

/** The CSRF token a POST carries: the header htmx sets, or the form field. */
export function csrfOf(req: Request, fields?: Record<string, string>): string | undefined {
  const header = req.get(CSRF_HEADER);
  if (header) return header;
  const body = fields ?? (req.body as Record<string, unknown> | undefined);
  const v = body?._csrf;
  return typeof v === 'string' ? v : undefined;
}

export function csrfMatches(session: ConsoleSession, token: string | undefined): boolean {
  return token !== undefined && token.length > 0 && sameSecret(token, session.csrfToken);
}

/**
 * POSTs from another site are refused even before the token is checked: Sec-Fetch-Site decides when the browser
 * sends it (every current one does); otherwise an Origin naming another host.
 */
export function crossSite(req: Request): boolean {
  const site = req.get('sec-fetch-site');
  if (site) return site !== 'same-origin' && site !== 'none';
  const origin = req.get('origin');
  if (!origin || origin === 'null') return false;
  try {
    return new URL(origin).host !== req.get('host');
  } catch {
    return true;
  }
}

export type Handler = (req: Request, res: Response, next: NextFunction) => Promise<void> | void;
