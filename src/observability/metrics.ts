import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export const metricsRegistry = new Registry();
collectDefaultMetrics({ register: metricsRegistry });

export const submissions = new Counter({
  name: 'referral_submissions_total',
  help: 'Referral submissions by outcome',
  labelNames: ['outcome'] as const,
  registers: [metricsRegistry],
});

export const deliveries = new Counter({
  name: 'referral_deliveries_total',
  help: 'Delivery attempts by destination and result',
  labelNames: ['destination', 'result'] as const,
  registers: [metricsRegistry],
});

export const pollCycles = new Histogram({
  name: 'referral_poll_cycle_seconds',
  help: 'Duration of one poll cycle per destination',
  labelNames: ['destination'] as const,
  registers: [metricsRegistry],
});

export const deliveryLatency = new Histogram({
  name: 'referral_delivery_latency_seconds',
  help: 'Time from a referral being accepted to the centre confirming its transaction, by destination',
  labelNames: ['destination'] as const,
  buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600],
  registers: [metricsRegistry],
});

export const retentionActions = new Counter({
  name: 'referral_retention_total',
  help: 'Closed referrals whose document bytes were removed, or that were deleted, by the retention job',
  labelNames: ['action'] as const,
  registers: [metricsRegistry],
});

/** What the backlog gauges read at each scrape (the running service registers it; see setBacklogSource). */
export interface Backlog {
  /** Delivery outbox entries that are pending or failed, by kind. */
  outbox: Array<{ kind: string; state: string; count: number }>;
  /** Seconds since the oldest pending delivery entry was queued (0 when none). */
  oldestPendingSeconds: number;
  /** Status webhook entries that are pending or failed. */
  webhooks: Array<{ state: string; count: number }>;
  /** Referrals by status. */
  referrals: Array<{ status: string; count: number }>;
  /** Circuit breaker state per destination: 0 closed, 1 half-open, 2 open. */
  circuits: Array<{ destination: string; state: number }>;
}

let backlogSource: (() => Promise<Backlog>) | undefined;
let lastBacklog: Promise<Backlog | undefined> | undefined;

/** The running service's backlog reader, read by the gauges at each scrape. */
export function setBacklogSource(source: () => Promise<Backlog>): void {
  backlogSource = source;
}

/** Stops the gauges reading `source` (a service stopping), unless another one has registered since. */
export function clearBacklogSource(source: () => Promise<Backlog>): void {
  if (backlogSource === source) backlogSource = undefined;
}

/** One read per scrape, shared by every gauge (each gauge's collect() runs at scrape time). */
function readBacklog(): Promise<Backlog | undefined> {
  lastBacklog ??= (async () => {
    try {
      return backlogSource ? await backlogSource() : undefined;
    } catch {
      return undefined; // the store is down: /readyz says so; the gauges keep their last values
    } finally {
      setTimeout(() => (lastBacklog = undefined), 0);
    }
  })();
  return lastBacklog;
}

function backlogGauge<L extends string>(name: string, help: string, labelNames: readonly L[], fill: (g: Gauge<L>, b: Backlog) => void): Gauge<L> {
  return new Gauge<L>({
    name,
    help,
    labelNames,
    registers: [metricsRegistry],
    async collect() {
      const b = await readBacklog();
      if (!b) return;
      this.reset();
      fill(this, b);
    },
  });
}

backlogGauge('referral_outbox_entries', 'Delivery outbox entries pending or failed (dead letters), by kind', ['kind', 'state'] as const, (g, b) => {
  for (const o of b.outbox) g.set({ kind: o.kind, state: o.state }, o.count);
});
backlogGauge('referral_outbox_oldest_pending_seconds', 'Age of the oldest delivery still pending', [] as const, (g, b) => g.set(b.oldestPendingSeconds));
backlogGauge('referral_webhook_entries', 'Status webhooks pending or failed (dead letters)', ['state'] as const, (g, b) => {
  for (const w of b.webhooks) g.set({ state: w.state }, w.count);
});
backlogGauge('referral_referrals', 'Referrals by status', ['status'] as const, (g, b) => {
  for (const r of b.referrals) g.set({ status: r.status }, r.count);
});
backlogGauge('referral_destination_circuit_state', 'Circuit breaker per destination: 0 closed, 1 half-open, 2 open', ['destination'] as const, (g, b) => {
  for (const c of b.circuits) g.set({ destination: c.destination }, c.state);
});
