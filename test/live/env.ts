/**
 * The live lane's settings: LIVE_FHIR_* variables name the FHIR R4 server to run the loop against and how
 * to reach it. Each LIVE_FHIR_<NAME> is handed to the in-process gateway as its own FHIR_<NAME> variable
 * (LIVE_FHIR_BASE_URL -> FHIR_BASE_URL, LIVE_FHIR_PROFILE -> FHIR_PROFILE, LIVE_FHIR_AUTH -> FHIR_AUTH,
 * LIVE_FHIR_CLIENT_ID -> FHIR_CLIENT_ID, LIVE_FHIR_MAX_INLINE_BYTES -> FHIR_MAX_INLINE_BYTES, ...), so
 * every single-destination setting of the gateway can be given here.
 */

export const SKIP_LINE = 'test:live skipped: set LIVE_FHIR_BASE_URL (and LIVE_FHIR_AUTH...) to run the loop against a real server';

/** The LIVE_FHIR_* variables most runs need (any other LIVE_FHIR_<NAME> is passed on as FHIR_<NAME> too). */
export const LIVE_VARIABLES = [
  'LIVE_FHIR_BASE_URL',
  'LIVE_FHIR_PROFILE',
  'LIVE_FHIR_AUTH',
  'LIVE_FHIR_TOKEN',
  'LIVE_FHIR_USERNAME',
  'LIVE_FHIR_PASSWORD',
  'LIVE_FHIR_CLIENT_ID',
  'LIVE_FHIR_CLIENT_SECRET',
  'LIVE_FHIR_TOKEN_URL',
  'LIVE_FHIR_SCOPE',
  'LIVE_FHIR_PRIVATE_KEY',
  'LIVE_FHIR_PRIVATE_KEY_FILE',
  'LIVE_FHIR_JWT_ALG',
  'LIVE_FHIR_JWT_KID',
  'LIVE_FHIR_ORGANIZATION_SYSTEM',
  'LIVE_FHIR_ORGANIZATION_VALUE',
] as const;

const SECRET = /TOKEN$|PASSWORD|SECRET|PRIVATE_KEY$/;

export interface LiveSettings {
  baseUrl: string;
  profile: string;
  auth: string;
  /** FHIR_* variables for the gateway (and, for the secrets its FHIR client reads, for process.env). */
  fhirEnv: Record<string, string>;
  /** How long to wait for a delivery or a poll to show a change. */
  waitMs: number;
  /** LIVE_KEEP=1: leave what the tests created at the centre. */
  keep: boolean;
  logLevel: string;
}

export function liveSettings(env: NodeJS.ProcessEnv = process.env): LiveSettings | undefined {
  const baseUrl = env.LIVE_FHIR_BASE_URL?.trim();
  if (!baseUrl) return undefined;
  const fhirEnv: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith('LIVE_FHIR_') || value === undefined || value === '') continue;
    fhirEnv[`FHIR_${name.slice('LIVE_FHIR_'.length)}`] = value;
  }
  fhirEnv.FHIR_BASE_URL = baseUrl.replace(/\/+$/, '');
  return {
    baseUrl: fhirEnv.FHIR_BASE_URL,
    profile: fhirEnv.FHIR_PROFILE ?? 'generic',
    auth: fhirEnv.FHIR_AUTH ?? 'none',
    fhirEnv,
    waitMs: Number(env.LIVE_WAIT_MS ?? '') > 0 ? Number(env.LIVE_WAIT_MS) : 90_000,
    keep: ['1', 'true', 'yes'].includes((env.LIVE_KEEP ?? '').toLowerCase()),
    logLevel: env.LIVE_LOG_LEVEL || 'error',
  };
}

/** One line saying what the lane runs against, secrets masked. */
export function describeSettings(s: LiveSettings): string {
  const shown = Object.entries(s.fhirEnv)
    .filter(([k]) => k !== 'FHIR_BASE_URL')
    .map(([k, v]) => `${k}=${SECRET.test(k) ? '***' : v}`)
    .join(' ');
  return `test:live against ${s.baseUrl} (profile ${s.profile}, auth ${s.auth})${shown ? `: ${shown}` : ''}`;
}

/** A tag unique to this run, so reruns on a persistent server never meet the previous run's resources. */
export const RUN_ID = `live-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 6)}`;
