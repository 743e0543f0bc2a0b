// Baseline for bench/documents: a bare Node route that streams a request body to a file and fsyncs it, then answers 202.
import { createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';

const dir = mkdtempSync(join(tmpdir(), 'rg-bare-upload-'));
let n = 0;
const server = createServer((req, res) => {
  const file = join(dir, `upload-${n++}`);
  pipeline(req, createWriteStream(file))
    .then(async () => {
      const handle = await open(file, 'r');
      await handle.sync();
      await handle.close();
      rmSync(file);
      res.writeHead(202).end();
    })
    .catch(() => res.writeHead(500).end());
});
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(`${JSON.stringify({ event: 'listening', port: typeof addr === 'object' && addr ? addr.port : 0 })}\n`);
});
process.on('SIGTERM', () => {
  rmSync(dir, { recursive: true, force: true });
  server.close(() => process.exit(0));
});
