import type { Db } from '../store';
import { WebhookStore } from '../store';
import { WebhookDispatcher, type WebhookDispatcherOptions } from './dispatcher';

export { WebhookDispatcher, WEBHOOK_DEFAULTS, receiverSecret, createSigner, type WebhookDispatcherOptions } from './dispatcher';
export { WebhookStore, type WebhookEntry, type WebhookState } from '../store';

export interface AttachedWebhooks {
  store: WebhookStore;
  /** start() after the server listens; stop() with the other workers; wake() after a status change. */
  dispatcher: WebhookDispatcher;
}

/**
 * Everything status webhooks need, on the service's Db: the outbox store, the dispatcher (signing
 * with WEBHOOK_SECRET when set). The operator endpoints (src/api/webhooks-admin-router.ts) are built on the
 * store by the composition root. `overrides` are for tests (short delays) and
 * tuning; `fetchImpl` replaces the HTTP client (tests).
 */
export function attachWebhooks(
  db: Db,
  config: { webhookSecret?: string; webhookAllowPrivateNetworks?: boolean },
  overrides: Partial<WebhookDispatcherOptions> = {},
  fetchImpl?: typeof fetch
): AttachedWebhooks {
  const store = new WebhookStore(db);
  const dispatcher = new WebhookDispatcher(
    store,
    { secret: config.webhookSecret, allowPrivateNetworks: config.webhookAllowPrivateNetworks, ...overrides },
    fetchImpl
  );
  return { store, dispatcher };
}
export { literalCallbackProblem } from './callback-guard';
