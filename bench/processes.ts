import { type ChildProcess, spawn } from 'node:child_process';

/** A script started by a benchmark in a process of its own, once its stdout matched the ready pattern. */
export interface Started {
  child: ChildProcess;
  /** The ready pattern's match (its first group is usually the port). */
  match: RegExpExecArray;
  /** The first group of the match as a number (a port). */
  port: number;
  /** Everything the script printed up to the match. */
  printed: string;
}

/**
 * Starts `script` with tsx under this Node (the project's Node 24), with `env` over this process's environment, and
 * resolves once its stdout matches `ready`; rejects if it exits first. stdout keeps being drained afterwards.
 * `cpuProfileDir` writes a CPU profile of the process there (BENCH_CPU_PROF).
 */
export function startScript(script: string, env: Record<string, string>, ready: RegExp, cpuProfileDir?: string): Promise<Started> {
  return new Promise((resolve, reject) => {
    const prof = cpuProfileDir ? ['--cpu-prof', `--cpu-prof-dir=${cpuProfileDir}`] : [];
    const child = spawn(process.execPath, [...prof, '--import', 'tsx', script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    let printed = '';
    let found = false;
    child.stdout?.on('data', (d: Buffer) => {
      if (found) return;
      printed += d.toString();
      const match = ready.exec(printed);
      if (match) {
        found = true;
        resolve({ child, match, port: Number(match[1]), printed });
      }
    });
    child.on('exit', (code) => {
      if (!found) reject(new Error(`${script} exited with ${code}`));
    });
  });
}

/** Ends the scripts a benchmark started (SIGTERM) and gives them half a second to close their files. */
export async function stopScripts(...started: Started[]): Promise<void> {
  for (const s of started) s.child.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 500));
}
