// The FHIR client: a transport (transport.ts: auth and the 401 retry, the per-attempt deadline, the base-URL
// fence, error mapping to FhirRequestError) and the resource operations over it (client.ts), with the transaction
// answer checks (transaction.ts) and the conditional-create resolution (resolve.ts) the delivery builds on.
export { createAuthProvider } from './auth';
export { createFhirClient, type FhirClient, type SearchParams, type StreamedBytes } from './client';
export { FhirRequestError, type FhirErrorKind } from './errors';
export { KeyedMutex, conditionalIndexes, locationOf, oldestFirst, searchCriteria, withoutConditionalEntries, type Matches } from './resolve';
export { type OpenUrlOptions, type OpenUrlResult } from './stream';
export { classifyError, parseLocation, sendTransaction, type TransactionLocation } from './transaction';
export { createFhirTransport, jsonRequestBody, type FhirClientOptions, type FhirTransport } from './transport';
