import { Worker } from 'node:worker_threads';

/**
 * Checkpoints a SQLite database's write-ahead log from a worker thread, so the copying of committed
 * pages into the database file (and its fsync) does not run on the event loop. node:sqlite is
 * synchronous: with SQLite's own auto-checkpoint, every ~1000th page written made one request wait for
 * the whole copy (measured: 10 ms stalls per few large referrals; ~10% of delivery CPU).
 *
 * The main connection keeps a higher auto-checkpoint threshold as a safety net (see openDb): under
 * writes that never pause, a PASSIVE checkpoint from another connection may not catch up with the end
 * of the log, and the writer then restarts the log itself.
 *
 * The worker is plain JavaScript evaluated in place, so it runs the same under tsx, ts-jest and a build.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { DatabaseSync } = require('node:sqlite');
const db = new DatabaseSync(workerData.path);
db.exec('PRAGMA busy_timeout = 0');
const checkpoint = db.prepare('PRAGMA wal_checkpoint(PASSIVE)');
let stopped = false;
const tick = () => {
  if (stopped) return;
  try {
    const r = checkpoint.get();
    parentPort.postMessage({ type: 'checkpoint', busy: Number(r.busy), log: Number(r.log), checkpointed: Number(r.checkpointed) });
  } catch (err) {
    parentPort.postMessage({ type: 'error', message: String(err && err.message || err) });
  }
  timer = setTimeout(tick, workerData.everyMs);
};
let timer = setTimeout(tick, workerData.everyMs);
parentPort.on('message', (m) => {
  if (m !== 'stop') return;
  stopped = true;
  clearTimeout(timer);
  try { db.close(); } catch {}
  parentPort.close();
});
`;

export interface CheckpointStats {
  /** Checkpoints that copied at least one page. */
  runs: number;
  /** Pages copied into the database file. */
  pages: number;
  /** Frames in the log at the last check. */
  lastLogFrames: number;
  lastError?: string;
}

export interface Checkpointer {
  stats(): CheckpointStats;
  /** Stops the worker; the main connection's close then checkpoints what is left. */
  stop(): Promise<void>;
}

/** Starts checkpointing `path` every `everyMs` from a worker thread. `onError` hears a worker that failed. */
export function startCheckpointer(path: string, opts: { everyMs?: number; onError?: (message: string) => void } = {}): Checkpointer {
  const stats: CheckpointStats = { runs: 0, pages: 0, lastLogFrames: 0 };
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { path, everyMs: opts.everyMs ?? 100 } });
  let backfilled = 0;
  worker.on('message', (m: { type: 'checkpoint'; busy: number; log: number; checkpointed: number } | { type: 'error'; message: string }) => {
    if (m.type === 'error') {
      stats.lastError = m.message;
      opts.onError?.(m.message);
      return;
    }
    stats.lastLogFrames = m.log;
    // `checkpointed` counts frames of the current log already copied; a restarted log starts again at 0.
    const copied = m.checkpointed >= backfilled ? m.checkpointed - backfilled : m.checkpointed;
    backfilled = m.checkpointed;
    if (copied > 0) {
      stats.runs++;
      stats.pages += copied;
    }
  });
  worker.on('error', (err) => {
    stats.lastError = err.message;
    opts.onError?.(err.message);
  });
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
  // Never what keeps the process alive (after the listeners: adding a 'message' listener refs the port again).
  worker.unref();
  return {
    stats: () => ({ ...stats }),
    stop: async () => {
      worker.postMessage('stop');
      const timeout = setTimeout(() => void worker.terminate(), 2000);
      await exited;
      clearTimeout(timeout);
    },
  };
}
