// Fault injection for tests of the FHIR sandbox. Over HTTP (standalone server only):
//   POST /_sandbox/faults  {"failNextEntry": {"resourceType": "ServiceRequest", "status": 409, "count": 1}}  → 204
//   GET  /_sandbox/faults  → the pending faults as JSON; DELETE /_sandbox/faults → clears them (204).

export interface FailNextEntryOptions {
  /** A resource type, e.g. 'ServiceRequest'. */
  resourceType: string;
  /** HTTP status the entry fails with (400-599), e.g. 409, 412, 500, 503. */
  status: number;
  /** How many transactions fail this way (default 1). */
  count?: number;
}

export interface PendingEntryFault {
  resourceType: string;
  status: number;
  remaining: number;
}

export class SandboxFaults {
  private readonly entryFaults: PendingEntryFault[] = [];

  /**
   * The next `count` (default 1) transactions that contain an entry creating a new resource of
   * `resourceType` fail that entry (the first such entry) with `status`. A non-atomic server keeps the
   * other entries; an atomic one fails the whole transaction with that status.
   */
  failNextEntry(opts: FailNextEntryOptions): void {
    const { resourceType, status } = opts;
    const count = opts.count ?? 1;
    if (typeof resourceType !== 'string' || !/^[A-Z][A-Za-z]{0,63}$/.test(resourceType)) {
      throw new Error(`failNextEntry: invalid resourceType ${JSON.stringify(resourceType)}`);
    }
    if (!Number.isInteger(status) || status < 400 || status > 599) {
      throw new Error(`failNextEntry: status must be an integer 400-599 (got ${JSON.stringify(status)})`);
    }
    if (!Number.isInteger(count) || count < 1) {
      throw new Error(`failNextEntry: count must be a positive integer (got ${JSON.stringify(count)})`);
    }
    this.entryFaults.push({ resourceType, status, remaining: count });
  }

  /** Pending faults (copies). */
  pending(): PendingEntryFault[] {
    return this.entryFaults.map((f) => ({ ...f }));
  }

  clear(): void {
    this.entryFaults.length = 0;
  }

  /**
   * For a transaction whose new-create entries have these types (in entry order): the first pending
   * fault that applies, consumed, and the index into `createTypes` of the entry it hits.
   * @internal used by the engine
   */
  take(createTypes: readonly (string | undefined)[]): { index: number; status: number } | undefined {
    for (let f = 0; f < this.entryFaults.length; f++) {
      const fault = this.entryFaults[f];
      const index = createTypes.indexOf(fault.resourceType);
      if (index >= 0) {
        fault.remaining--;
        if (fault.remaining <= 0) {
          this.entryFaults.splice(f, 1);
        }
        return { index, status: fault.status };
      }
    }
    return undefined;
  }

  /** Applies a JSON request body of POST /_sandbox/faults; throws on anything it does not understand. */
  applyJson(body: unknown): void {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      throw new Error('expected a JSON object like {"failNextEntry": {"resourceType": "ServiceRequest", "status": 409}}');
    }
    const entries = Object.entries(body as Record<string, unknown>);
    if (entries.length === 0) {
      throw new Error('no fault given (known: failNextEntry, clear)');
    }
    for (const [key, value] of entries) {
      if (key === 'failNextEntry') {
        for (const item of Array.isArray(value) ? value : [value]) {
          if (item === null || typeof item !== 'object') {
            throw new Error('failNextEntry needs {"resourceType": ..., "status": ...}');
          }
          this.failNextEntry(item as FailNextEntryOptions);
        }
      } else if (key === 'clear') {
        if (value === true) {
          this.clear();
        }
      } else {
        throw new Error(`unknown fault "${key}" (known: failNextEntry, clear)`);
      }
    }
  }
}
