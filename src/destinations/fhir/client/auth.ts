import { randomUUID, type KeyObject } from 'node:crypto';
import { SignJWT } from 'jose';
import type { DestinationAuth } from '../../../config';
import { loadPrivateKey, requireEnv } from '../../../config';
import { DeadlineExceeded, errorCode, fetchWithDeadline, parseRetryAfterHeader, type TimedResponse } from '../../../http';

/**
 * Supplies the Authorization header for requests to one destination.
 *
 * `getHeaders()` never returns secrets in anything but the header value; `invalidate()` drops a cached
 * token so the next `getHeaders()` fetches a new one (used once after a 401 from the FHIR server).
 */
export interface AuthProvider {
  getHeaders(): Promise<Record<string, string>>;
  invalidate(): void;
  /** True when `invalidate()` can produce different credentials (client-credentials, smart-backend), so a 401 is worth one retry. */
  readonly refreshable: boolean;
}

export interface AuthProviderOptions {
  /** Timeout for one token request; default 30 s. */
  timeoutMs?: number;
  /** Clock, for tests. */
  now?: () => number;
}

/** A token endpoint failure. `kind`, `status` and `retryAfterMs` mirror `FhirRequestError` so callers can map it. */
export class TokenRequestError extends Error {
  readonly kind: 'network' | 'timeout' | 'http' | 'invalid-response';
  readonly status?: number;
  readonly retryAfterMs?: number;

  constructor(kind: TokenRequestError['kind'], message: string, extra: { status?: number; retryAfterMs?: number; cause?: unknown } = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'TokenRequestError';
    this.kind = kind;
    this.status = extra.status;
    this.retryAfterMs = extra.retryAfterMs;
  }
}

type FetchImpl = typeof fetch;

/** Renew this long before the server's `expires_in` runs out (at most a tenth of the lifetime). */
const EXPIRY_MARGIN_MS = 60_000;
/** Lifetime assumed when the token response has no `expires_in`. A 401 still forces a re-fetch. */
const DEFAULT_TOKEN_LIFETIME_MS = 300_000;
/** SMART Backend Services: the client assertion's `exp` is at most five minutes ahead; we use less. */
const ASSERTION_LIFETIME_S = 240;
const JWT_BEARER_ASSERTION = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

/**
 * Builds the auth provider for a destination. Secrets are read from `env` by the variable names in the
 * destination config; a missing or empty variable throws an error naming the variable (never its value).
 */
export function createAuthProvider(
  auth: DestinationAuth,
  env: NodeJS.ProcessEnv = process.env,
  fetchImpl: FetchImpl = fetch,
  options: AuthProviderOptions = {}
): AuthProvider {
  switch (auth.type) {
    case 'none':
      return { refreshable: false, getHeaders: async () => ({}), invalidate: () => undefined };

    case 'basic': {
      const header = (): string =>
        'Basic ' + Buffer.from(`${requireEnv(env, auth.usernameEnv)}:${requireEnv(env, auth.passwordEnv)}`, 'utf8').toString('base64');
      header(); // fail fast on a missing variable
      return { refreshable: false, getHeaders: async () => ({ Authorization: header() }), invalidate: () => undefined };
    }

    case 'bearer': {
      requireEnv(env, auth.tokenEnv);
      return {
        refreshable: false,
        getHeaders: async () => ({ Authorization: `Bearer ${requireEnv(env, auth.tokenEnv)}` }),
        invalidate: () => undefined,
      };
    }

    case 'client-credentials': {
      requireEnv(env, auth.clientIdEnv);
      requireEnv(env, auth.clientSecretEnv);
      const request = async (): Promise<TokenRequest> => {
        const clientId = requireEnv(env, auth.clientIdEnv);
        const clientSecret = requireEnv(env, auth.clientSecretEnv);
        const form = new URLSearchParams({ grant_type: 'client_credentials' });
        if (auth.scope) {
          form.set('scope', auth.scope);
        }
        const basic = Buffer.from(`${formEncode(clientId)}:${formEncode(clientSecret)}`, 'utf8').toString('base64');
        return { form, headers: { Authorization: `Basic ${basic}` } };
      };
      return new TokenProvider(auth.tokenUrl, request, fetchImpl, options);
    }

    case 'smart-backend': {
      const clientId = requireEnv(env, auth.clientIdEnv);
      const key = loadPrivateKey(auth, env);
      const request = async (): Promise<TokenRequest> => {
        const assertion = await signClientAssertion({
          clientId,
          tokenUrl: auth.tokenUrl,
          key,
          alg: auth.alg,
          kid: auth.kid,
          // Wall-clock time, always: the token server checks exp against its own clock.
          nowMs: Date.now(),
        });
        const form = new URLSearchParams({
          grant_type: 'client_credentials',
          scope: auth.scope,
          client_assertion_type: JWT_BEARER_ASSERTION,
          client_assertion: assertion,
        });
        return { form, headers: {} };
      };
      return new TokenProvider(auth.tokenUrl, request, fetchImpl, options);
    }

    default: {
      const unknownType: never = auth;
      throw new Error(`Unsupported destination auth type ${(unknownType as { type: string }).type}`);
    }
  }
}

/** RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding. */
function formEncode(value: string): string {
  return encodeURIComponent(value).replace(/%20/g, '+');
}

/**
 * A SMART Backend Services client assertion (RFC 7523): iss = sub = client_id, aud = token URL, a unique jti,
 * iat = now and exp = now + 4 min (SMART: no more than 5 minutes ahead), signed with RS384 or ES384.
 */
export async function signClientAssertion(args: {
  clientId: string;
  tokenUrl: string;
  key: KeyObject;
  alg: 'RS384' | 'ES384';
  kid?: string;
  nowMs?: number;
}): Promise<string> {
  const iat = Math.floor((args.nowMs ?? Date.now()) / 1000);
  return new SignJWT({})
    .setProtectedHeader({ alg: args.alg, typ: 'JWT', ...(args.kid ? { kid: args.kid } : {}) })
    .setIssuer(args.clientId)
    .setSubject(args.clientId)
    .setAudience(args.tokenUrl)
    .setJti(randomUUID())
    .setIssuedAt(iat)
    .setExpirationTime(iat + ASSERTION_LIFETIME_S)
    .sign(args.key);
}

interface CachedToken {
  accessToken: string;
  renewAt: number;
}

/** What one token request sends: the form fields and any extra headers (client authentication). */
interface TokenRequest {
  form: URLSearchParams;
  headers: Record<string, string>;
}

/**
 * An OAuth 2.0 client_credentials token, cached until shortly before it expires, fetched once for concurrent
 * callers (single flight), and dropped by invalidate() (after a 401 from the FHIR server).
 */
class TokenProvider implements AuthProvider {
  readonly refreshable = true;
  private token?: CachedToken;
  private inFlight?: Promise<CachedToken>;
  /** Bumped by invalidate() so a fetch started before it cannot repopulate the cache. */
  private generation = 0;

  constructor(
    private readonly tokenUrl: string,
    private readonly buildRequest: () => Promise<TokenRequest>,
    private readonly fetchImpl: FetchImpl,
    private readonly options: AuthProviderOptions
  ) {}

  async getHeaders(): Promise<Record<string, string>> {
    const now = this.now();
    if (this.token && now < this.token.renewAt) {
      return { Authorization: `Bearer ${this.token.accessToken}` };
    }
    let pending = this.inFlight;
    if (!pending) {
      const generation = this.generation;
      const started = this.fetchToken().then((token) => {
        if (generation === this.generation) {
          this.token = token;
        }
        return token;
      });
      this.inFlight = started;
      // Free the single-flight slot whether the fetch succeeded or not; callers see the rejection below.
      started.then(
        () => this.clearInFlight(started),
        () => this.clearInFlight(started)
      );
      pending = started;
    }
    const token = await pending;
    return { Authorization: `Bearer ${token.accessToken}` };
  }

  invalidate(): void {
    this.generation++;
    this.token = undefined;
    this.inFlight = undefined;
  }

  private clearInFlight(p: Promise<CachedToken>): void {
    if (this.inFlight === p) {
      this.inFlight = undefined;
    }
  }

  private now(): number {
    return (this.options.now ?? Date.now)();
  }

  private async fetchToken(): Promise<CachedToken> {
    const { form, headers } = await this.buildRequest();
    const timeoutMs = this.options.timeoutMs ?? 30_000;
    const requestedAt = this.now();
    let res: TimedResponse;
    try {
      res = await fetchWithDeadline(
        this.fetchImpl,
        this.tokenUrl,
        {
          method: 'POST',
          headers: {
            ...headers,
            'Content-Type': 'application/x-www-form-urlencoded',
            Accept: 'application/json',
          },
          body: form.toString(),
          redirect: 'manual',
        },
        timeoutMs
      );
    } catch (err) {
      if (err instanceof DeadlineExceeded) {
        throw new TokenRequestError('timeout', `token endpoint did not answer within ${timeoutMs} ms`);
      }
      throw new TokenRequestError('network', `token endpoint unreachable (${errorCode(err)})`, { cause: err });
    }
    const status = res.status;
    const text = new TextDecoder().decode(res.bytes);
    const retryAfter = res.headers.get('retry-after');

    if (status < 200 || status >= 300) {
      // The error body may echo credentials or be HTML: report the OAuth error code only.
      const oauthError = safeOAuthError(text);
      throw new TokenRequestError('http', `token endpoint returned HTTP ${status}${oauthError ? ` (${oauthError})` : ''}`, {
        status,
        retryAfterMs: parseRetryAfterHeader(retryAfter, Date.now()),
      });
    }

    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      throw new TokenRequestError('invalid-response', `token endpoint answered HTTP ${status} without JSON`, {
        status,
      });
    }
    const parsed = body as { access_token?: unknown; token_type?: unknown; expires_in?: unknown };
    if (typeof parsed?.access_token !== 'string' || parsed.access_token === '') {
      throw new TokenRequestError('invalid-response', 'token endpoint response has no access_token', { status });
    }
    if (parsed.token_type !== undefined && String(parsed.token_type).toLowerCase() !== 'bearer') {
      throw new TokenRequestError('invalid-response', `token endpoint issued an unsupported token_type`, { status });
    }
    const expiresIn = Number(parsed.expires_in);
    const lifetimeMs = Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn * 1000 : DEFAULT_TOKEN_LIFETIME_MS;
    const margin = Math.min(EXPIRY_MARGIN_MS, lifetimeMs / 10);
    return { accessToken: parsed.access_token, renewAt: requestedAt + lifetimeMs - margin };
  }
}

function safeOAuthError(text: string): string | undefined {
  try {
    const err = (JSON.parse(text) as { error?: unknown }).error;
    return typeof err === 'string' && /^[\x20-\x7e]{1,64}$/.test(err) ? err : undefined;
  } catch {
    return undefined;
  }
}
