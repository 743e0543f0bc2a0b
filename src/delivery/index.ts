// The public surface of src/delivery: what other folders use. Import from here, not from its files.
export { DeliveryWorker } from './worker';
