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
import { SearchIndex } from './search-index';

export interface IndexedMemoryRepositoryOptions {
  /**
   * What the index answers (default true: every search it can). 'conditional': only the matching
   * of conditional interactions (ifNoneExist, conditional update/patch/delete), other searches
   * scan, as the sandbox did before it had a search index (for comparisons). false: nothing.
   */
  index?: boolean | 'conditional';
}

export class IndexedMemoryRepository extends MemoryRepository {
  private readonly searchIndex: SearchIndex | undefined;
  private readonly mode: 'all' | 'conditional';
  /** How searches were answered: from the index, or by MemoryRepository's scan. */
  readonly searchCounts = { indexed: 0, scanned: 0 };

  constructor(options: IndexedMemoryRepositoryOptions = {}) {
    super();
    this.searchIndex = options.index === false ? undefined : SearchIndex.attach(this);
    this.mode = options.index === 'conditional' ? 'conditional' : 'all';
  }

  /** Whether the index is attached (it is unless disabled or MemoryRepository's internals changed). */
  get indexed(): boolean {
    return this.searchIndex !== undefined;
  }

  override async search<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    return this.mode === 'all' ? this.answer(searchRequest) : this.scan(searchRequest);
  }

  /** Matches for a conditional interaction (the engine asks with count 2). */
  searchMatches<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    return this.answer(searchRequest);
  }

  /** MemoryRepository's own scan, bypassing the index (tests compare the two). */
  scanSearch<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    return super.search(searchRequest);
  }

  private async answer<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    const bundle = this.searchIndex?.search(searchRequest);
    if (bundle) {
      this.searchCounts.indexed++;
      return bundle;
    }
    return this.scan(searchRequest);
  }

  private scan<T extends Resource>(searchRequest: SearchRequest<T>): Promise<Bundle<WithId<T>>> {
    this.searchCounts.scanned++;
    return super.search(searchRequest);
  }
}
