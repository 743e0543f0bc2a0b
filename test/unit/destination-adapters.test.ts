import { type DeliveryContext, type DestinationAdapter, DestinationAdapters, fhirDestination } from '../../src/destinations';

/** Destination kinds behind adapters (issue 11 point 3): each destination reaches its centre through its type's adapter. */
describe('destination adapters', () => {
  const done = async (): Promise<{ kind: 'done' }> => ({ kind: 'done' });
  const other: DestinationAdapter = {
    type: 'direct-messaging',
    submit: done,
    addDocuments: done,
    cancel: done,
    readReport: async () => ({ contentType: 'text/plain', body: Buffer.from('report') }),
  };

  test('a destination without a type is fhir; each type reaches its own adapter', async () => {
    const adapters = new DestinationAdapters([fhirDestination(), other]);
    expect(adapters.for({ id: 'centre' }).type).toBe('fhir');
    expect(adapters.for({ id: 'centre', type: 'fhir' }).type).toBe('fhir');
    const dm = adapters.for({ id: 'dm', type: 'direct-messaging' as 'fhir' });
    expect(await dm.submit({} as DeliveryContext)).toEqual({ kind: 'done' });
  });

  test('an unknown type, or a type registered twice, is an error naming it', () => {
    expect(() => new DestinationAdapters([other]).for({ id: 'centre' })).toThrow(/destination centre has type fhir, which this gateway does not deliver to/);
    expect(() => new DestinationAdapters([other, other])).toThrow(/direct-messaging is registered twice/);
  });
});
