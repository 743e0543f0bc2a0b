import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { Hl7Message } from '@medplum/core';
import { decodeHl7Text } from '../../src/intake/hl7v2/escape';
import { loadV2Tables, parseV2Tables, readV2Referral, type V2Reading, type V2Tables } from '../../src/intake/hl7v2/map';
import { isSnomedConceptId } from '../../src/mapping/snomed';
import { type Referral, referralSchema } from '../../src/model';
import { pathToExpression } from '../../src/outcomes';
import { prng } from '../helpers/prng';

/**
 * HL7 v2 referral messages (REF^I12/I13/I14, OMG^O19) read into the gateway's JSON referral: golden fixtures (some the
 * same referral as a JSON fixture), escape sequences, repetitions, empty fields, Z-segments, line ends, where each
 * part of the referral is in the message, and a seeded mutation loop in which the reader never throws.
 */

const V2_DIR = 'fixtures/hl7v2';
const TABLES_JSON = JSON.parse(readFileSync('mappings/hl7v2.json', 'utf8')) as Record<string, unknown>;

const text = (file: string): string => readFileSync(join(V2_DIR, file), 'utf8');
const parse = (message: string): Hl7Message => Hl7Message.parse(message);
const read = (message: string, tables?: V2Tables): V2Reading => readV2Referral(parse(message), tables);
const readFile = (file: string, tables?: V2Tables): V2Reading => read(text(file), tables);
const jsonFixture = (name: string): Referral => referralSchema.parse(JSON.parse(readFileSync(`fixtures/referrals/${name}.json`, 'utf8')));

/** Tables as in mappings/hl7v2.json with some tables replaced. */
const tablesWith = (changes: Record<string, unknown>): V2Tables => parseV2Tables({ ...TABLES_JSON, ...changes });
const table = <T>(name: string): T => TABLES_JSON[name] as T;

/** Where each schema issue of a reading is in the message: `path -> location`. */
function locatedIssues(reading: V2Reading): Record<string, string> {
  const parsed = referralSchema.safeParse(reading.referral);
  if (parsed.success) return {};
  return Object.fromEntries(parsed.error.issues.map((i) => [pathToExpression(i.path), reading.locate(pathToExpression(i.path))]));
}

/** A message built from segments (CR between them, as HL7 wants). */
const message = (...segments: string[]): string => segments.join('\r');
const MSH_REF = 'MSH|^~\\&|EHR|CITY-HOSP^2.16.840.1.113883.19.6^ISO|RG|RG|20260910143000||REF^I12^REF_I12|C1|P|2.7.1';
const PID = 'PID|1||MRN-1^^^&2.16.840.1.113883.19.5&ISO^MR||Doe^Jane||19700101|F';
const RF1 = 'RF1|P|R|SO^Second Opinion^HL70282||O|EXT-1';

describe('HL7 v2 referral: golden fixtures', () => {
  test('every fixture maps with the action, message type, sender and external id of its header, and no issue', () => {
    const expected: Record<string, Partial<V2Reading>> = {
      'ref-i12-breast-epic.hl7': {
        action: 'new',
        messageType: 'REF^I12',
        controlId: 'EPIC-000123-1',
        sendingApplication: 'EPIC',
        sendingFacility: 'CITY-HOSP',
        version: '2.7.1',
        externalId: 'EHR-2026-000123',
      },
      'ref-i12-sarcoma-crlf.hl7': {
        action: 'new',
        messageType: 'REF^I12',
        controlId: 'UH-0981-01',
        sendingFacility: 'UH-ORTHO',
        version: '2.6',
        externalId: 'UH-ORTHO-000981',
      },
      'ref-i12-lung-repetitions.hl7': {
        action: 'new',
        messageType: 'REF^I12',
        controlId: 'TC-88412',
        sendingApplication: 'TRAKCARE',
        version: '2.5.1',
        externalId: 'STM-REF-88412',
      },
      'ref-i12-tumour-board-many-obx.hl7': {
        action: 'new',
        messageType: 'REF^I12',
        controlId: 'MT-77812',
        sendingFacility: 'NORTHFJORD',
        externalId: 'TB-2026-0042',
      },
      'omg-o19-new-360x.hl7': { action: 'new', messageType: 'OMG^O19', controlId: 'NH-88123', sendingApplication: 'NH-EHR', externalId: 'NHC-2026-4410' },
      'omg-o19-cancel.hl7': {
        action: 'cancel',
        messageType: 'OMG^O19',
        controlId: 'NH-88190',
        externalId: 'NHC-2026-4410',
        cancelReason: 'Patient withdrew the request',
      },
      'ref-i13-documents-added.hl7': { action: 'modify', messageType: 'REF^I13', controlId: 'EPIC-000123-2', externalId: 'EHR-2026-000123' },
      'ref-i14-cancel.hl7': {
        action: 'cancel',
        messageType: 'REF^I14',
        controlId: 'EPIC-000123-3',
        externalId: 'EHR-2026-000123',
        cancelReason: 'Patient has chosen to be treated locally.',
      },
    };
    expect(readdirSync(V2_DIR).sort()).toEqual(Object.keys(expected).sort());
    for (const [file, want] of Object.entries(expected)) {
      const reading = readFile(file);
      expect({ file, ...reading, referral: undefined, locate: undefined }).toMatchObject({ file, ...want, issues: [] });
    }
  });

  /**
   * What v2 cannot carry in this mapping, and so is left out of both sides before comparing: the callback URL (a v2
   * sender is answered with ACKs and messages, not webhooks), the treatment history (REF^I12 has PR1 for procedures
   * only, nothing for lines of chemotherapy or radiotherapy; not mapped) and a document's language (OBX has no
   * language for ED or RP data).
   */
  const withoutV2Gaps = (r: Referral): Omit<Referral, 'callbackUrl' | 'treatmentHistory'> => {
    const { callbackUrl: _callbackUrl, treatmentHistory: _treatmentHistory, ...rest } = r;
    return { ...rest, documents: r.documents.map(({ language: _language, ...doc }) => doc) };
  };

  test.each([
    ['ref-i12-breast-epic.hl7', 'breast-second-opinion'],
    ['ref-i12-sarcoma-crlf.hl7', 'sarcoma-expert-opinion'],
    ['ref-i12-lung-repetitions.hl7', 'lung-expert-opinion'],
    ['omg-o19-new-360x.hl7', 'colorectal-second-opinion'],
  ])('%s is the referral of fixtures/referrals/%s.json (but for what v2 cannot carry)', (file, json) => {
    const reading = readFile(file);
    const parsed = referralSchema.safeParse(reading.referral);
    expect(parsed.success ? [] : parsed.error.issues).toEqual([]);
    const fromV2 = referralSchema.parse(reading.referral);
    expect(withoutV2Gaps(fromV2)).toEqual(withoutV2Gaps(jsonFixture(json)));
    // The gaps really are only those: v2 gave none of them.
    expect(fromV2.callbackUrl).toBeUndefined();
    expect(fromV2.treatmentHistory).toEqual([]);
    expect(fromV2.documents.every((d) => d.language === undefined)).toBe(true);
  });

  test('tumour board (Meditech style): text OBX lines become one document, FT formatting and escapes decode, a referred-to centre routes', () => {
    const tables = tablesWith({ consent: { ...table<object>('consent'), whenAbsent: { facilities: ['NORTHFJORD'], patientAgreed: true } } });
    const reading = readFile('ref-i12-tumour-board-many-obx.hl7', tables);
    const r = reading.referral as Record<string, any>;
    expect(reading.issues).toEqual([]);
    expect(r).toMatchObject({
      kind: 'tumour-board-review',
      priority: 'asap',
      destination: 'example-cancer-centre',
      reasons: ['patient-preference', 'treatment-plan-review'],
    });
    // RF1-10 text without a code, then the RE note; the note's repetitions are lines, its escapes decoded.
    expect(r.reasonText).toBe(
      'Board split between resection and chemoradiotherapy\nRegimen: 85 mg^m2 & 5-FU bolus\\infusion|4 cycles\nCA 19~9 falling, see trend'
    );
    expect(r.questions).toEqual(['Is an operation realistic for me now?']);
    // `""` (HL7 null) in PID-3's second repetition and in the middle name and prefix reads as absent.
    expect(r.patient).toEqual({
      identifiers: [{ system: 'urn:oid:2.16.840.1.113883.19.8.5', value: 'MRN-0099' }],
      name: { family: 'Larsen', given: ['Ingrid'] },
      birthDate: '1963-01-08',
      gender: 'female',
      phone: '+47 912 34 567',
      email: 'ingrid.larsen@example.no',
    });
    expect(r.diagnosis).toEqual({
      code: { system: 'http://hl7.org/fhir/sid/icd-10', code: 'C25.0', display: 'Malignant neoplasm of head of pancreas' },
      diagnosedOn: '2026-05-20',
    });
    const docs = r.documents as Array<Record<string, string>>;
    // OBX 1-2 (TX, same code and sub-id) are one document; the NM observation, the note after OBX 3 and the deleted OBX 7 are not documents.
    expect(docs.map((d) => [d.kind, d.title, d.contentType, d.date])).toEqual([
      ['pathology-report', 'EUS-FNB pathology', 'text/plain', '2026-05-20'],
      ['imaging-report', 'Restaging CT', 'text/plain', '2026-08-20'],
      ['genomic-report', 'Tumour NGS and germline testing', 'application/pdf', '2026-06-15'],
      ['imaging-study', 'Restaging CT (DICOM study)', 'application/dicom', '2026-08-20'],
    ]);
    const decoded = (d: Record<string, string>): string => Buffer.from(d.data, 'base64').toString('utf8');
    expect(decoded(docs[0])).toBe('EUS-FNB of pancreatic head mass.\nAdenocarcinoma, moderately differentiated.\nMargins not assessable on FNB.\n');
    expect(decoded(docs[1])).toBe('CT pancreas protocol 20/08/2026\nSMV abutment < 180 degrees\nNo metastases.\n');
    // A relative RP pointer is resolved against the application id's URL.
    expect(docs[3].url).toBe('https://pacs.nordfjord.example.org/dicomweb/studies/1.2.826.0.1.3680043.8.498.67890');
    // No CON: the listed sending facility's rule says the patient agreed (without a date).
    expect(r.consent).toEqual({ patientAgreed: true });
    const parsed = referralSchema.safeParse(r);
    // consent.date is (being made) optional; any other issue would be a mapping fault.
    expect(parsed.success ? [] : parsed.error.issues.filter((i) => pathToExpression(i.path) !== 'consent.date')).toEqual([]);
  });

  test('without a CON segment and a sending facility not listed, consent is left out and named at the message', () => {
    const reading = readFile('ref-i12-tumour-board-many-obx.hl7');
    expect(reading.referral.consent).toBeUndefined();
    expect(locatedIssues(reading)).toEqual({ consent: 'MSH^1^9' });
  });

  test('REF^I13 adds documents (a Hex-encoded text); REF^I14 and OMG ORC-1 CA cancel with their reason', () => {
    const added = readFile('ref-i13-documents-added.hl7');
    expect(added.referral.documents).toEqual([
      {
        kind: 'lab-report',
        title: 'Receptor status (IHC)',
        date: '2026-09-11',
        contentType: 'text/plain',
        data: Buffer.from('ER 95%, PR 80%, HER2 1+ (IHC).\n').toString('base64'),
      },
    ]);
    expect(added.locate('documents[0].data')).toBe('OBX^1^5');
    expect(readFile('ref-i14-cancel.hl7').cancelReason).toBe('Patient has chosen to be treated locally.');
    const cancel = readFile('omg-o19-cancel.hl7');
    expect([cancel.action, cancel.externalId, cancel.cancelReason]).toEqual(['cancel', 'NHC-2026-4410', 'Patient withdrew the request']);
    expect(readFile('omg-o19-new-360x.hl7').cancelReason).toBeUndefined();
  });
});

describe('HL7 v2 escape sequences', () => {
  test('delimiters, hex (UTF-8 or single bytes), line breaks; highlighting and character-set switches carry no text', () => {
    expect(decodeHl7Text('a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f')).toBe('a|b^c&d~e\\f');
    expect(decodeHl7Text('O\\X27\\Brien')).toBe("O'Brien");
    expect(decodeHl7Text('Caf\\XC3A9\\ / Caf\\XE9\\')).toBe('Café / Café');
    expect(decodeHl7Text('one\\.br\\two\\.sp2\\three\\.sk3\\four\\.in+4\\')).toBe('one\ntwo\n\nthree   four');
    expect(decodeHl7Text('\\H\\bold\\N\\ \\C2842\\x\\M2442\\y\\Zlocal\\z')).toBe('bold xyz');
  });

  test('an unknown sequence and an escape character without its closing one are kept as sent', () => {
    expect(decodeHl7Text('a\\Q\\b')).toBe('a\\Q\\b');
    expect(decodeHl7Text('C:\\temp')).toBe('C:\\temp');
    expect(decodeHl7Text('\\Xzz\\')).toBe('\\Xzz\\');
    expect(decodeHl7Text('plain base64 /+== needs no work')).toBe('plain base64 /+== needs no work');
  });

  test('a message with other delimiters is split and decoded with its own (MSH-1, MSH-2)', () => {
    const reading = read(
      message(
        'MSH#$*!%#EHR#CITY-HOSP$2.16.840.1.113883.19.6$ISO#RG#RG#20260910##REF$I12#C9#P#2.7.1',
        'RF1#P#R#SO##O#EXT-9',
        'PID#1##A-1$$$%2.16.840.1.113883.19.5%ISO*B-2$$$NHS##O!X27!Brien!F!Smith$Se!T!n!E!a###F',
        'NTE#1#P#Line one!.br!Line two#PQ'
      )
    );
    expect(reading.referral.patient).toMatchObject({
      identifiers: [
        { system: 'urn:oid:2.16.840.1.113883.19.5', value: 'A-1' },
        { system: 'https://fhir.nhs.uk/Id/nhs-number', value: 'B-2' },
      ],
      name: { family: "O'Brien#Smith", given: ['Se%n!a'] },
    });
    expect(reading.referral.questions).toEqual(['Line one\nLine two']);
  });

  test('in the fixtures: a hex apostrophe in an organization name, a hex question mark, \\.br\\ in an ASCII ED document', () => {
    const r = readFile('ref-i12-lung-repetitions.hl7').referral as Record<string, any>;
    expect(r.referrer.organization.name).toBe("St Mary's Hospital Respiratory Unit");
    expect(r.questions[0]).toBe('Is surgery possible at all after induction treatment?');
    expect(Buffer.from(r.documents[1].data, 'base64').toString('utf8')).toMatch(/^FDG PET-CT 01\/08\/2026\nRight upper lobe/);
  });
});

describe('HL7 v2 repetitions, empty fields, Z-segments, line ends', () => {
  test('PID-3 repetitions each become an identifier; one without a resolvable system is dropped (warning) when another resolves', () => {
    const reading = read(message(MSH_REF, RF1, 'PID|1||A-1^^^&2.16.840.1.113883.19.5&ISO~V-77^^^VISITS^VN~^^^NHS~9434765919^^^NHS^NH||Doe^Jane||19700101|F'));
    expect((reading.referral.patient as Record<string, unknown>).identifiers).toEqual([
      { system: 'urn:oid:2.16.840.1.113883.19.5', value: 'A-1' },
      { system: 'https://fhir.nhs.uk/Id/nhs-number', value: '9434765919' },
    ]);
    expect(reading.issues).toEqual([expect.objectContaining({ severity: 'warning', expression: 'PID^1^3^2^4' })]);
    expect(reading.locate('patient.identifiers[1].value')).toBe('PID^1^3^4^1');
  });

  test('when no identifier resolves they are kept without system, so the schema names the assigning authority', () => {
    const reading = read(message(MSH_REF, RF1, 'PID|1||A-1^^^LOCALMRN||Doe^Jane||19700101|F'));
    expect((reading.referral.patient as Record<string, unknown>).identifiers).toEqual([{ value: 'A-1' }]);
    expect(locatedIssues(reading)).toMatchObject({ 'patient.identifiers[0].system': 'PID^1^3^1^4' });
    // A configured system for the sending facility resolves it.
    const tables = tablesWith({
      assigningAuthorities: { ...table<object>('assigningAuthorities'), bySendingFacility: { 'CITY-HOSP': 'urn:oid:2.16.840.1.113883.19.5' } },
    });
    expect(
      (
        (read(message(MSH_REF, RF1, 'PID|1||A-1^^^LOCALMRN||Doe^Jane||19700101|F'), tables).referral.patient as Record<string, unknown>)
          .identifiers as unknown[]
      )[0]
    ).toEqual({
      system: 'urn:oid:2.16.840.1.113883.19.5',
      value: 'A-1',
    });
  });

  test('the legal name (XPN-7 L) is chosen among PID-5 repetitions; empty and "" fields are absent, not empty strings', () => {
    const reading = read(message(MSH_REF, RF1, 'PID|1||MRN-1^^^&2.16.840.1.113883.19.5&ISO||JD^J^^^^^A~Doe^Jane^""^^Dr^^L||""|""|||||'));
    const patient = reading.referral.patient as Record<string, unknown>;
    expect(patient.name).toEqual({ family: 'Doe', given: ['Jane'], prefix: ['Dr'] });
    expect(patient).not.toHaveProperty('birthDate');
    expect(patient).not.toHaveProperty('gender');
    expect(locatedIssues(reading)).toMatchObject({ 'patient.birthDate': 'PID^1^7', 'patient.gender': 'PID^1^8' });
  });

  test('Z-segments (and notes after them) are ignored, even when they look like known segments', () => {
    const base = message(MSH_REF, RF1, PID, 'DG1|1||C50.9^Breast^I10C');
    const withZ = message(
      MSH_REF,
      'ZRF|1|EXT-FAKE|urgent',
      RF1,
      'ZPI|1||FAKE-1^^^&1.2.3&ISO',
      'NTE|1||z note',
      PID,
      'DG1|1||C50.9^Breast^I10C',
      'ZDG|C99^Other^I10C'
    );
    expect(read(withZ).referral).toEqual(read(base).referral);
  });

  test('CR, CRLF and LF line ends read the same', () => {
    const cr = text('ref-i12-breast-epic.hl7');
    expect(cr).toMatch(/\r(?!\n)/);
    expect(text('ref-i12-sarcoma-crlf.hl7')).toMatch(/\r\n/);
    expect(text('ref-i12-lung-repetitions.hl7')).not.toMatch(/\r/);
    const expected = read(cr).referral;
    expect(read(cr.replace(/\r/g, '\r\n')).referral).toEqual(expected);
    expect(read(cr.replace(/\r/g, '\n')).referral).toEqual(expected);
  });
});

describe('HL7 v2 locations (for ACK ERR segments)', () => {
  test('the main paths of a REF^I12 name their segment, sequence, field (and repetition, component where known)', () => {
    const reading = readFile('ref-i12-breast-epic.hl7');
    expect(
      Object.fromEntries(
        [
          'externalId',
          'kind',
          'priority',
          'reasons[1]',
          'questions[0]',
          'patient',
          'patient.identifiers[0].value',
          'patient.identifiers[0].system',
          'patient.name.given[0]',
          'patient.birthDate',
          'patient.gender',
          'patient.email',
          'referrer.practitioner.identifier.system',
          'referrer.practitioner.name.family',
          'referrer.organization.name',
          'diagnosis.code',
          'diagnosis.code.system',
          'diagnosis.diagnosedOn',
          'diagnosis.histology',
          'diagnosis.stage.value',
          'diagnosis.stage.system',
          'documents[0].data',
          'documents.1.url',
          'documents[1].contentType',
          'documents[0].title',
          'consent.patientAgreed',
          'consent.date',
          'destination',
          'callbackUrl',
          'treatmentHistory[0].start',
          '$',
          'no.such.path',
        ].map((p) => [p, reading.locate(p)])
      )
    ).toEqual({
      externalId: 'RF1^1^6',
      kind: 'RF1^1^4^1',
      priority: 'RF1^1^2',
      'reasons[1]': 'RF1^1^10^3',
      'questions[0]': 'NTE^1^3',
      patient: 'PID^1',
      'patient.identifiers[0].value': 'PID^1^3^1^1',
      'patient.identifiers[0].system': 'PID^1^3^1^4',
      'patient.name.given[0]': 'PID^1^5^1^2',
      'patient.birthDate': 'PID^1^7',
      'patient.gender': 'PID^1^8',
      'patient.email': 'PID^1^13^2^4',
      'referrer.practitioner.identifier.system': 'PRD^1^7^1^2',
      'referrer.practitioner.name.family': 'PRD^1^2^1^1',
      'referrer.organization.name': 'PRD^1^10^1^1',
      'diagnosis.code': 'DG1^1^3',
      'diagnosis.code.system': 'DG1^1^3^1^3',
      'diagnosis.diagnosedOn': 'DG1^1^5',
      'diagnosis.histology': 'OBX^1^5',
      'diagnosis.stage.value': 'OBX^3^5',
      'diagnosis.stage.system': 'OBX^3^17',
      'documents[0].data': 'OBX^4^5',
      'documents.1.url': 'OBX^5^5',
      'documents[1].contentType': 'OBX^5^5^1^3',
      'documents[0].title': 'OBX^4^3',
      'consent.patientAgreed': 'CON^1^11',
      'consent.date': 'CON^1^13',
      destination: 'MSH^1^6',
      callbackUrl: 'MSH^1^9',
      'treatmentHistory[0].start': 'MSH^1^9',
      $: 'MSH^1^9',
      'no.such.path': 'MSH^1^9',
    });
  });

  test('OMG^O19 paths name ORC, OBR and TQ1', () => {
    const reading = readFile('omg-o19-new-360x.hl7');
    expect(
      ['externalId', 'kind', 'priority', 'reasons[0]', 'referrer.practitioner.identifier.value', 'referrer.organization.identifier.system'].map((p) =>
        reading.locate(p)
      )
    ).toEqual(['ORC^1^2', 'OBR^1^4^1', 'TQ1^1^9', 'OBR^1^31^1', 'ORC^1^12^1^1', 'ORC^1^21^1^6']);
  });

  test('an OMG priority in ORC-7 (TQ component 6) is read and located there when there is no TQ1', () => {
    const reading = read(message('MSH|^~\\&|EHR|FAC|RG|RG|20260910||OMG^O19|C4|P|2.5.1', PID, 'ORC|NW|P-1|||||^^^^^S', 'OBR|1|P-1||second-opinion^^L'));
    expect([reading.referral.priority, reading.locate('priority'), reading.referral.kind, reading.locate('kind')]).toEqual([
      'stat',
      'ORC^1^7^1^6',
      'second-opinion',
      'OBR^1^4^1',
    ]);
  });

  test('a broken message fails the schema at the fields it broke, each located in the message', () => {
    const reading = read(
      message(
        MSH_REF,
        'RF1|P|Z^Whenever^L|SO||O|EXT 1',
        'PRD|RP|Iyer^Meera|||||1234567893^NPI|||City Hospital^L^^^^&2.16.840.1.113883.19.6&ISO^XX^^^CITY-HOSP',
        'PID|1||MRN-1^^^&2.16.840.1.113883.19.5&ISO||Doe^Jane||1970|X|||||^NET^Internet^not-an-email',
        'DG1|1||C50.9^Breast^I99',
        'OBX|1|ED|11526-1^Pathology study^LN||^application^pdf^Base64^not base64!||||||F|||20990101',
        'OBX|2|NM|18842-5^Discharge summary^LN||12||||||F',
        'OBX|3|RP|18748-4^Diagnostic imaging study^LN||ftp://pacs/1^^application^dicom||||||F',
        'CON|1|001|||||||||R||20260901'
      )
    );
    expect(locatedIssues(reading)).toEqual({
      externalId: 'RF1^1^6',
      priority: 'RF1^1^2',
      'patient.birthDate': 'PID^1^7',
      'patient.gender': 'PID^1^8',
      'patient.email': 'PID^1^13^1^4',
      'diagnosis.code.system': 'DG1^1^3^1^3',
      'documents[0].date': 'OBX^1^14',
      'documents[0].data': 'OBX^1^5',
      // (an NM value carries neither content type nor data: the schema stops at the content type)
      'documents[1].contentType': 'OBX^2^5',
      'documents[2].url': 'OBX^3^5',
      'consent.patientAgreed': 'CON^1^11',
    });
    // The value type the schema cannot see is an issue of its own, at OBX-2.
    expect(reading.issues).toEqual([expect.objectContaining({ code: 'not-supported', severity: 'error', expression: 'OBX^2^2' })]);
  });
});

describe('HL7 v2 structural problems, message types, consent, destination', () => {
  test('an ED encoding or hex data it cannot decode is an error issue and leaves the data out', () => {
    const reading = read(
      message(
        MSH_REF,
        RF1,
        PID,
        'OBX|1|ED|11526-1^Pathology study^LN||^application^pdf^UUENCODE^begin 644||||||F',
        'OBX|2|ED|11526-1^Pathology study^LN||^text^plain^Hex^XYZ||||||F'
      )
    );
    expect(reading.issues.map((i) => [i.code, i.expression])).toEqual([
      ['not-supported', 'OBX^1^5^1^4'],
      ['invalid', 'OBX^2^5^1^5'],
    ]);
    expect((reading.referral.documents as object[]).map((d) => 'data' in d)).toEqual([false, false]);
  });

  test('a message type that is not a referral, and an order control it does not take, are errors at MSH-9 / ORC-1', () => {
    const adt = read(message('MSH|^~\\&|EHR|FAC|RG|RG|20260910||ADT^A01|C2|P|2.5.1', PID));
    expect([adt.action, adt.messageType, adt.issues.map((i) => i.expression)]).toEqual(['new', 'ADT^A01', ['MSH^1^9']]);
    const omg = (control: string): V2Reading => read(message('MSH|^~\\&|EHR|FAC|RG|RG|20260910||OMG^O19|C3|P|2.5.1', PID, `ORC|${control}|P-1`));
    expect(omg('SC').issues.map((i) => [i.code, i.expression])).toEqual([['not-supported', 'ORC^1^1']]);
    expect([omg('NW').action, omg('XO').action, omg('CA').action, omg('DC').action]).toEqual(['new', 'modify', 'cancel', 'cancel']);
    expect(readV2Referral(new Hl7Message([])).issues.map((i) => i.expression)).toEqual(['MSH^1^9']);
  });

  test('even what is not a parsed message at all reads as an empty referral with an exception issue, never a throw', () => {
    const reading = readV2Referral({} as Hl7Message);
    expect([reading.referral, reading.issues.map((i) => i.code), reading.locate('patient.birthDate')]).toEqual([{}, ['exception'], 'MSH^1^9']);
  });

  test('consent: a refusal among the release-of-information CONs wins; other consent types do not count', () => {
    const consentOf = (...cons: string[]): unknown => read(message(MSH_REF, RF1, PID, ...cons)).referral.consent;
    expect(consentOf('CON|1|001|||||||||A||20260901|20260902')).toEqual({ patientAgreed: true, date: '2026-09-01' });
    expect(consentOf('CON|1|001|||||||||A|||20260903', 'CON|2|001|||||||||X')).toEqual({ patientAgreed: false });
    expect(consentOf('CON|1|002^Medical Procedure (invasive)^HL70496|||||||||A||20260901|20260902')).toBeUndefined();
    expect(consentOf('CON|1||||||||||P')).toEqual({ patientAgreed: false });
    expect(consentOf('CON|1||||||||||?')).toEqual({});
  });

  test('destination: RT provider by identifier or name; unknown goes to the unmatched destination (sandbox) with a warning; MSH-6 when known', () => {
    const dest = (prd: string, msh = MSH_REF, tables?: V2Tables): V2Reading => read(message(msh, RF1, prd, PID), tables);
    expect(dest('PRD|RT||||||ESC^L').referral.destination).toBe('example-sarcoma-centre');
    expect(dest('PRD|RT|||||||||example haematology centre').referral.destination).toBe('example-haematology-centre');
    const unknown = dest('PRD|RT|||||||||Somewhere Else Clinic');
    expect([unknown.referral.destination, unknown.issues.map((i) => [i.severity, i.expression])]).toEqual(['sandbox', [['warning', 'PRD^1^10']]]);
    const routed = dest('PRD|RT|||||||||Somewhere Else Clinic', MSH_REF, tablesWith({ destinations: { ...table<object>('destinations'), unmatched: null } }));
    expect(routed.referral).not.toHaveProperty('destination');
    expect(dest('PRD|RP|Iyer^Meera', MSH_REF.replace('|RG|RG|', '|RG|ECC^1.2.3^ISO|')).referral.destination).toBe('example-cancer-centre');
    expect(dest('PRD|RP|Iyer^Meera').referral).not.toHaveProperty('destination');
  });

  test('the referrer falls back to PV1-8 (XCN) and the organization to MSH-4, whose name the schema then asks for', () => {
    const reading = read(message(MSH_REF, RF1, PID, 'PV1|1|O||||||1558444216^Okafor^Daniel^^^Dr^^^&2.16.840.1.113883.4.6&ISO'));
    expect(reading.referral.referrer).toEqual({
      practitioner: {
        identifier: { system: 'http://hl7.org/fhir/sid/us-npi', value: '1558444216' },
        name: { family: 'Okafor', given: ['Daniel'], prefix: ['Dr'] },
      },
      organization: { identifier: { system: 'urn:oid:2.16.840.1.113883.19.6', value: 'CITY-HOSP' } },
    });
    expect(locatedIssues(reading)).toMatchObject({ 'referrer.organization.name': 'MSH^1^4' });
  });
});

describe('HL7 v2 mapping tables (mappings/hl7v2.json)', () => {
  test('load, say where each table comes from, and use only well-formed SNOMED codes', () => {
    expect(() => loadV2Tables()).not.toThrow();
    for (const [name, value] of Object.entries(TABLES_JSON)) {
      if (name === '_source') continue;
      expect(`${name}: ${typeof (value as { sources?: unknown }).sources}`).toBe(`${name}: string`);
    }
    const snomed = [...JSON.stringify(TABLES_JSON).matchAll(/http:\/\/snomed\.info\/sct\|(\d+)/g)].map((m) => m[1]);
    expect(snomed.length).toBeGreaterThan(8);
    for (const code of snomed) expect(`${code}:${isSnomedConceptId(code)}`).toBe(`${code}:true`);
  });

  test('a broken table is refused naming the field', () => {
    expect(() => tablesWith({ sex: { sources: 'HL7 table 0001 to gender', map: { M: 'man' } } })).toThrow(/sex\.map\.M/);
    expect(() => tablesWith({ destinations: { ...table<object>('destinations'), unmatched: 'Not An Id' } })).toThrow(/destinations\.unmatched/);
  });
});

describe('HL7 v2 reader under mutation', () => {
  const fixtures = readdirSync(V2_DIR).map((f) => text(f));
  const alphabet = [
    '|',
    '^',
    '~',
    '\\',
    '&',
    '""',
    '\\X',
    '\\.br\\',
    '\\F\\',
    'A',
    'Z',
    '0',
    '9',
    '-',
    ' ',
    '.',
    'é',
    '\u0000',
    'ED',
    'RP',
    'TX',
    'CWE',
    'RT',
    'RP',
    'NW',
    'CA',
    'A',
  ];
  const names = ['PID', 'PRD', 'OBX', 'OBR', 'ORC', 'RF1', 'DG1', 'CON', 'NTE', 'TQ1', 'PV1', 'ZZZ', 'MSH', 'X', ''];

  function mutate(source: string, random: () => number): string {
    const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)];
    const segments = source.split(/\r\n|\r|\n/).filter((s) => s !== '');
    const rounds = 1 + Math.floor(random() * 4);
    for (let round = 0; round < rounds; round++) {
      const at = 1 + Math.floor(random() * Math.max(1, segments.length - 1));
      const fields = (segments[at] ?? '').split('|');
      const f = 1 + Math.floor(random() * Math.max(1, fields.length - 1));
      switch (Math.floor(random() * 10)) {
        case 0:
          segments.splice(at, 1);
          break;
        case 1:
          segments.splice(at, 0, segments[at] ?? 'PID|1');
          break;
        case 2:
          fields.splice(f, 1);
          segments[at] = fields.join('|');
          break;
        case 3:
          fields.splice(f, 0, fields[f] ?? '');
          segments[at] = fields.join('|');
          break;
        case 4:
          fields[f] = Array.from({ length: Math.floor(random() * 12) }, () => pick(alphabet)).join('');
          segments[at] = fields.join('|');
          break;
        case 5:
          fields[0] = pick(names);
          segments[at] = fields.join('|');
          break;
        case 6:
          segments[at] = (segments[at] ?? '').slice(0, Math.floor(random() * (segments[at] ?? '').length));
          break;
        case 7:
          fields[f] = `${fields[f] ?? ''}${'~'.repeat(1 + Math.floor(random() * 3))}${pick(alphabet)}^^^${pick(alphabet)}`;
          segments[at] = fields.join('|');
          break;
        case 8: {
          // Garble the header too (but keep it an MSH, or @medplum/core refuses to parse the message at all).
          const msh = segments[0].split('|');
          msh[2 + Math.floor(random() * 10)] = pick(alphabet) + pick(alphabet);
          segments[0] = msh.join('|');
          break;
        }
        default: {
          const j = Math.floor(random() * segments.length);
          if (j > 0) [segments[at], segments[j]] = [segments[j], segments[at]];
        }
      }
    }
    return segments.join(pick(['\r', '\r\n', '\n']));
  }

  test('600 seeded mutations of the fixtures: readV2Referral never throws nor fails inside, and every schema issue is located', () => {
    const random = prng(20261206);
    let runs = 0;
    for (let i = 0; runs < 600 && i < 5000; i++) {
      const mutated = mutate(fixtures[i % fixtures.length], random);
      let parsed: Hl7Message;
      try {
        parsed = Hl7Message.parse(mutated);
      } catch {
        continue; // not a message @medplum/core can parse: the caller refuses it before reading
      }
      runs++;
      let reading: V2Reading | undefined;
      expect(() => {
        reading = readV2Referral(parsed);
      }).not.toThrow();
      if (!reading) continue;
      expect(reading.issues.filter((issue) => issue.code === 'exception')).toEqual([]);
      expect(['new', 'modify', 'cancel']).toContain(reading.action);
      const result = referralSchema.safeParse(reading.referral);
      for (const issue of result.success ? [] : result.error.issues) {
        expect(reading.locate(pathToExpression(issue.path))).toMatch(/^[A-Z0-9]{3}(\^\d+){1,4}$/);
      }
    }
    expect(runs).toBe(600);
  });
});
