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
const fs = require('node:fs');
const os = require('node:os');
const db = new DatabaseSync(workerData.path);
db.exec('PRAGMA busy_timeout = 0');
const checkpoint = db.prepare('PRAGMA wal_checkpoint(PASSIVE)');
// Frames written but not yet copied, read from the WAL-index header in the -shm file (sqlite.org/walformat.html:
// mxFrame at byte 16, nBackfill at byte 96, native byte order), as SQLite's own auto-checkpoint counts them.
const header = Buffer.alloc(136);
const le = os.endianness() === 'LE';
let shm;
const pendingFrames = () => {
  try {
    shm ??= fs.openSync(workerData.path + '-shm', 'r');
    if (fs.readSync(shm, header, 0, 136, 0) < 136 || header.readUInt32LE(0) !== 3007000) return undefined;
    const mxFrame = le ? header.readUInt32LE(16) : header.readUInt32BE(16);
    const nBackfill = le ? header.readUInt32LE(96) : header.readUInt32BE(96);
    return nBackfill <= mxFrame ? mxFrame - nBackfill : mxFrame;
  } catch {
    return undefined;
  }
};
let stopped = false;
let lastRun = 0;
const tick = () => {
  if (stopped) return;
  const pending = pendingFrames();
  // Unknown (no header to read): checkpoint once a second instead.
  const due = pending === undefined ? Date.now() - lastRun >= 1000 : pending >= workerData.frames;
  if (due) {
    lastRun = Date.now();
    try {
      const r = checkpoint.get();
      parentPort.postMessage({ type: 'checkpoint', checkpointed: Number(r.checkpointed), counted: pending !== undefined });
    } catch (err) {
      parentPort.postMessage({ type: 'error', message: String(err && err.message || err) });
    }
  }
  timer = setTimeout(tick, workerData.everyMs);
};
let timer = setTimeout(tick, workerData.everyMs);
parentPort.on('message', (m) => {
  if (m !== 'stop') return;
  stopped = true;
  clearTimeout(timer);
  try { if (shm !== undefined) fs.closeSync(shm); } catch {}
  try { db.close(); } catch {}
  parentPort.close();
});
`;

export interface CheckpointStats {
  /** Pages copied into the database file. */
  pages: number;
  /** Whether the last checkpoint was started by counting frames in the WAL-index header (else by the 1 s fallback). */
  counted?: boolean;
  lastError?: string;
}

export interface Checkpointer {
  stats(): CheckpointStats;
  /** Stops the worker; the main connection's close then checkpoints what is left. */
  stop(): Promise<void>;
}

/**
 * Starts checkpointing `path` from a worker thread: every `everyMs` (default 50) it checks the log and
 * checkpoints once `frames` pages (default 1000, SQLite's own threshold) wait to be copied. Copying in
 * batches matters: the pages a gateway rewrites most (outbox, referral rows) are copied once per batch.
 * `onError` hears a worker that failed.
 */
export function startCheckpointer(path: string, opts: { everyMs?: number; frames?: number; onError?: (message: string) => void } = {}): Checkpointer {
  const stats: CheckpointStats = { pages: 0 };
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { path, everyMs: opts.everyMs ?? 50, frames: opts.frames ?? 1000 } });
  let backfilled = 0;
  worker.on('message', (m: { type: 'checkpoint'; checkpointed: number; counted: boolean } | { type: 'error'; message: string }) => {
    if (m.type === 'error') {
      stats.lastError = m.message;
      opts.onError?.(m.message);
      return;
    }
    stats.counted = m.counted;
    // `checkpointed` counts frames of the current log already copied; a restarted log starts again at 0.
    const copied = m.checkpointed >= backfilled ? m.checkpointed - backfilled : m.checkpointed;
    backfilled = m.checkpointed;
    stats.pages += copied;
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
