// The public surface of src/observability: what other folders use. Import from here, not from its files.
export { requestContext } from './context';
export { logger, setLogLevel } from './logger';
export {
  clearBacklogSource,
  deliveries,
  deliveryLatency,
  metricsRegistry,
  pollCycles,
  retentionActions,
  setBacklogSource,
  submissions,
  type Backlog,
} from './metrics';
