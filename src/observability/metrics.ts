import { Counter, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

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
