import { setImmediate as nextTurn } from 'node:timers/promises';
import { Gauge } from 'prom-client';
import { metricsRegistry } from '../observability';

const waitingGauge = new Gauge({
  name: 'referral_intake_lane_waiting',
  help: 'Submissions whose body has arrived, waiting for a place in the intake lane (hash, check, store)',
  registers: [metricsRegistry],
});

/** What a piece of work in the lane calls between its heavy steps: the event loop takes a turn, the work keeps its place. */
export type Pause = () => Promise<void>;

/**
 * A narrow lane for the synchronous, CPU-heavy part of intake: the request hash, the schema/mapping/FHIR check
 * and the store write (node:sqlite is synchronous, a durable commit waits for the disk on the event loop).
 *
 * Without it, every submission whose body arrived in the same turn of the event loop runs all its steps in
 * that turn: 32 submitters × ~3 ms each keep a liveness probe waiting for a whole round (0.2–0.4 s measured).
 * In the lane at most `width` submissions do that work at a time; each yields to the event loop between its
 * steps (`pause`), and a place that comes free is handed to the next submission in arrival order on a later
 * turn, so I/O (a probe, another request's bytes) is served between any two steps. A submission that has a
 * place keeps it to the end, so the ones under way finish first instead of all of them finishing late.
 *
 * The lane holds no bytes of its own: what waits here was already admitted by the intake budget, which bounds
 * the memory of bodies received.
 */
export class IntakeLane {
  #active = 0;
  readonly #waiting: Array<() => void> = [];

  constructor(readonly width = 2) {
    if (!Number.isInteger(width) || width < 1) throw new RangeError(`the intake lane's width must be a whole number >= 1, got ${width}`);
  }

  /** Runs `work` once it has a place in the lane; `pause` lets the event loop take a turn between its steps. */
  async run<T>(work: (pause: Pause) => Promise<T>): Promise<T> {
    await this.#enter();
    try {
      return await work(pauseOnce);
    } finally {
      this.#leave();
    }
  }

  /** Submissions under way and waiting, for tests and metrics. */
  get load(): { active: number; waiting: number } {
    return { active: this.#active, waiting: this.#waiting.length };
  }

  #enter(): Promise<void> {
    if (this.#active < this.width) {
      this.#active++;
      return Promise.resolve();
    }
    waitingGauge.inc();
    return new Promise((resolve) => this.#waiting.push(resolve));
  }

  #leave(): void {
    const next = this.#waiting.shift();
    if (!next) {
      this.#active--;
      return;
    }
    // The place passes straight to the next in line (the count stays), on a later turn of the loop.
    waitingGauge.dec();
    setImmediate(next);
  }
}

const pauseOnce: Pause = async () => {
  await nextTurn();
};
