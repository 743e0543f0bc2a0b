// The public surface of src/config: what other folders use. Import from here, not from its files.
export { ConfigError, destinationOptionVariable, loadConfig, type Config } from './config';
export { configTable, withConfigTable } from './config-table';
export {
  destinationSchema,
  destinationSettings,
  serverProfileDefaults,
  type CircuitBreakerSettings,
  type Destination,
  type DestinationAuth,
  type DestinationDirectory,
  type DestinationSettings,
} from './destinations';
export { loadPrivateKey, requireEnv } from './secrets';
