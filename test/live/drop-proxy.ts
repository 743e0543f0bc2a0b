import { createServer, request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { request as httpsRequest } from 'node:https';
import type { AddressInfo } from 'node:net';

export interface DropProxy {
  /** The FHIR base to give the gateway: this proxy, with the target's path. */
  base: string;
  /** How many transaction answers were dropped (at most one). */
  dropped(): number;
  /** Transaction bundles POSTed through the proxy. */
  transactions(): number;
  close(): Promise<void>;
}

/**
 * Like test/helpers/lossy-proxy.ts, for any FHIR base (http or https, any path): forwards everything to
 * `target`, but after the server has answered the first POST of a Bundle of type `transaction` to the
 * base, closes the client's connection instead of passing the answer on. The server applied the
 * transaction; the gateway never hears so. Unlike the helper it tells a transaction from a batch (the
 * gateway's `resolve-first` mode POSTs a batch of searches to the base first) and forwards https.
 */
export async function startDropProxy(target: string): Promise<DropProxy> {
  const to = new URL(target.replace(/\/+$/, ''));
  const basePath = to.pathname.replace(/\/+$/, '');
  const send = to.protocol === 'https:' ? httpsRequest : httpRequest;
  let dropped = 0;
  let transactions = 0;
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const path = (req.url ?? '/').split('?')[0].replace(/\/+$/, '');
      let isTransaction = false;
      if (req.method === 'POST' && path === basePath && body.length > 0) {
        // Only the head of the body is needed to see the Bundle's type; large bodies are not parsed whole.
        const head = body.subarray(0, 4096).toString('utf8');
        isTransaction = /"resourceType"\s*:\s*"Bundle"/.test(head) && /"type"\s*:\s*"transaction"/.test(head);
        if (!isTransaction && /"resourceType"\s*:\s*"Bundle"/.test(head) && !/"type"\s*:/.test(head)) {
          try {
            isTransaction = (JSON.parse(body.toString('utf8')) as { type?: string }).type === 'transaction';
          } catch {
            isTransaction = false;
          }
        }
      }
      if (isTransaction) transactions++;
      const headers: IncomingHttpHeaders = { ...req.headers, host: to.host, 'content-length': String(body.length) };
      delete headers['transfer-encoding'];
      delete headers.connection;
      const fwd = send({ protocol: to.protocol, hostname: to.hostname, port: to.port || undefined, path: req.url, method: req.method, headers }, (up) => {
        const out: Buffer[] = [];
        up.on('data', (c: Buffer) => out.push(c));
        up.on('end', () => {
          if (isTransaction && dropped === 0 && (up.statusCode ?? 500) < 300) {
            dropped++;
            req.socket.destroy(); // applied at the server; the answer is lost
            return;
          }
          const h = { ...up.headers };
          delete h['transfer-encoding'];
          delete h.connection;
          h['content-length'] = String(Buffer.concat(out).length);
          res.writeHead(up.statusCode ?? 502, h);
          res.end(Buffer.concat(out));
        });
      });
      fwd.on('error', () => {
        res.writeHead(502, { 'content-type': 'text/plain' });
        res.end('proxy could not reach the server');
      });
      fwd.end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}${basePath}`,
    dropped: () => dropped,
    transactions: () => transactions,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}
