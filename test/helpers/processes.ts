import type { ChildProcess } from 'node:child_process';

/**
 * Waits until a spawned service answers GET {url}/healthz, failing early if the process exits.
 * Used by the crash test and bench/delivery, which run the gateway as a child process.
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
