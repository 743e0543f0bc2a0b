import { logger } from '../observability';
import type { Db } from './db';
import { errorMessage } from './errors';
import { nowIso } from './ids';

export interface StoreProbeResult {
  ok: boolean;
  /** `ok`, or why the store did not take the write (the store error's message; never row contents). */
  detail: string;
}

export interface StoreProbeOptions {
  /** How long one answer is reused (STORE_PROBE_CACHE_MS): readiness probes do not each write. */
  cacheMs: number;
  /** A write not done by then counts as failed (it still finishes in the background). Default 2000 ms. */
  timeoutMs?: number;
  /** The probe row's id (default `readiness`). */
  id?: string;
}

/**
 * A readiness check that proves the store takes writes: it rewrites one row of `store_probe` (a real write,
 * through the same connection or pool the gateway uses, so a read-only, full, locked or unreachable store
 * fails it), at most once per `cacheMs`. Calls while a write is running share it. A failing store fails the
 * probe until a write succeeds again; nothing needs resetting.
 */
export function createStoreProbe(db: Db, opts: StoreProbeOptions): () => Promise<StoreProbeResult> {
  const id = opts.id ?? 'readiness';
  const timeoutMs = opts.timeoutMs ?? 2000;
  let cached: { at: number; value: StoreProbeResult } | undefined;
  let running: Promise<StoreProbeResult> | undefined;
  let lastOk: boolean | undefined;

  const write = async (): Promise<StoreProbeResult> => {
    const at = nowIso();
    try {
      await db.kysely
        .insertInto('store_probe')
        .values({ id, at })
        .onConflict((oc) => oc.column('id').doUpdateSet({ at }))
        .execute();
      return { ok: true, detail: 'ok' };
    } catch (err) {
      return { ok: false, detail: errorMessage(err) };
    }
  };

  const probe = async (): Promise<StoreProbeResult> => {
    running ??= write().finally(() => {
      running = undefined;
    });
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<StoreProbeResult>((resolve) => {
      timer = setTimeout(() => resolve({ ok: false, detail: `the store did not take a write within ${timeoutMs} ms` }), timeoutMs);
    });
    try {
      return await Promise.race([running, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  };

  let pending: Promise<StoreProbeResult> | undefined;
  return async () => {
    if (cached && Date.now() - cached.at < opts.cacheMs) return cached.value;
    pending ??= probe().then((value) => {
      cached = { at: Date.now(), value };
      pending = undefined;
      if (value.ok !== lastOk) {
        if (value.ok) {
          if (lastOk !== undefined) logger.info('store takes writes again; ready');
        } else {
          logger.warn('store write probe failed; not ready', { error: value.detail });
        }
        lastOk = value.ok;
      }
      return value;
    });
    return pending;
  };
}
