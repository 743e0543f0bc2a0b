import { createServer, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Bundle } from '@medplum/fhirtypes';

export interface LossyProxy {
  /** The FHIR base URL to give the gateway (`http://127.0.0.1:<port>/fhir/R4`). */
  base: string;
  /** Transaction bundles as the gateway sent them, in order. */
  transactions: Bundle[];
  /** How many answers were dropped (at most one). */
  dropped(): number;
  close(): Promise<void>;
}

/**
 * An HTTP proxy in front of a FHIR server (`target`, e.g. a sandbox's URL) that forwards everything,
 * but loses the answer to the first transaction POST: the server has applied it, the client never
 * hears so. This is the fault a gateway must resend after without creating anything twice. With
 * `lose: 'raw-binary'` it is the answer to the first raw Binary upload (POST Binary / PUT Binary/<id> whose body
 * is not FHIR JSON) that is lost instead.
 */
export async function startLossyProxy(target: string, opts: { lose?: 'transaction' | 'raw-binary' } = {}): Promise<LossyProxy> {
  const to = new URL(target);
  const transactions: Bundle[] = [];
  let dropped = 0;
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      // Only transactions count (and lose their answer): a batch of searches or reads passes through.
      const posted = req.method === 'POST' && /^\/fhir\/R4\/?$/.test(req.url ?? '') ? parseBundle(body) : undefined;
      const isTransaction = posted?.type === 'transaction';
      if (posted && isTransaction) transactions.push(posted);
      const path = req.url?.replace(/^\/fhir\/R4/, to.pathname) ?? '/';
      const headers = { ...req.headers, host: to.host, 'content-length': String(body.length) };
      delete headers['transfer-encoding'];
      const fwd = httpRequest({ host: to.hostname, port: to.port, path, method: req.method, headers }, (up) => {
        const out: Buffer[] = [];
        up.on('data', (c: Buffer) => out.push(c));
        up.on('end', () => {
          const rawBinary =
            (req.method === 'POST' || req.method === 'PUT') &&
            /^\/fhir\/R4\/Binary(\/[^/?]+)?\/?$/.test(req.url ?? '') &&
            !/json/.test(String(req.headers['content-type'] ?? ''));
          const lost = (opts.lose ?? 'transaction') === 'transaction' ? isTransaction : rawBinary;
          if (lost && dropped === 0) {
            dropped++;
            req.socket.destroy(); // applied at the server; the answer is lost
            return;
          }
          res.writeHead(up.statusCode ?? 502, up.headers);
          res.end(Buffer.concat(out));
        });
      });
      fwd.end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}/fhir/R4`,
    transactions,
    dropped: () => dropped,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

function parseBundle(body: Buffer): Bundle | undefined {
  try {
    return JSON.parse(body.toString('utf8')) as Bundle;
  } catch {
    return undefined;
  }
}
