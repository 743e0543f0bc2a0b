import type { Task } from '@medplum/fhirtypes';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { type AddressInfo, createServer, type Server } from 'node:net';
import { Hl7Message } from '@medplum/core';
import type { Gateway } from '../../src/gateway';
import { buildAck, createMllpServer, decodeHl7Text, sendMllp } from '../../src/intake';
import { logger } from '../../src/observability/logger';
import { changeStatus, getReferral, hl7ReturnQueue, leasedQueue, listReferrals, referralHistory } from '../../src/store';
import { acceptAndComplete } from '../helpers/centre';
import { ADMIN_KEY, eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { LogCapture } from '../helpers/log-capture';

/**
 * Status back to HL7 v2 senders: a referral that came in as HL7 v2 sends each status change back over MLLP to its
 * client's receiver (HL7_RETURN_CHANNELS), in the sender's family: RRI^I12 to a REF^I12 sender, OSU^O51 (and ORU^R01
 * with the report) to a 360X OMG^O19 sender. The receiver's AE dead-letters the message; a receiver that is down is
 * retried, then dead-lettered; the operator sees both and re-queues them.
 */

const KEY_C = 'key-down-clinic-0004';
const message = (name: string): string => readFileSync(`fixtures/hl7v2/${name}.hl7`, 'utf8');
const fields = (text: string, name: string): string[] => (text.split('\r').find((s) => s.startsWith(`${name}|`)) ?? '').split('|');
const names = (text: string): string[] => text.split('\r').map((s) => s.slice(0, 3));

/** An MLLP receiver (the referrer's interface engine): keeps every message and answers as `answer` says. */
interface Receiver {
  port: number;
  messages: string[];
  answer: 'AA' | 'AE';
  close(): Promise<void>;
}

async function receiver(answer: 'AA' | 'AE', port = 0): Promise<Receiver> {
  const r = { messages: [] as string[], answer, port: 0 } as Receiver;
  const server = createMllpServer({
    maxMessageBytes: 32 * 1024 * 1024,
    onMessage: async (bytes) => {
      const text = bytes.toString('utf8');
      r.messages.push(text);
      const parsed = Hl7Message.parse(text);
      return r.answer === 'AA'
        ? buildAck(parsed, 'AA')
        : buildAck(parsed, 'AE', [{ code: '204^Unknown key identifier^HL70357', location: 'PID^1^3', text: 'patient not found in this EHR' }]);
    },
    onOversize: () => 'MSH|^~\\&|||||||ACK||P|2.5.1\rMSA|AR|',
  });
  server.listen(port, '127.0.0.1');
  await once(server, 'listening');
  r.port = (server.address() as AddressInfo).port;
  r.close = () => new Promise<void>((resolve) => server.close(() => resolve()));
  return r;
}

/** A port nothing listens on (taken, then given back). */
async function freePort(): Promise<number> {
  const s: Server = createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

/** RF1-1's alternate code (the gateway's status) of each RRI^I12, ORC-16's code of each OSU^O51. */
const statusOf = (text: string): string => {
  const type = fields(text, 'MSH')[8];
  if (type.startsWith('RRI')) return fields(text, 'RF1')[1].split('^')[3];
  if (type.startsWith('OSU')) return fields(text, 'ORC')[16].split('^')[0];
  return type;
};

describe('HL7 v2 status back', () => {
  let gw: Gateway;
  let ehr: Receiver;
  let refusing: Receiver;
  let downPort: number;
  const capture = new LogCapture({ level: 'silly' });

  beforeAll(async () => {
    ehr = await receiver('AA');
    refusing = await receiver('AE');
    downPort = await freePort();
    gw = await startGateway(
      {
        API_KEYS: `city-hospital:${KEY_A},other-clinic:${KEY_B},down-clinic:${KEY_C}`,
        HL7_MLLP_PORT: '0',
        HL7_MLLP_SENDERS: 'NORTH-HILLS:city-hospital',
        HL7_RETURN_CHANNELS: `city-hospital=127.0.0.1:${ehr.port},other-clinic=127.0.0.1:${refusing.port},down-clinic=127.0.0.1:${downPort}`,
      },
      { hl7Return: { maxAttempts: 3, baseDelayMs: 20, maxDelayMs: 50, idleMs: 50, timeoutMs: 2000 } }
    );
    logger.level = 'silly';
    logger.add(capture);
    for (const t of logger.transports) if (t !== capture) t.silent = true;
  });
  afterAll(async () => {
    for (const t of logger.transports) t.silent = false;
    logger.remove(capture);
    logger.level = 'error';
    await gw.stop();
    await Promise.all([ehr.close(), refusing.close()]);
  });

  const post = async (text: string, key: string): Promise<string> => {
    const res = await fetch(`${gw.url}/hl7/v2`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'x-application/hl7-v2+er7' },
      body: text,
    });
    const ack = await res.text();
    expect(fields(ack, 'MSA')[1]).toBe('AA');
    return /(ref_[0-9A-Z]+)/.exec(ack)?.[1] as string;
  };
  const admin = async (path: string, method = 'GET'): Promise<{ status: number; body: any }> => {
    const res = await fetch(`${gw.url}/admin${path}`, { method, headers: { Authorization: `Bearer ${ADMIN_KEY}` } });
    return { status: res.status, body: await res.json() };
  };
  /** The messages a receiver got for one referral (RF1-11 or ORC-3 names it). */
  const forReferral = (r: Receiver, id: string): string[] => r.messages.filter((m) => m.includes(`|${id}`));

  test('REF^I12 in over HTTP: RRI^I12 back for sent, accepted and completed, the last with the report as OBX ED, bytes intact', async () => {
    const id = await post(message('ref-i12-breast-epic'), KEY_A);
    await eventually(async () => forReferral(ehr, id).length >= 1, 20_000);
    const report = 'Board opinion: | ^ ~ & \\ are not delimiters here. Ω ✓\nSecond line.';
    await acceptAndComplete(gw, id, report);
    await eventually(async () => forReferral(ehr, id).length >= 3, 20_000);
    const got = forReferral(ehr, id);
    expect(got.map(statusOf)).toEqual(['sent', 'accepted', 'completed']);
    expect(got.map((m) => fields(m, 'RF1')[1].split('^')[0])).toEqual(['P', 'A', 'A']);
    for (const m of got) {
      const msh = fields(m, 'MSH');
      // Addressed back to the sender (its MSH-3/4 as MSH-5/6), in its version; RF1-6 is its own referral id.
      expect([msh[4], msh[5], msh[8], msh[11]]).toEqual(['EPIC', 'CITY-HOSP^2.16.840.1.113883.19.6^ISO', 'RRI^I12^RRI_I12', '2.7.1']);
      expect(fields(m, 'RF1')[6]).toBe('EHR-2026-000123^CITY-HOSP');
      expect(fields(m, 'PID')[3]).toBe('MRN-0042^^^&2.16.840.1.113883.19.5&ISO');
    }
    const completed = got[2];
    expect(names(completed)).toEqual(['MSH', 'RF1', 'PRD', 'PID', 'OBR', 'OBX']);
    const ed = fields(completed, 'OBX')[5].split('^');
    expect(ed.slice(1, 4)).toEqual(['text', 'plain', 'Base64']);
    expect(Buffer.from(ed[4], 'base64').equals(Buffer.from(report, 'utf8'))).toBe(true);
    // Each change acknowledged once, in order; no note that the report was left out.
    const rows = await leasedQueue.forReferral(gw.db, hl7ReturnQueue, id);
    expect(rows.map((r) => [r.status, r.state, r.attempts, r.family])).toEqual([
      ['sent', 'acknowledged', 1, 'REF'],
      ['accepted', 'acknowledged', 1, 'REF'],
      ['completed', 'acknowledged', 1, 'REF'],
    ]);
    expect((await referralHistory(gw.db, id)).some((h) => /without the report/.test(h.reason ?? ''))).toBe(false);
  });

  test('OMG^O19 in over MLLP (360X): OSU^O51 back with the order status, and ORU^R01 with the report when it completes', async () => {
    const ack = (await sendMllp('127.0.0.1', gw.mllp?.port as number, message('omg-o19-new-360x'))).toString('utf8');
    expect(fields(ack, 'MSA')[1]).toBe('AA');
    const id = /(ref_[0-9A-Z]+)/.exec(ack)?.[1] as string;
    await eventually(async () => forReferral(ehr, id).length >= 1, 20_000);
    await acceptAndComplete(gw, id, 'Second opinion for the 360X referral.');
    await eventually(async () => forReferral(ehr, id).length >= 4, 20_000);
    const got = forReferral(ehr, id);
    expect(got.map((m) => fields(m, 'MSH')[8])).toEqual(['OSU^O51^OSU_O51', 'OSU^O51^OSU_O51', 'OSU^O51^OSU_O51', 'ORU^R01^ORU_R01']);
    expect(got.slice(0, 3).map((m) => [statusOf(m), fields(m, 'ORC')[1], fields(m, 'ORC')[5]])).toEqual([
      ['sent', 'SC', 'IP'],
      ['accepted', 'SC', 'SC'],
      ['completed', 'SC', 'CM'],
    ]);
    for (const m of got) {
      expect(fields(m, 'MSH').slice(4, 6)).toEqual(['NH-EHR', 'NORTH-HILLS^2.16.840.1.113883.19.7^ISO']);
      expect(fields(m, 'ORC')[2]).toBe('NHC-2026-4410^NH-EHR');
    }
    const oru = got[3];
    expect(names(oru)).toEqual(['MSH', 'PID', 'ORC', 'OBR', 'OBX']);
    expect(Buffer.from(fields(oru, 'OBX')[5].split('^')[4], 'base64').toString('utf8')).toBe('Second opinion for the 360X referral.');
  });

  /** Plays the centre: waits until the referral is at the centre, then puts each Task change in turn, polling after each. */
  const centreTask = async (id: string, ...changes: Partial<Task>[]): Promise<void> => {
    const sent = await eventually(async () => {
      const r = await getReferral(gw.db, id, { payload: false });
      return r?.status === 'sent' && r.fhir?.task ? r : undefined;
    }, 20_000);
    const url = `${gw.url}/sandbox/fhir/R4/${sent.fhir?.task as string}`;
    let task = (await (await fetch(url)).json()) as Task;
    for (const change of changes) {
      const res = await fetch(url, { method: 'PUT', headers: { 'Content-Type': 'application/fhir+json' }, body: JSON.stringify({ ...task, ...change }) });
      expect(res.status).toBe(200);
      task = (await res.json()) as Task;
      await gw.poller.pollOnce({ force: true });
    }
  };
  const BSER = 'http://hl7.org/fhir/us/bser/CodeSystem/TaskBusinessStatusCS';
  const scheduled = { coding: [{ system: BSER, code: '5.1.1', display: 'Event Scheduled' }], text: 'Board booked' };

  test('OMG^O19: the centre books the board (BSeR 5.1.1): one SIU^S12 with the start, not again for later versions; again when re-booked', async () => {
    const ack = (
      await sendMllp(
        '127.0.0.1',
        gw.mllp?.port as number,
        message('omg-o19-new-360x').replace('NH-88123', 'NH-88124').replaceAll('NHC-2026-4410', 'NHC-2026-4411')
      )
    ).toString('utf8');
    const id = /(ref_[0-9A-Z]+)/.exec(ack)?.[1] as string;
    await centreTask(
      id,
      { status: 'accepted', businessStatus: scheduled, executionPeriod: { start: '2026-10-14T09:30:00+02:00' } },
      // Another version with the same business status (the reason changed): no second booking.
      { status: 'accepted', businessStatus: scheduled, executionPeriod: { start: '2026-10-14T09:30:00+02:00' }, statusReason: { text: 'Slides received' } },
      { status: 'in-progress', businessStatus: scheduled, executionPeriod: { start: '2026-10-14T09:30:00+02:00' } }
    );
    await gw.poller.pollOnce({ force: true });
    await eventually(async () => forReferral(ehr, id).length >= 4, 20_000);
    await gw.hl7Return.idle();
    const got = forReferral(ehr, id);
    expect(got.map((m) => fields(m, 'MSH')[8])).toEqual(['OSU^O51^OSU_O51', 'OSU^O51^OSU_O51', 'SIU^S12^SIU_S12', 'OSU^O51^OSU_O51']);
    expect(got.map(statusOf)).toEqual(['sent', 'accepted', 'SIU^S12^SIU_S12', 'in-progress']);
    const siu = got[2];
    expect(names(siu)).toEqual(['MSH', 'SCH', 'TQ1', 'PID', 'RGS', 'AIS']);
    const sch = fields(siu, 'SCH');
    expect([sch[6], sch[11], sch[25], sch[26], sch[27]]).toEqual([
      '5.1.1^Event Scheduled^L',
      '^^^20261014073000+0000',
      'Booked^Booked^HL70278',
      'NHC-2026-4411^NH-EHR',
      id,
    ]);
    expect(fields(siu, 'TQ1')[7]).toBe('20261014073000+0000');
    expect(fields(siu, 'AIS')[4]).toBe('20261014073000+0000');
    expect(fields(siu, 'MSH').slice(4, 6)).toEqual(['NH-EHR', 'NORTH-HILLS^2.16.840.1.113883.19.7^ISO']);
    const rows = await leasedQueue.forReferral(gw.db, hl7ReturnQueue, id);
    expect(rows.map((r) => [r.message, r.status, r.appointmentStart, r.state])).toEqual([
      ['status', 'sent', null, 'acknowledged'],
      ['status', 'accepted', null, 'acknowledged'],
      ['appointment', 'accepted', '2026-10-14T09:30:00+02:00', 'acknowledged'],
      ['status', 'in-progress', null, 'acknowledged'],
    ]);
    const { body } = await admin('/hl7-status-messages?state=acknowledged&limit=500');
    expect((body.items as any[]).find((e) => e.id === rows[2].id)).toMatchObject({ message: 'appointment', appointmentStart: '2026-10-14T09:30:00+02:00' });

    // The board met (5.1.4), then is booked again with only restriction.period: a new SIU^S12 with that start.
    const restricted = { restriction: { period: { start: '2026-10-21T08:00:00Z' } }, executionPeriod: undefined };
    const task = (await (await fetch(`${gw.url}/sandbox/fhir/R4/${(await getReferral(gw.db, id, { payload: false }))?.fhir?.task as string}`)).json()) as Task;
    await fetch(`${gw.url}/sandbox/fhir/R4/Task/${task.id as string}`, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ ...task, businessStatus: { coding: [{ system: BSER, code: '5.1.4' }] } }),
    });
    await gw.poller.pollOnce({ force: true });
    const again = (await (await fetch(`${gw.url}/sandbox/fhir/R4/Task/${task.id as string}`)).json()) as Task;
    await fetch(`${gw.url}/sandbox/fhir/R4/Task/${task.id as string}`, {
      method: 'PUT',
      headers: { 'Content-Type': 'application/fhir+json' },
      body: JSON.stringify({ ...again, ...restricted, businessStatus: { coding: [{ system: 'urn:example:cow', code: 'visit-scheduled' }] } }),
    });
    await gw.poller.pollOnce({ force: true });
    await eventually(async () => forReferral(ehr, id).length >= 5, 20_000);
    await gw.hl7Return.idle();
    const rebooked = forReferral(ehr, id);
    expect(rebooked).toHaveLength(5);
    expect(fields(rebooked[4], 'SCH')[6]).toBe('visit-scheduled^Visit scheduled^L');
    expect(fields(rebooked[4], 'SCH')[11]).toBe('^^^20261021080000+0000');
    expect(fields(rebooked[4], 'SCH')[2]).not.toBe(sch[2]);
  });

  test('REF^I12: the same booking sends no SIU^S12 (the REF family has no appointment message); RRI^I12 as before', async () => {
    const id = await post(message('ref-i12-breast-epic').replace('EPIC-000123-1', 'EPIC-000124-1').replaceAll('EHR-2026-000123', 'EHR-2026-000124'), KEY_A);
    await centreTask(id, { status: 'accepted', businessStatus: scheduled, executionPeriod: { start: '2026-10-14T09:30:00+02:00' } });
    await eventually(async () => forReferral(ehr, id).length >= 2, 20_000);
    await gw.hl7Return.idle();
    expect(forReferral(ehr, id).map((m) => fields(m, 'MSH')[8])).toEqual(['RRI^I12^RRI_I12', 'RRI^I12^RRI_I12']);
    expect(forReferral(ehr, id).map(statusOf)).toEqual(['sent', 'accepted']);
    const rows = await leasedQueue.forReferral(gw.db, hl7ReturnQueue, id);
    expect(rows.map((r) => r.message)).toEqual(['status', 'status']);
  });

  test('only referrals that came in as HL7 v2 go back: a JSON referral of the same client sends nothing', async () => {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...fixture(), externalId: 'json-no-hl7-return' }),
    });
    expect(res.status).toBe(202);
    const { id } = (await res.json()) as { id: string };
    await eventually(async () => (await getReferral(gw.db, id, { payload: false }))?.status === 'sent', 20_000);
    await gw.hl7Return.idle();
    expect(await leasedQueue.forReferral(gw.db, hl7ReturnQueue, id)).toEqual([]);
    expect(forReferral(ehr, id)).toEqual([]);
  });

  test('a report that cannot be read: the status goes back without it, and the history says so', async () => {
    const id = await post(message('ref-i12-sarcoma-crlf'), KEY_A);
    await eventually(async () => forReferral(ehr, id).length >= 1, 20_000);
    await changeStatus(gw.db, id, {
      status: 'completed',
      report: { reference: 'DocumentReference/no-such-report', url: 'DocumentReference/no-such-report', contentType: 'application/pdf' },
    });
    await eventually(async () => forReferral(ehr, id).length >= 2, 20_000);
    const completed = forReferral(ehr, id)[1];
    expect(statusOf(completed)).toBe('completed');
    expect(names(completed)).toEqual(['MSH', 'RF1', 'PRD', 'PID']);
    await eventually(async () => (await referralHistory(gw.db, id)).find((h) => /HL7 v2 status completed sent back without the report/.test(h.reason ?? '')));
  });

  test('a receiver that answers AE: dead-lettered at once with its error text; the operator sees it and re-queues it', async () => {
    const id = await post(message('ref-i12-sarcoma-crlf'), KEY_B);
    const failed = await eventually(async () => {
      const { body } = await admin('/hl7-status-messages?state=failed');
      return (body.items as any[]).find((e) => e.referralId === id);
    }, 20_000);
    expect(failed).toMatchObject({
      status: 'sent',
      previousStatus: 'queued',
      family: 'REF',
      channel: `127.0.0.1:${refusing.port}`,
      attempts: 1,
      nextAttemptAt: null,
    });
    expect(failed.lastError).toMatch(/^RRI\^I12 refused by the receiver: AE: PID\^1\^3: patient not found in this EHR/);
    expect(forReferral(refusing, id)).toHaveLength(1);

    // The receiver is fixed; the operator replays the message: same control id, acknowledged this time.
    refusing.answer = 'AA';
    const retried = await admin(`/hl7-status-messages/${failed.id}/retry`, 'POST');
    expect(retried).toEqual({ status: 202, body: { requeued: [failed.id] } });
    await eventually(async () => (await leasedQueue.entry(gw.db, hl7ReturnQueue, failed.id))?.state === 'acknowledged', 20_000);
    const [first, again] = forReferral(refusing, id);
    expect(fields(again, 'MSH')[9]).toBe(fields(first, 'MSH')[9]);
    expect((await admin(`/hl7-status-messages/${failed.id}/retry`, 'POST')).status).toBe(404);
  });

  test('a receiver that is down: retried, then dead-lettered; re-queued once it is up, it is delivered', async () => {
    const id = await post(message('ref-i12-lung-repetitions'), KEY_C);
    const failed = await eventually(async () => {
      const { body } = await admin('/hl7-status-messages?state=failed');
      return (body.items as any[]).find((e) => e.referralId === id);
    }, 20_000);
    expect(failed.attempts).toBe(3);
    expect(failed.lastError).toMatch(/^gave up after 3 attempts; last error: RRI\^I12: connection failed: ECONNREFUSED/);

    const late = await receiver('AA', downPort);
    try {
      expect((await admin(`/hl7-status-messages/${failed.id}/retry`, 'POST')).status).toBe(202);
      await eventually(async () => forReferral(late, id).length === 1, 20_000);
      await eventually(async () => (await leasedQueue.entry(gw.db, hl7ReturnQueue, failed.id))?.state === 'acknowledged', 20_000);
      const { body } = await admin('/hl7-status-messages?state=acknowledged&limit=500');
      expect((body.items as any[]).some((e) => e.id === failed.id)).toBe(true);
    } finally {
      await late.close();
    }
  });

  test('the admin list refuses an unknown state', async () => {
    expect((await admin('/hl7-status-messages?state=lost')).status).toBe(400);
  });

  test('no patient names, birth dates or identifiers in the logs of any of it', async () => {
    const all = capture.lines.join('\n');
    expect(all).toMatch(/HL7 v2 status sent back/);
    const patients: string[] = [];
    for (const f of ['ref-i12-breast-epic', 'omg-o19-new-360x', 'ref-i12-sarcoma-crlf', 'ref-i12-lung-repetitions']) {
      const pid = fields(message(f).replace(/\r\n?|\n/g, '\r'), 'PID');
      for (const rep of pid[3].split('~')) patients.push(rep.split('^')[0]);
      patients.push(...pid[5].split('~')[0].split('^').slice(0, 2), pid[7]);
    }
    const secrets = patients.map((s) => decodeHl7Text(s).trim()).filter((s) => s && s !== '""');
    expect(secrets.length).toBeGreaterThan(15);
    for (const s of secrets) expect([s, all.includes(s)]).toEqual([s, false]);
    // Every referral of the suite was a real one: the clients' referrals exist.
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 50 })).items.length).toBeGreaterThanOrEqual(4);
  });
});

describe('HL7 v2 status back: a report larger than a message may carry (HL7_MAX_MESSAGE_BYTES)', () => {
  test('left out: the status goes back without it, the history says why, and the report route still serves it whole', async () => {
    const ehr = await receiver('AA');
    // 32 KiB messages: room for a report of 12 288 bytes (its Base64 beside 16 KiB for the other segments).
    const gw = await startGateway(
      {
        HL7_MAX_MESSAGE_BYTES: '32768',
        HL7_MLLP_PORT: '0',
        HL7_MLLP_SENDERS: 'NORTH-HILLS:city-hospital',
        HL7_RETURN_CHANNELS: `city-hospital=127.0.0.1:${ehr.port}`,
      },
      { hl7Return: { maxAttempts: 3, baseDelayMs: 20, maxDelayMs: 50, idleMs: 50, timeoutMs: 2000 } }
    );
    try {
      const res = await fetch(`${gw.url}/hl7/v2`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'x-application/hl7-v2+er7' },
        body: message('ref-i12-breast-epic'),
      });
      const id = /(ref_[0-9A-Z]+)/.exec(await res.text())?.[1] as string;
      const report = 'The board recommends surgery first. '.repeat(600); // 21 600 bytes
      await acceptAndComplete(gw, id, report);
      await eventually(async () => forId(ehr, id).length >= 3, 20_000);
      const completed = forId(ehr, id)[2];
      expect(statusOf(completed)).toBe('completed');
      expect(names(completed)).toEqual(['MSH', 'RF1', 'PRD', 'PID']);
      const note = await eventually(async () => (await referralHistory(gw.db, id)).find((h) => /sent back without the report/.test(h.reason ?? '')));
      expect(note.reason).toMatch(/the report is larger than the 12288 bytes an HL7 v2 message here may carry/);
      const content = await fetch(`${gw.url}/referrals/${id}/report/content`, { headers: { Authorization: `Bearer ${KEY_A}` } });
      expect(await content.text()).toBe(report);
    } finally {
      await gw.stop();
      await ehr.close();
    }
  });
});

/** The messages a receiver got for one referral. */
function forId(r: Receiver, id: string): string[] {
  return r.messages.filter((m) => m.includes(`|${id}`));
}
