// The public surface of src/mapping: what other folders use. Import from here, not from its files.
export {
  documentByteLength,
  identifierQuery,
  inlineDocumentsOverLimit,
  mapAddedDocumentsToBundle,
  mapReferralToBundle,
  serviceRequestWithDocuments,
  taskWithDocuments,
} from './bundle';
export { checkCodes } from './codes';
export {
  DOCUMENT_IDENTIFIER_SYSTEM,
  GATEWAY_IDENTIFIER_BASE,
  GATEWAY_TAG,
  GATEWAY_TAG_SEARCH,
  REFERRAL_IDENTIFIER_SYSTEM,
  documentIdentifierValue,
} from './constants';
export { routeReferral, type Route } from './routing';
export { entryFullUrl } from './uuid';
export { validateBundle } from './validate';
export { type DefinitionsLoadStats, loadFhirDefinitions } from './definitions';
export { type DeepReadonly, type MappingTables, loadMappingFile, mappingFilePath, parseMappingFile, loadTables, studyUrl } from './tables';
