import type { Destination } from '../../config';
import { createFhirClient } from './client';

export type FhirClient = ReturnType<typeof createFhirClient>;

/** One FHIR client per destination, created on first use and kept (it caches its token). */
export class FhirClients {
  private readonly clients = new Map<string, FhirClient>();

  constructor(private readonly factory: (d: Destination) => FhirClient = (d) => createFhirClient(d)) {}

  get(d: Destination): FhirClient {
    let c = this.clients.get(d.id);
    if (!c) {
      c = this.factory(d);
      this.clients.set(d.id, c);
    }
    return c;
  }
}
