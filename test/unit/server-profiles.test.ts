import type { Bundle } from '@medplum/fhirtypes';
import { destinationOptionVariables, loadConfig } from '../../src/config/config';
import { destinationSchema, destinationSettings, serverProfileDefaults } from '../../src/config/destinations';
import { documentsToMoveOut, estimateJsonBytes, planBinaries } from '../../src/destinations/fhir/attachments';
import { hasContent } from '../../src/destinations/fhir/verify';
import { conditionalIndexes, rewriteReferences, withoutConditionalEntries } from '../../src/destinations/fhir/client/resolve';
import type { ReferralDocument } from '../../src/model';

const base = { DESTINATIONS_FILE: '/nonexistent/destinations.json', FHIR_BASE_URL: 'https://centre.example.org/fhir/R4' };

function doc(bytes: number): ReferralDocument {
  return { kind: 'pathology-report', title: 'Report', contentType: 'application/pdf', data: Buffer.alloc(bytes, 7).toString('base64') } as ReferralDocument;
}

describe('destination settings by server profile', () => {
  test('a destination without a profile keeps the behaviour it had (conditional transaction, Binary PUT, Prefer minimal)', () => {
    expect(destinationSettings({})).toEqual({ profile: 'generic', ...serverProfileDefaults.generic, attachmentOrigins: [] });
    expect(destinationSettings({}).binaryMode).toBe('put');
    expect(destinationSettings({}).preferMinimal).toBe(true);
  });

  test('profile medplum fills in what Medplum needs; a setting given explicitly wins', () => {
    const s = destinationSettings({ profile: 'medplum' });
    expect(s).toMatchObject({
      binaryMode: 'raw',
      clientIds: false,
      preferMinimal: false,
      transactionMode: 'resolve-first',
      presignedUrls: true,
      verifyDelivery: true,
    });
    expect(s.maxJsonBytes).toBeLessThanOrEqual(1_048_576);
    expect(destinationSettings({ profile: 'medplum', preferMinimal: true, maxJsonBytes: 5_000_000 })).toMatchObject({
      preferMinimal: true,
      maxJsonBytes: 5_000_000,
    });
  });

  test('profile hapi uploads raw Binary with stable client ids', () => {
    expect(destinationSettings({ profile: 'hapi' })).toMatchObject({ binaryMode: 'raw', clientIds: true, transactionMode: 'conditional' });
  });

  test('a destinations file entry with the new settings parses; unknown values are refused', () => {
    const entry = {
      id: 'medplum-centre',
      name: 'Centre',
      organization: { system: 's', value: 'v' },
      baseUrl: 'https://api.centre.example/fhir/R4',
      profile: 'medplum',
      binaryMode: 'raw',
      attachmentOrigins: ['https://storage.centre.example'],
    };
    expect(destinationSchema.safeParse(entry).success).toBe(true);
    expect(destinationSchema.safeParse({ ...entry, profile: 'azure' }).success).toBe(false);
    expect(destinationSchema.safeParse({ ...entry, transactionMode: 'maybe' }).success).toBe(false);
  });
});

describe('the FHIR_BASE_URL destination takes every destination option from a FHIR_<OPTION> variable', () => {
  test('profile, Binary mode, sizes, booleans, lists and JSON objects', () => {
    const c = loadConfig({
      ...base,
      FHIR_PROFILE: 'medplum',
      FHIR_BINARY_MODE: 'raw',
      FHIR_MAX_INLINE_BYTES: '65536',
      FHIR_MAX_JSON_BYTES: '900000',
      FHIR_CLIENT_IDS: 'false',
      FHIR_PREFER_MINIMAL: 'false',
      FHIR_TRANSACTION_MODE: 'resolve-first',
      FHIR_VERIFY_DELIVERY: 'true',
      FHIR_PRESIGNED_URLS: 'true',
      FHIR_ATTACHMENT_ORIGINS: 'https://storage.centre.example, https://cdn.centre.example',
      FHIR_POLL_CRON: '*/2 * * * *',
      FHIR_CIRCUIT_BREAKER: '{"failureThreshold":3}',
      FHIR_NAME: 'Medplum test centre',
    });
    expect(c.destinations[0]).toMatchObject({
      id: 'default',
      name: 'Medplum test centre',
      profile: 'medplum',
      binaryMode: 'raw',
      maxInlineBytes: 65536,
      maxJsonBytes: 900000,
      clientIds: false,
      preferMinimal: false,
      transactionMode: 'resolve-first',
      verifyDelivery: true,
      presignedUrls: true,
      attachmentOrigins: ['https://storage.centre.example', 'https://cdn.centre.example'],
      pollCron: '*/2 * * * *',
      circuitBreaker: { failureThreshold: 3, cooldownMs: 30000, maxCooldownMs: 600000 },
    });
  });

  test('every option of the schema has its variable (none forgotten)', () => {
    const names = destinationOptionVariables().map((v) => v.variable);
    for (const v of [
      'FHIR_PROFILE',
      'FHIR_BINARY_MODE',
      'FHIR_MAX_INLINE_BYTES',
      'FHIR_MAX_JSON_BYTES',
      'FHIR_CLIENT_IDS',
      'FHIR_PREFER_MINIMAL',
      'FHIR_TRANSACTION_MODE',
      'FHIR_VERIFY_DELIVERY',
      'FHIR_PRESIGNED_URLS',
      'FHIR_ATTACHMENT_ORIGINS',
      'FHIR_POLL_CRON',
      'FHIR_CIRCUIT_BREAKER',
    ]) {
      expect(names).toContain(v);
    }
  });

  test.each([
    [{ FHIR_PROFILE: 'azure' }, /^FHIR_PROFILE /],
    [{ FHIR_BINARY_MODE: 'inline' }, /^FHIR_BINARY_MODE /],
    [{ FHIR_CLIENT_IDS: 'yes' }, /^FHIR_CLIENT_IDS /],
    [{ FHIR_MAX_JSON_BYTES: 'a lot' }, /^FHIR_MAX_JSON_BYTES /],
    [{ FHIR_ATTACHMENT_ORIGINS: 'not a url' }, /^FHIR_ATTACHMENT_ORIGINS /],
    [{ FHIR_CIRCUIT_BREAKER: '{"failureThreshold":0}' }, /^FHIR_CIRCUIT_BREAKER \(failureThreshold\) /],
  ])('%j is refused with one line naming the variable', (env, message) => {
    expect(() => loadConfig({ ...base, ...env })).toThrow(message);
  });
});

describe('documents that leave the transaction', () => {
  const destination = { baseUrl: 'https://c.example/fhir', maxInlineBytes: 1000 };

  test('binaryMode raw: large documents are uploaded before the transaction, none is a Binary entry', () => {
    const plan = planBinaries({
      referralId: 'r1',
      documents: [doc(10), doc(5000), doc(2000)],
      startIndex: 0,
      destination: { ...destination, binaryMode: 'raw' },
    });
    expect(plan.raw).toEqual([1, 2]);
    expect(plan.entries).toEqual([]);
  });

  test('binaryMode put (the generic default) keeps Binary entries in the transaction; alsoRaw moves a document out', () => {
    const plan = planBinaries({ referralId: 'r1', documents: [doc(10), doc(5000)], startIndex: 0, destination, alsoRaw: [0] });
    expect(plan.raw).toEqual([0]);
    expect(plan.entries).toHaveLength(1);
    expect(plan.entries[0].request).toMatchObject({ method: 'PUT' });
  });

  test('the JSON size estimate counts long strings without building them', () => {
    const value = { a: 'x'.repeat(100_000), b: [1, 2, 3], c: 'é' };
    expect(estimateJsonBytes(value)).toBe(Buffer.byteLength(JSON.stringify(value)));
  });

  test('to fit maxJsonBytes, the largest inline documents leave first; undefined when nothing can make it fit', () => {
    const docs = [doc(300_000), doc(600_000), doc(100_000)];
    const size = 2000 + docs.reduce((n, d) => n + (d.data?.length ?? 0), 0);
    expect(documentsToMoveOut(docs, new Set(), size, 10_000_000)).toEqual([]);
    expect(documentsToMoveOut(docs, new Set(), size, 1_000_000)).toEqual([1]);
    expect(documentsToMoveOut(docs, new Set(), size, 300_000)).toEqual([1, 0]);
    expect(documentsToMoveOut(docs, new Set(), size, 1000)).toBeUndefined();
  });
});

describe('resolve-first transactions', () => {
  const bundle: Bundle = {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      { fullUrl: 'urn:uuid:p', resource: { resourceType: 'Patient' }, request: { method: 'POST', url: 'Patient', ifNoneExist: 'identifier=s|1' } },
      {
        fullUrl: 'urn:uuid:sr',
        resource: { resourceType: 'ServiceRequest', status: 'active', intent: 'order', subject: { reference: 'urn:uuid:p' } },
        request: { method: 'POST', url: 'ServiceRequest', ifNoneExist: 'identifier=s|2' },
      },
      {
        fullUrl: 'urn:uuid:t',
        resource: { resourceType: 'Task', status: 'requested', intent: 'order', focus: { reference: 'urn:uuid:sr' }, for: { reference: 'urn:uuid:p' } },
        request: { method: 'POST', url: 'Task', ifNoneExist: 'identifier=s|3' },
      },
      { fullUrl: 'https://c/Binary/b', resource: { resourceType: 'Binary', contentType: 'text/plain' }, request: { method: 'PUT', url: 'Binary/b' } },
    ],
  };

  test('conditional entries are the POSTs with ifNoneExist', () => {
    expect(conditionalIndexes(bundle.entry ?? [])).toEqual([0, 1, 2]);
  });

  test('what exists is left out and referenced by id; the rest becomes plain creates', () => {
    const resolved = withoutConditionalEntries(bundle, new Map([[0, { resourceType: 'Patient', id: 'pat-1' }]]));
    expect(resolved.sent).toEqual([1, 2, 3]);
    const entries = resolved.bundle.entry ?? [];
    expect(entries.map((e) => e.request?.ifNoneExist)).toEqual([undefined, undefined, undefined]);
    expect((entries[0].resource as { subject: { reference: string } }).subject.reference).toBe('Patient/pat-1');
    // A reference to an entry still created keeps its placeholder, which the server rewrites.
    expect((entries[1].resource as { focus: { reference: string } }).focus.reference).toBe('urn:uuid:sr');
    expect((entries[1].resource as { for: { reference: string } }).for.reference).toBe('Patient/pat-1');
    // The original bundle is not changed.
    expect(bundle.entry?.[0].request?.ifNoneExist).toBe('identifier=s|1');
  });

  test('document data is never rewritten or copied', () => {
    const data = 'A'.repeat(70_000);
    const out = rewriteReferences({ content: [{ attachment: { data, url: 'urn:uuid:x' } }] }, new Map([['urn:uuid:x', 'Binary/1']]));
    expect(out.content[0].attachment.data).toBe(data);
    expect(out.content[0].attachment.url).toBe('Binary/1');
  });
});

describe('verification of a delivered DocumentReference', () => {
  test.each([
    [{ data: 'AAAA' }, true],
    [{ url: 'Binary/123' }, true],
    [{ url: 'https://storage.example/binary/1/2?Signature=x' }, true],
    [{ url: 'urn:uuid:0f7d1a52-0000-4000-8000-000000000000' }, false],
    [{}, false],
  ])('attachment %j has content: %s', (attachment, expected) => {
    expect(hasContent({ resourceType: 'DocumentReference', status: 'current', content: [{ attachment }] })).toBe(expected);
  });
});
