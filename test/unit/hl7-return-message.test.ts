import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Hl7Message } from '@medplum/core';
import { buildAck, decodeHl7Text, defaultV2Tables, parseV2, readV2Referral, v2Submission } from '../../src/intake';
import { bookingCode, controlId, defaultStatusTables, loadStatusTables, readAck, statusMessages, type StatusMessageInput } from '../../src/hl7return';
import { referralSchema, referralStatuses, type Referral, type ReferralStatus } from '../../src/model';
import type { Hl7Origin } from '../../src/store';

// The status messages sent back to HL7 v2 senders (src/hl7return/message.ts) and how their acknowledgements are read.

const CHANGE_ID = 'h7_01KC2Z4J8Q9R0S1T2V3W4X5Y6Z';

/** A fixture message read as the intake reads it: the referral and where it came from. */
function intake(name: string): { origin: Hl7Origin; referral: Referral } {
  const parsed = parseV2(readFileSync(`fixtures/hl7v2/${name}.hl7`, 'utf8'));
  if (!parsed.ok) throw new Error(parsed.text);
  const submission = v2Submission(parsed);
  const read = submission.read();
  if (!read.ok || !submission.origin) throw new Error(`fixture ${name} does not read`);
  return { origin: { ...submission.origin, channel: { host: '127.0.0.1', port: 2576 } }, referral: read.referral };
}

function build(name: string, status: ReferralStatus, more: Partial<StatusMessageInput> & { reason?: string | null } = {}) {
  const { origin, referral } = intake(name);
  return statusMessages({
    origin,
    referral: { id: 'ref_01KC2Z00000000000000000000', externalId: referral.externalId, payload: referral },
    change: { id: CHANGE_ID, status, reason: more.reason ?? null, at: '2026-10-01T10:00:00.000Z' },
    tables: defaultStatusTables(),
    v2Tables: defaultV2Tables(),
    now: new Date('2026-10-01T10:00:05.000Z'),
    ...more,
  });
}

/** The segments of a message, each split into its fields (field n at index n; for MSH, index n is MSH-(n+1)). */
const segments = (text: string, name: string): string[][] =>
  text
    .split('\r')
    .filter((s) => s.startsWith(`${name}|`))
    .map((s) => s.split('|'));
const one = (text: string, name: string): string[] => segments(text, name)[0] ?? [];

describe('RRI^I12 to a REF^I12 sender', () => {
  test('the header answers the sender in its version; RF1 carries table 0283 and the exact status; RF1-6 echoes its id', () => {
    const [m] = build('ref-i12-breast-epic', 'accepted');
    expect(m.type).toBe('RRI^I12');
    expect(m.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'RF1', 'PRD', 'PID']);
    const msh = one(m.text, 'MSH');
    // MSH-3..6: the sender's MSH-5/6 as ours, its MSH-3/4 as the receiver; MSH-9, MSH-10, MSH-12 (the sender's 2.7.1).
    expect(msh.slice(2, 6)).toEqual(['REFERRAL-GATEWAY', 'RG', 'EPIC', 'CITY-HOSP^2.16.840.1.113883.19.6^ISO']);
    expect([msh[8], msh[9], msh[11]]).toEqual(['RRI^I12^RRI_I12', m.controlId, '2.7.1']);
    expect(msh[6]).toBe('20261001100005+0000');
    const rf1 = one(m.text, 'RF1');
    expect(rf1[1]).toBe('A^Accepted^HL70283^accepted^Accepted^L');
    expect(rf1[6]).toBe('EHR-2026-000123^CITY-HOSP');
    expect(rf1[7]).toBe('20261001100000+0000');
    expect(rf1[11]).toBe('ref_01KC2Z00000000000000000000');
    expect(one(m.text, 'PRD').slice(0, 3)).toEqual(['PRD', 'RP^Referring Provider^HL70286', 'Iyer^Meera']);
    expect(one(m.text, 'PRD')[7]).toBe('1234567893^NPI');
    // No MSA: an unsolicited message, not an acknowledgement.
    expect(segments(m.text, 'MSA')).toEqual([]);
  });

  test.each([
    ['sent', 'P^Pending'],
    ['received', 'P^Pending'],
    ['in-progress', 'A^Accepted'],
    ['on-hold', 'A^Accepted'],
    ['completed', 'A^Accepted'],
    ['rejected', 'R^Rejected'],
    ['cancelled', 'E^Expired'],
    ['failed', 'E^Expired'],
    ['delivery-failed', 'P^Pending'],
  ] as const)('%s is RF1-1 %s, with the status itself as the local alternate code', (status, code) => {
    const [m] = build('ref-i12-breast-epic', status);
    expect(one(m.text, 'RF1')[1]).toMatch(new RegExp(`^${code.replace('^', '\\^')}\\^HL70283\\^${status}\\^[A-Z][a-z ]+\\^L$`));
  });

  test('PID is the stored patient, and reads back through our own intake as the same patient', () => {
    const { referral } = intake('ref-i12-breast-epic');
    const [m] = build('ref-i12-breast-epic', 'sent');
    const pid = one(m.text, 'PID');
    expect(pid.slice(0, 9)).toEqual(['PID', '1', '', 'MRN-0042^^^&2.16.840.1.113883.19.5&ISO', '', 'Rao^Asha', '', '19680412', 'F']);
    // Back through the REF^I12 reader: identifiers, name, birth date and gender are what was stored.
    const asReferral = m.text.replace('RRI^I12^RRI_I12', 'REF^I12^REF_I12');
    const again = readV2Referral(Hl7Message.parse(asReferral)).referral.patient as Referral['patient'];
    expect(again.identifiers).toEqual(referral.patient.identifiers);
    expect([again.name, again.birthDate, again.gender]).toEqual([referral.patient.name, referral.patient.birthDate, referral.patient.gender]);
  });

  test('identifiers from the intake tables go back as their OIDs, with the namespace the table knows', () => {
    const { origin, referral } = intake('ref-i12-lung-repetitions');
    const [m] = statusMessages({
      origin,
      referral: { id: 'ref_x', externalId: referral.externalId, payload: referral },
      change: { id: CHANGE_ID, status: 'sent', reason: null, at: '2026-10-01T10:00:00.000Z' },
      tables: defaultStatusTables(),
      v2Tables: defaultV2Tables(),
    });
    const ids = one(m.text, 'PID')[3].split('~');
    expect(ids).toContain('9434765919^^^NHS&2.16.840.1.113883.2.1.4.1&ISO');
  });

  test('the reason is an NTE, its delimiters escaped and its line breaks kept; control characters never reach the frame', () => {
    const reason = 'Outside our remit | see ^notes^ & ~tilde~ \\path\\\nSecond line\x0b\x1c';
    const [m] = build('ref-i12-breast-epic', 'rejected', { reason });
    const nte = one(m.text, 'NTE');
    expect(nte.length).toBe(5);
    expect(nte.slice(1, 3)).toEqual(['1', 'L']);
    expect(nte[3]).toBe('Outside our remit \\F\\ see \\S\\notes\\S\\ \\T\\ \\R\\tilde\\R\\ \\E\\path\\E\\\\.br\\Second line');
    expect(decodeHl7Text(nte[3])).toBe('Outside our remit | see ^notes^ & ~tilde~ \\path\\\nSecond line');
    for (const c of ['\x0b', '\x1c', '\n']) expect(m.text.includes(c)).toBe(false);
    // The message still parses into the same segments: nothing in the reason split a field or a segment.
    expect(Hl7Message.parse(m.text).segments.map((s) => s.name)).toEqual(['MSH', 'RF1', 'PRD', 'PID', 'NTE']);
  });

  test('completed with a report: OBR and an OBX ED with the report base64-encoded in its content type, bytes intact', () => {
    const body = Buffer.from(Array.from({ length: 512 }, (_, i) => i % 256));
    const [m] = build('ref-i12-breast-epic', 'completed', { report: { contentType: 'application/pdf', body }, reason: 'Opinion attached' });
    expect(m.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'RF1', 'PRD', 'PID', 'OBR', 'OBX', 'NTE']);
    const obr = one(m.text, 'OBR');
    expect([obr[2], obr[4], obr[25]]).toEqual(['EHR-2026-000123^CITY-HOSP', '11488-4^Consult note^LN', 'F']);
    const obx = one(m.text, 'OBX');
    expect([obx[2], obx[3], obx[11]]).toEqual(['ED', '11488-4^Consult note^LN', 'F']);
    const ed = obx[5].split('^');
    expect(ed.slice(0, 4)).toEqual(['', 'application', 'pdf', 'Base64']);
    expect(Buffer.from(ed[4], 'base64').equals(body)).toBe(true);
  });

  test('a text report keeps its MIME type without parameters', () => {
    const [m] = build('ref-i12-breast-epic', 'completed', { report: { contentType: 'text/plain; charset=utf-8', body: Buffer.from('Ω | ^ ~ & \\ ✓') } });
    const ed = one(m.text, 'OBX')[5].split('^');
    expect(ed.slice(1, 4)).toEqual(['text', 'plain', 'Base64']);
    expect(Buffer.from(ed[4], 'base64').toString('utf8')).toBe('Ω | ^ ~ & \\ ✓');
  });
});

describe('OSU^O51 to an OMG^O19 (360X) sender', () => {
  test('PID then ORC: SC, the placer order number as sent, table 0038 status, the exact status and reason in ORC-16', () => {
    const [m] = build('omg-o19-new-360x', 'accepted', { reason: 'Accepted by the board' });
    expect(m.type).toBe('OSU^O51');
    expect(m.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'PID', 'ORC']);
    const msh = one(m.text, 'MSH');
    expect(msh.slice(2, 6)).toEqual(['RG', 'RG', 'NH-EHR', 'NORTH-HILLS^2.16.840.1.113883.19.7^ISO']);
    expect([msh[8], msh[11]]).toEqual(['OSU^O51^OSU_O51', '2.5.1']);
    const orc = one(m.text, 'ORC');
    expect(orc.slice(1, 6)).toEqual(['SC', 'NHC-2026-4410^NH-EHR', 'ref_01KC2Z00000000000000000000', '', 'SC']);
    expect(orc[9]).toBe('20261001100000+0000');
    expect(orc[12]).toBe('1558444216^Okafor^Daniel^^^^^^NPI&2.16.840.1.113883.4.6&ISO');
    expect(orc[16]).toBe('accepted^Accepted by the board^L');
  });

  test.each([
    ['sent', 'IP'],
    ['received', 'IP'],
    ['accepted', 'SC'],
    ['in-progress', 'IP'],
    ['on-hold', 'HD'],
    ['completed', 'CM'],
    ['rejected', 'CA'],
    ['cancelled', 'CA'],
    ['failed', 'DC'],
    ['delivery-failed', 'HD'],
  ] as const)('%s is ORC-5 %s; without a reason ORC-16 names the status', (status, code) => {
    const [m] = build('omg-o19-new-360x', status);
    const orc = one(m.text, 'ORC');
    expect(orc[5]).toBe(code);
    expect(orc[16]).toMatch(new RegExp(`^${status}\\^[A-Z][a-z ]+\\^L$`));
  });

  test('completed with a report: the OSU^O51 (CM), then an ORU^R01 with the report (OSU_O51 has no place for it)', () => {
    const body = Buffer.from('%PDF-1.7 second opinion\x00\x0b\x1c\xff');
    const messages = build('omg-o19-new-360x', 'completed', { report: { contentType: 'application/pdf', body } });
    expect(messages.map((m) => m.type)).toEqual(['OSU^O51', 'ORU^R01']);
    const [osu, oru] = messages;
    expect(osu.text).not.toContain('OBX');
    expect(oru.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'PID', 'ORC', 'OBR', 'OBX']);
    expect(one(oru.text, 'MSH')[8]).toBe('ORU^R01^ORU_R01');
    expect(one(oru.text, 'ORC').slice(1, 6)).toEqual(['RE', 'NHC-2026-4410^NH-EHR', 'ref_01KC2Z00000000000000000000', '', 'CM']);
    const ed = one(oru.text, 'OBX')[5].split('^');
    expect(Buffer.from(ed[4], 'base64').equals(body)).toBe(true);
    expect(new Set([osu.controlId, oru.controlId]).size).toBe(2);
  });
});

describe('SIU^S12 to an OMG^O19 (360X) sender when the centre books the board', () => {
  const booking = (appointmentStart: string | null, code = '5.1.1') => ({
    change: { id: CHANGE_ID, status: 'accepted' as const, reason: code, at: '2026-10-01T10:00:00.000Z', message: 'appointment' as const, appointmentStart },
  });

  test('MSH, SCH, TQ1, PID, RGS, AIS: the booking, the placer order number as sent, the start in SCH-11, TQ1-7 and AIS-4', () => {
    const messages = build('omg-o19-new-360x', 'accepted', booking('2026-10-14T09:30:00+02:00'));
    expect(messages.map((m) => m.type)).toEqual(['SIU^S12']);
    const [m] = messages;
    expect(m.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'SCH', 'TQ1', 'PID', 'RGS', 'AIS']);
    expect(m.controlId).toBe(controlId(CHANGE_ID, 1));
    const msh = one(m.text, 'MSH');
    expect([msh[4], msh[5], msh[8], msh[9], msh[11]]).toEqual(['NH-EHR', 'NORTH-HILLS^2.16.840.1.113883.19.7^ISO', 'SIU^S12^SIU_S12', m.controlId, '2.5.1']);
    const sch = one(m.text, 'SCH');
    expect(sch[1]).toBe(''); // no placer appointment id: the sender asked for an opinion, not an appointment
    expect(sch[2]).toBe(CHANGE_ID); // filler appointment id: the booking's, the same on a resend
    expect(sch[6]).toBe('5.1.1^Event Scheduled^L');
    expect(sch[11]).toBe('^^^20261014073000+0000');
    expect(sch[25]).toBe('Booked^Booked^HL70278');
    expect(sch[26]).toBe('NHC-2026-4410^NH-EHR'); // the placer order number (ORC-2 of the OMG^O19)
    expect(sch[27]).toBe('ref_01KC2Z00000000000000000000');
    expect(one(m.text, 'TQ1')).toEqual(['TQ1', '1', '', '', '', '', '', '20261014073000+0000']);
    expect(one(m.text, 'PID')[3]).toBe('PT-300912^^^&1.2.36.146.595.217.0.1&ISO');
    expect(one(m.text, 'RGS')).toEqual(['RGS', '1', 'A']);
    expect(one(m.text, 'AIS')).toEqual(['AIS', '1', 'A', expect.stringMatching(/^[a-z-]+\^[A-Z][a-z ]+\^L$/), '20261014073000+0000']);
    expect(Hl7Message.parse(m.text).segments.map((s) => s.name)).toEqual(['MSH', 'SCH', 'TQ1', 'PID', 'RGS', 'AIS']);
  });

  test('AIS-3 is the referral kind (the tumour board, a second opinion)', () => {
    const { origin, referral } = intake('omg-o19-new-360x');
    const [m] = statusMessages({
      origin,
      referral: { id: 'ref_x', externalId: referral.externalId, payload: { ...referral, kind: 'tumour-board-review' } },
      ...booking(null),
      tables: defaultStatusTables(),
      v2Tables: defaultV2Tables(),
    });
    expect(one(m.text, 'AIS')).toEqual(['AIS', '1', 'A', 'tumour-board-review^Tumour board review^L']);
  });

  test('no start: SCH-11 and AIS-4 empty, no TQ1; a date only stays a date', () => {
    const [none] = build('omg-o19-new-360x', 'accepted', booking(null, 'visit-scheduled'));
    expect(none.text.split('\r').map((s) => s.slice(0, 3))).toEqual(['MSH', 'SCH', 'PID', 'RGS', 'AIS']);
    expect(one(none.text, 'SCH')[11]).toBe('');
    expect(one(none.text, 'SCH')[6]).toBe('visit-scheduled^Visit scheduled^L');
    expect(one(none.text, 'AIS')).toHaveLength(4);
    const [date] = build('omg-o19-new-360x', 'accepted', booking('2026-10-14'));
    expect([one(date.text, 'SCH')[11], one(date.text, 'TQ1')[7], one(date.text, 'AIS')[4]]).toEqual(['^^^20261014', '20261014', '20261014']);
  });

  test('the version decides where the time goes: SCH-11 only before 2.5, TQ1 only from 2.7 (SCH-11 withdrawn)', () => {
    const { origin, referral } = intake('omg-o19-new-360x');
    const at = (version: string) =>
      statusMessages({
        origin: { ...origin, version },
        referral: { id: 'ref_x', externalId: referral.externalId, payload: referral },
        ...booking('2026-10-14T07:30:00Z'),
        tables: defaultStatusTables(),
        v2Tables: defaultV2Tables(),
      })[0].text;
    expect([one(at('2.4'), 'SCH')[11], one(at('2.4'), 'TQ1')]).toEqual(['^^^20261014073000+0000', []]);
    expect([one(at('2.7.1'), 'SCH')[11], one(at('2.7.1'), 'TQ1')[7]]).toEqual(['', '20261014073000+0000']);
  });

  test('what the centre and the sender wrote is escaped: the business status code and the placer order number', () => {
    const { origin, referral } = intake('omg-o19-new-360x');
    const [m] = statusMessages({
      origin: { ...origin, referralIdentifier: 'NHC\\F\\1^NH-EHR' },
      referral: { id: 'ref_x', externalId: referral.externalId, payload: referral },
      ...booking(null, 'odd|code^x&y~z\\'),
      tables: defaultStatusTables(),
      v2Tables: defaultV2Tables(),
    });
    const sch = one(m.text, 'SCH');
    expect(sch[6]).toBe('odd\\F\\code\\S\\x\\T\\y\\R\\z\\E\\^odd\\F\\code\\S\\x\\T\\y\\R\\z\\E\\^L');
    expect(decodeHl7Text(sch[6].split('^')[0])).toBe('odd|code^x&y~z\\');
    expect(sch[26]).toBe('NHC\\F\\1^NH-EHR'); // as the sender sent it, already ER7
    expect(Hl7Message.parse(m.text).segments.map((s) => s.name)).toEqual(['MSH', 'SCH', 'PID', 'RGS', 'AIS']);
  });

  test('a REF^I12 sender is never sent one (its family has no appointment message)', () => {
    expect(build('ref-i12-breast-epic', 'accepted', booking('2026-10-14T07:30:00Z'))).toEqual([]);
  });

  test('the booking codes: BSeR 5.1.1 in its system, visit-scheduled in any; other codes and systems are not bookings', () => {
    const t = defaultStatusTables();
    const bser = 'http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS';
    expect(bookingCode(t, [{ system: bser, code: '5.1.1' }])?.display).toBe('Event Scheduled');
    expect(bookingCode(t, [{ code: 'other' }, { system: 'http://example.org/cow', code: 'visit-scheduled' }])?.code).toBe('visit-scheduled');
    expect(bookingCode(t, [{ system: 'http://example.org/other', code: '5.1.1' }])).toBeUndefined();
    expect(bookingCode(t, [{ system: bser, code: '5.1.2' }])).toBeUndefined();
  });
});

describe('control ids', () => {
  test('at most 20 characters, stable for a change, different per message and per change', () => {
    expect(controlId(CHANGE_ID, 1)).toHaveLength(20);
    expect(controlId(CHANGE_ID, 1)).toBe(controlId(CHANGE_ID, 1));
    expect(controlId(CHANGE_ID, 1)).not.toBe(controlId(CHANGE_ID, 2));
    expect(controlId('h7_01KC2Z4J8Q9R0S1T2V3W4X5Y70', 1)).not.toBe(controlId(CHANGE_ID, 1));
    const [m] = build('ref-i12-breast-epic', 'sent');
    expect(m.controlId).toBe(controlId(CHANGE_ID, 1));
  });
});

describe('reading the acknowledgement', () => {
  const [sent] = build('ref-i12-breast-epic', 'accepted');
  const parsed = Hl7Message.parse(sent.text);
  const reply = (ack: string): Buffer => Buffer.from(ack, 'utf8');

  test('AA and CA: accepted', () => {
    expect(readAck(reply(buildAck(parsed, 'AA')), sent.controlId)).toEqual({ kind: 'accepted', code: 'AA' });
    const ca = buildAck(parsed, 'AA').replace('MSA|AA', 'MSA|CA');
    expect(readAck(reply(ca), sent.controlId)).toEqual({ kind: 'accepted', code: 'CA' });
  });

  test('AE: an error, with the ERR text (decoded) and where', () => {
    const ae = buildAck(parsed, 'AE', [{ code: '204^Unknown key identifier^HL70357', location: 'RF1^1^6', text: 'no referral EHR-2026-000123 | here' }]);
    const v = readAck(reply(ae), sent.controlId);
    expect(v).toMatchObject({ kind: 'error', code: 'AE' });
    expect(v.kind === 'error' && v.reason).toMatch(/^AE: RF1\^1\^6: no referral EHR-2026-000123 \| here(; |$)/);
  });

  test('a v2.3 ERR-1 (segment^sequence^field^code&text) is read too', () => {
    const ae = `MSH|^~\\&|R|R|G|G|20261001||ACK|A1|P|2.3\rMSA|AE|${sent.controlId}\rERR|PID^1^3^204&Unknown patient&HL70357`;
    const v = readAck(reply(ae), sent.controlId);
    expect(v.kind === 'error' && v.reason).toBe('AE: Unknown patient');
  });

  test('AR, CR, no MSA, another control id, garbage: retried', () => {
    expect(readAck(reply(buildAck(parsed, 'AR')), sent.controlId)).toMatchObject({ kind: 'retry', code: 'AR' });
    expect(readAck(reply(buildAck(parsed, 'AA').replace('MSA|AA', 'MSA|CR')), sent.controlId)).toMatchObject({ kind: 'retry', code: 'CR' });
    expect(readAck(reply('MSH|^~\\&|R|R|G|G|20261001||ACK|A1|P|2.5.1'), sent.controlId)).toMatchObject({
      kind: 'retry',
      reason: 'the answer has no MSA segment',
    });
    expect(readAck(reply(buildAck(parsed, 'AA')), 'SOMETHING-ELSE')).toMatchObject({ kind: 'retry', reason: expect.stringMatching(/acknowledges control id/) });
    expect(readAck(reply('HTTP/1.1 400 Bad Request'), sent.controlId)).toMatchObject({ kind: 'retry' });
    expect(readAck(reply(buildAck(parsed, 'AA').replace('MSA|AA', 'MSA|ZZ')), sent.controlId)).toMatchObject({ kind: 'retry' });
  });
});

describe('status tables (mappings/hl7v2-status.json)', () => {
  test('every gateway status has a table 0283 and a table 0038 code', () => {
    const t = defaultStatusTables();
    for (const s of referralStatuses) {
      expect(['A', 'E', 'P', 'R']).toContain(t.referralStatus.map[s]);
      expect(t.orderStatus.map[s]).toMatch(/^(A|CA|CM|DC|ER|HD|IP|RP|SC)$/);
    }
  });

  test('a status missing or a code not in the HL7 table fails naming the field', () => {
    const dir = mkdtempSync(join(tmpdir(), 'hl7-status-'));
    try {
      const json = JSON.parse(readFileSync('mappings/hl7v2-status.json', 'utf8'));
      delete json.referralStatus.map['on-hold'];
      json.orderStatus.map.completed = 'DONE';
      const file = join(dir, 'hl7v2-status.json');
      writeFileSync(file, JSON.stringify(json));
      expect(() => loadStatusTables(file)).toThrow(
        /referralStatus\.map\.on-hold.*orderStatus\.map\.completed|orderStatus\.map\.completed.*referralStatus\.map\.on-hold/
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the referral the fixtures read is a valid referral (the messages are built from what the schema took)', () => {
    expect(referralSchema.safeParse(intake('omg-o19-new-360x').referral).success).toBe(true);
  });
});
