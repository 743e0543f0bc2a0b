// Prepares @medplum/core's global schema for the sandbox: the R4 base definitions (loaded by the
// shared loader in ./definitions, also used by src/mapping/validate.ts) plus per-type narrowed
// search parameters. Required by search (parseSearchRequest / matchesSearchRequest), validation
// (validateResource) and the CapabilityStatement. Process-wide and idempotent.
import { getExpressionForResourceType, getResourceTypes, getSearchParameters } from '@medplum/core';
import { loadFhirDefinitions as loadR4Definitions } from '../mapping';

let prepared = false;

/**
 * Loads R4 definitions once per process (a no-op for the definitions when validation already
 * loaded them) and narrows the shared search parameters.
 * @returns milliseconds spent (0 when already prepared).
 */
export function loadFhirDefinitions(): number {
  if (prepared) {
    return 0;
  }
  const started = performance.now();
  loadR4Definitions();
  narrowSharedSearchParameters();
  prepared = true;
  return performance.now() - started;
}

/**
 * R4 shares one SearchParameter between many resource types, with a union expression such as
 * `AllergyIntolerance.identifier | CarePlan.identifier | ... | Task.identifier`. MemoryRepository
 * (via core's matchesSearchRequest) evaluates the whole union against every stored resource, and
 * each non-matching branch is a slow schema miss: `identifier=` over 1,000 Observations took
 * ~400 ms per search. Give every resource type its own copy narrowed to its branch (the same
 * narrowing Medplum's server uses). Results are unchanged, and the shared SearchParameter
 * objects are not mutated.
 */
function narrowSharedSearchParameters(): void {
  for (const type of getResourceTypes()) {
    const params = getSearchParameters(type);
    if (!params) {
      continue;
    }
    for (const [code, param] of Object.entries(params)) {
      if (!param.expression?.includes('|')) {
        continue;
      }
      const narrowed = getExpressionForResourceType(type, param.expression);
      if (narrowed && narrowed !== param.expression) {
        params[code] = { ...param, expression: narrowed };
      }
    }
  }
}
