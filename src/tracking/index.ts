// The public surface of src/tracking: what other folders use. Import from here, not from its files.
export { Poller } from './poller';
export { cancellable, terminalStatuses } from './state';
