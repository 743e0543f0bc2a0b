// MemoryRepository with a search index (./sandbox-index).
//
// MemoryRepository searches by scanning every resource of the type with FHIRPath. The sandbox's
// hot searches are the poller's delta search (`_tag`, `_lastUpdated=gt..`, `_sort=_lastUpdated`,
// `_count`, paged with _offset), `_id=a,b,c` batches and the `identifier=system|value` criteria of
// the ifNoneExist on every referral transaction entry. The index answers those (and any search
// without chains, _include/_revinclude or a sort other than _lastUpdated) with the scan's exact
// results and order, evaluating only the candidates it narrows to; the rest go to the scan.
import type { SearchRequest, WithId } from '@medplum/core';
import { MemoryRepository } from '@medplum/fhir-router';
import type { Bundle, Resource } from '@medplum/fhirtypes';
import { SearchIndex } from './sandbox-index';

export interface IndexedMemoryRepositoryOptions {
  /** Answer searches from the index where it can (default true); false: every search scans. */
  index?: boolean;
}

export class IndexedMemoryRepository extends MemoryRepository {
  private readonly searchIndex: SearchIndex | undefined;
  /** How searches were answered: from the index, or by MemoryRepository's scan. */
  readonly searchCounts = { indexed: 0, scanned: 0 };

  constructor(options: IndexedMemoryRepositoryOptions = {}) {
    super();
    this.searchIndex = options.index === false ? undefined : SearchIndex.attach(this);
  }

  /** Whether the index is attached (it is unless disabled or MemoryRepository's internals changed). */
  get indexed(): boolean {
    return this.searchIndex !== undefined;
  }

  override async search<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    const bundle = this.searchIndex?.search(searchRequest);
    if (bundle) {
      this.searchCounts.indexed++;
      return bundle;
    }
    this.searchCounts.scanned++;
    return super.search(searchRequest);
  }

  /** MemoryRepository's own scan, bypassing the index (tests compare the two). */
  scanSearch<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    return super.search(searchRequest);
  }
}
