// The public surface of src/fhir: what other folders use. Import from here, not from its files.
export { createAuthProvider } from './auth';
export { FhirRequestError, createFhirClient, type FhirClient } from './client';
export { loadFhirDefinitions, type DefinitionsLoadStats } from './definitions';
export { KeyedMutex, conditionalIndexes, locationOf, oldestFirst, searchCriteria, withoutConditionalEntries, type Matches } from './resolve';
export { classifyError, parseLocation, sendTransaction, type TransactionLocation } from './transaction';
