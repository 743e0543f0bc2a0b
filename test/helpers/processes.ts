import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:net';

/**
 * Child processes for the crash test and bench/delivery, which run the gateway and the standalone
 * sandbox FHIR server as separate processes, as in production.
 */

/** Runs a TypeScript entry point on this Node (Node 24 under jest and npm scripts). */
export function spawnTs(script: string, env: Record<string, string>, nodeArgs: string[] = []): ChildProcess {
  return spawn(process.execPath, [...nodeArgs, '--import', 'tsx', script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A port free on loopback right now. */
export async function freePort(): Promise<number> {
  const srv = createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/** Starts src/cli/sandbox.ts on an ephemeral port; resolves with the child and its FHIR base URL once it listens. */
export async function startSandboxProcess(env: Record<string, string> = {}): Promise<{ child: ChildProcess; url: string }> {
  const child = spawnTs('src/cli/sandbox.ts', { PORT: '0', HOST: '127.0.0.1', ...env });
  child.stderr?.resume();
  const url = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout?.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /"event":"sandbox-listening","url":"([^"]+)"/.exec(buf);
      if (m) resolve(m[1]);
    });
    child.once('exit', (code) => reject(new Error(`sandbox exited with ${code}`)));
  });
  return { child, url };
}

/**
 * Waits until a spawned service answers GET {url}/healthz, failing early if the process exits.
 */
export async function waitForHealth(child: ChildProcess, url: string, timeoutMs: number, stderr: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`gateway exited with ${child.exitCode}: ${stderr()}`);
    try {
      if ((await fetch(`${url}/healthz`)).ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error('gateway did not start');
    await new Promise((r) => setTimeout(r, 20));
  }
}
