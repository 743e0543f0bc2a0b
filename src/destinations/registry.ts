import type { Destination } from '../config';
import type { DestinationAdapter } from './adapter';

/** The destination kinds the gateway delivers to, by `type` (a destination without one is `fhir`). */
export class DestinationAdapters {
  readonly #byType = new Map<string, DestinationAdapter>();

  constructor(adapters: ReadonlyArray<DestinationAdapter>) {
    for (const a of adapters) {
      if (this.#byType.has(a.type)) throw new Error(`destination type ${a.type} is registered twice`);
      this.#byType.set(a.type, a);
    }
  }

  /** The adapter of a destination; an unknown type is a configuration error (the destination schema refuses it first). */
  for(destination: Pick<Destination, 'id' | 'type'>): DestinationAdapter {
    const type = destination.type ?? 'fhir';
    const adapter = this.#byType.get(type);
    if (!adapter) throw new Error(`destination ${destination.id} has type ${type}, which this gateway does not deliver to`);
    return adapter;
  }
}
