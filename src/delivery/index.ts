// The public surface of src/delivery: what other folders use. Import from here, not from its files.
export { FhirClients } from './clients';
export { DeliveryWorker } from './worker';
