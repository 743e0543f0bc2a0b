// MemoryRepository with an identifier index for conditional interactions.
//
// MemoryRepository searches by scanning every resource of the type. Referral transactions put
// an ifNoneExist=identifier=system|value on every entry, so without an index each transaction
// costs O(store size). The index maps lower-cased identifier values to ids. It is a superset:
// it is only ever added to (on every create/update/conditional create, the paths through which
// MemoryRepository stores resources), and candidates are re-checked against the live resource
// with core's matchesSearchRequest, the same predicate MemoryRepository.search applies. Deletes,
// expunges, clear() and transaction rollbacks therefore need no index maintenance.
import { getSearchParameter, matchesSearchRequest, Operator } from '@medplum/core';
import type { SearchRequest, WithId } from '@medplum/core';
import { MemoryRepository } from '@medplum/fhir-router';
import type { CreateResourceOptions } from '@medplum/fhir-router';
import type { OperationOutcome, Resource } from '@medplum/fhirtypes';

export class IndexedMemoryRepository extends MemoryRepository {
  private readonly identifierIndex = new Map<string, Map<string, Set<string>>>();

  override async createResource<T extends Resource>(
    resource: T,
    options?: CreateResourceOptions,
    update?: boolean
  ): Promise<WithId<T>> {
    const result = await super.createResource(resource, options, update);
    this.index(result);
    return result;
  }

  override async conditionalCreate<T extends Resource>(
    resource: T,
    search: SearchRequest<T>,
    options?: CreateResourceOptions
  ): Promise<{ resource: WithId<T>; outcome: OperationOutcome }> {
    const result = await super.conditionalCreate(resource, search, options);
    this.index(result.resource);
    return result;
  }

  private index(resource: WithId<Resource>): void {
    const identifiers = (resource as { identifier?: unknown }).identifier;
    const list = Array.isArray(identifiers) ? identifiers : identifiers ? [identifiers] : [];
    for (const identifier of list as { value?: unknown }[]) {
      if (typeof identifier?.value !== 'string') {
        continue;
      }
      let byValue = this.identifierIndex.get(resource.resourceType);
      if (!byValue) {
        byValue = new Map();
        this.identifierIndex.set(resource.resourceType, byValue);
      }
      const key = identifier.value.toLowerCase();
      let ids = byValue.get(key);
      if (!ids) {
        ids = new Set();
        byValue.set(key, ids);
      }
      ids.add(resource.id);
    }
  }

  /**
   * Up to `limit` resources matching `request`, using the identifier index when the request has
   * an `identifier` filter with a single exact value. Returns undefined when the index cannot
   * answer (caller falls back to a scan).
   */
  async findIndexed(request: SearchRequest, limit: number): Promise<WithId<Resource>[] | undefined> {
    const type = request.resourceType;
    if (getSearchParameter(type, 'identifier')?.expression !== `${type}.identifier`) {
      return undefined;
    }
    if (request.filters?.some((f) => f.code.includes('.') || f.code.startsWith('_has:'))) {
      return undefined; // chained filters are resolved by MemoryRepository.search only
    }
    const filter = request.filters?.find(
      (f) => f.code === 'identifier' && f.operator === Operator.EQUALS && f.value !== '' && !f.value.includes(',')
    );
    if (!filter) {
      return undefined;
    }
    const bar = filter.value.indexOf('|');
    const value = bar < 0 ? filter.value : filter.value.slice(bar + 1);
    if (value === '') {
      return undefined; // `system|` means any value in the system
    }
    const candidates = this.identifierIndex.get(type)?.get(value.toLowerCase());
    const matches: WithId<Resource>[] = [];
    for (const id of candidates ?? []) {
      const current = await this.readResource<WithId<Resource>>(type, id).catch(() => undefined);
      if (current && matchesSearchRequest(current, request)) {
        matches.push(current);
        if (matches.length >= limit) {
          break;
        }
      }
    }
    return matches;
  }
}
