import { randomUUID, createPrivateKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { SignJWT } from 'jose';
import type { DestinationAuth, SmartBackendAuth } from '../config/destinations';

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

function requireEnv(env: NodeJS.ProcessEnv, name: string): string {
  const value = env[name];
  if (value === undefined || value === '') {
    throw new Error(`Destination auth: environment variable ${name} is not set`);
  }
  return value;
}

/** RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding. */
function formEncode(value: string): string {
  return encodeURIComponent(value).replace(/%20/g, '+');
}

/**
 * The private key of a smart-backend destination, from its PEM file or the environment variable holding the
 * PEM (PKCS#8, PKCS#1 RSA or SEC1 EC). Checked against `alg` at once: RS384 needs an RSA key of 2048 bits or
 * more, ES384 a P-384 key. Errors name the file or variable, never key material.
 */
export function loadPrivateKey(auth: SmartBackendAuth, env: NodeJS.ProcessEnv = process.env): KeyObject {
  let pem: string;
  let source: string;
  if (auth.privateKeyFile !== undefined) {
    source = `file ${auth.privateKeyFile}`;
    try {
      pem = readFileSync(auth.privateKeyFile, 'utf8');
    } catch (err) {
      throw new Error(`Destination auth: cannot read the private key ${source} (${errorCode(err)})`, { cause: err });
    }
  } else if (auth.privateKeyEnv !== undefined) {
    source = `environment variable ${auth.privateKeyEnv}`;
    // A PEM in a single-line variable often has literal "\n" sequences.
    pem = requireEnv(env, auth.privateKeyEnv).replace(/\\n/g, '\n');
  } else {
    throw new Error('Destination auth: smart-backend needs privateKeyFile or privateKeyEnv');
  }
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: pem, format: 'pem' });
  } catch {
    throw new Error(`Destination auth: the ${source} does not hold a PEM private key`);
  }
  if (auth.alg === 'RS384') {
    const bits = key.asymmetricKeyDetails?.modulusLength ?? 0;
    if (key.asymmetricKeyType !== 'rsa' || bits < 2048) {
      throw new Error(`Destination auth: alg RS384 needs an RSA private key of at least 2048 bits in the ${source}`);
    }
  } else if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'secp384r1') {
    throw new Error(`Destination auth: alg ES384 needs an EC P-384 private key in the ${source}`);
  }
  return key;
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

/** A completed HTTP exchange: status, headers and the whole body. */
export interface TimedResponse {
  status: number;
  statusText: string;
  headers: Headers;
  bytes: Uint8Array;
}

/** Thrown by fetchWithDeadline when the deadline passes first. */
export class DeadlineExceeded extends Error {
  constructor(readonly timeoutMs: number) {
    super(`no complete response within ${timeoutMs} ms`);
    this.name = 'DeadlineExceeded';
  }
}

/**
 * One fetch, body included, within `timeoutMs`. The deadline aborts the request and wins the race even if
 * the fetch implementation is slow to honour the abort (a stalled body, a mock that ignores signals).
 * An abort of `init.signal` by the caller rejects as the fetch implementation reports it.
 */
export async function fetchWithDeadline(fetchImpl: FetchImpl, url: string, init: RequestInit, timeoutMs: number): Promise<TimedResponse> {
  const controller = new AbortController();
  const signal = init.signal ? AbortSignal.any([init.signal, controller.signal]) : controller.signal;
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new DeadlineExceeded(timeoutMs)); // settle first, so the race reports the deadline
      controller.abort();
    }, timeoutMs);
  });
  const work = (async (): Promise<TimedResponse> => {
    const res = await fetchImpl(url, { ...init, signal });
    const bytes = new Uint8Array(await res.arrayBuffer());
    return { status: res.status, statusText: res.statusText, headers: res.headers, bytes };
  })();
  work.catch(() => undefined); // a late failure after the deadline is not an unhandled rejection
  try {
    return await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** The low-level error code behind a failed fetch (e.g. ECONNRESET), without any message text. */
export function errorCode(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown } })?.cause;
  const code = (cause?.code ?? (err as { code?: unknown })?.code) as unknown;
  if (typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code)) {
    return code;
  }
  return (err as Error)?.name ?? 'unknown error';
}

/**
 * Parses an HTTP Retry-After value (delta-seconds or HTTP-date) into milliseconds from `now`.
 * Returns undefined when absent or unparseable; a date in the past gives 0.
 */
export function parseRetryAfterHeader(value: string | null | undefined, now: number): number | undefined {
  if (value === null || value === undefined) {
    return undefined;
  }
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) {
    return Number(trimmed) * 1000;
  }
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) {
    return undefined;
  }
  return Math.max(0, date - now);
}
