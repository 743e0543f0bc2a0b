// A status-webhook receiver for trying the service out: `npm run webhooks:listen`
// Listens on http://HOST:PORT/hooks (default 127.0.0.1:9000; PORT=0 picks a free port) and prints one
// line per event: whether its Standard Webhooks signature verified against WEBHOOK_SECRET (the same
// variable the service signs with), its webhook-id, and the event. A bad signature is answered 401
// (the service retries it); a good or unsigned one 204.
// stdout: first line {"event":"receiver-listening","url":...}; then one JSON line per request.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Webhook } from 'standardwebhooks';
import { receiverSecret } from '../webhooks';

const port = Number(process.env.PORT ?? 9000);
const host = process.env.HOST || '127.0.0.1';
const secret = process.env.WEBHOOK_SECRET;
const verifier = secret ? new Webhook(receiverSecret(secret)) : undefined;

const server = createServer((req, res) => {
  const chunks: Buffer[] = [];
  req.on('data', (c: Buffer) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString('utf8');
    const headers = Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k, String(v)]));
    let signature: 'verified' | 'invalid' | 'unsigned' | 'not checked (no WEBHOOK_SECRET)' = 'unsigned';
    if (headers['webhook-signature']) {
      if (!verifier) {
        signature = 'not checked (no WEBHOOK_SECRET)';
      } else {
        try {
          verifier.verify(body, headers);
          signature = 'verified';
        } catch {
          signature = 'invalid';
        }
      }
    }
    let event: unknown = body;
    try {
      event = JSON.parse(body);
    } catch {
      // printed as text
    }
    process.stdout.write(JSON.stringify({ path: req.url, webhookId: headers['webhook-id'] ?? null, signature, event }) + '\n');
    res.writeHead(signature === 'invalid' ? 401 : 204).end();
  });
});

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`Invalid PORT: ${process.env.PORT}\n`);
  process.exit(1);
}
server.listen(port, host, () => {
  const url = `http://${host}:${(server.address() as AddressInfo).port}/hooks`;
  process.stdout.write(JSON.stringify({ event: 'receiver-listening', url, verifying: Boolean(verifier) }) + '\n');
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
