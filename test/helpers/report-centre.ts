import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { SandboxServer } from '../../src/sandbox/server';

/**
 * The centre's server as the gateway sees it: a proxy in front of the sandbox (the destination's base is the
 * proxy's /fhir/R4) that serves files under /fhir/R4/files/<name> itself, as the test scripts them: the centre's
 * attachment host under its FHIR base.
 */
export interface Centre {
  base: string;
  files: Map<string, (req: IncomingMessage, res: ServerResponse) => void>;
  close(): Promise<void>;
}

export async function startCentre(sandbox: SandboxServer): Promise<Centre> {
  const to = new URL(sandbox.url);
  const files = new Map<string, (req: IncomingMessage, res: ServerResponse) => void>();
  const server: Server = createServer((req, res) => {
    const file = /^\/fhir\/R4\/files\/([\w.-]+)$/.exec(req.url ?? '');
    if (file) {
      const handler = files.get(file[1]);
      if (handler) handler(req, res);
      else res.writeHead(404).end();
      return;
    }
    const fwd = httpRequest({ host: to.hostname, port: to.port, path: req.url, method: req.method, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers);
      up.pipe(res);
    });
    fwd.on('error', () => res.destroy());
    req.pipe(fwd);
  });
  server.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    base: `http://127.0.0.1:${port}/fhir/R4`,
    files,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
