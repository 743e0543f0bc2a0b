import { readFileSync } from 'node:fs';
import { loadConfig } from '../../src/config/config';
import { Gateway, type GatewayOptions } from '../../src/gateway';

export const KEY_A = 'key-city-hospital-0001';
export const KEY_B = 'key-other-clinic-0002';
export const ADMIN_KEY = 'admin-key-0003';

export function fixture(name = 'breast-second-opinion'): Record<string, any> {
  return JSON.parse(readFileSync(`fixtures/referrals/${name}.json`, 'utf8')) as Record<string, any>;
}

/** Starts the real service on an ephemeral port with its built-in sandbox FHIR server. */
export async function startGateway(env: Record<string, string> = {}, opts: GatewayOptions = {}): Promise<Gateway> {
  const config = loadConfig({
    NODE_ENV: 'test',
    PORT: '0',
    HOST: '127.0.0.1',
    DATABASE_URL: 'sqlite::memory:',
    DESTINATIONS_FILE: 'test/does-not-exist.json',
    API_KEYS: `city-hospital:${KEY_A},other-clinic:${KEY_B}`,
    ADMIN_API_KEY: ADMIN_KEY,
    LOG_LEVEL: 'error',
    DELIVERY_BASE_DELAY_MS: '50',
    DELIVERY_MAX_DELAY_MS: '500',
    // Tests open many connections from one address; the cap has its own test (intake-hardening).
    MAX_CONNECTIONS_PER_ADDRESS: '0',
    ...env,
  });
  // Webhooks go to local receivers only: the fixture's example.org callback is answered here.
  const webhookFetch: typeof fetch = (input, init) =>
    /^https?:\/\/(127\.0\.0\.1|localhost)[:/]/.test(String(input)) ? fetch(input, init) : Promise.resolve(new Response(null, { status: 204 }));
  const gw = new Gateway(config, { startPoller: false, deliveryIdleMs: 100, webhookFetch, ...opts });
  await gw.start();
  return gw;
}

/** Polls `fn` until it returns a truthy value or the time runs out. */
export async function eventually<T>(fn: () => Promise<T | undefined | null | false>, timeoutMs = 10_000, everyMs = 50): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < end) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`condition not met within ${timeoutMs} ms${last ? `: ${(last as Error).message}` : ''}`);
}
