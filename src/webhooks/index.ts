// Status webhooks: the dispatcher that signs and sends the events a status change queued (src/store's webhook
// queue), and the guard on the callback URLs they go to.
export { WebhookDispatcher, WEBHOOK_DEFAULTS, receiverSecret, createSigner, type WebhookDispatcherOptions } from './dispatcher';
export { literalCallbackProblem } from './callback-guard';
