import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import type { Gateway } from '../../src/gateway';
import { frameMllp, sendMllp } from '../../src/intake/hl7v2/mllp';
import { getReferral, listReferrals } from '../../src/store';
import { acceptAndComplete } from '../helpers/centre';
import { eventually, KEY_A, KEY_B, startGateway } from '../helpers/gateway';
import { prng } from '../helpers/prng';

/**
 * EHRs plug in as they are: HL7 v2 referral messages over HTTP (POST /hl7/v2) and MLLP, through the same checks,
 * idempotency, store, delivery and tracking as JSON, each answered with an acknowledgement in the sender's family.
 */
const message = (name: string): string => readFileSync(`fixtures/hl7v2/${name}.hl7`, 'utf8');
/** The same message with another control id (MSH-10), so it is a new message and not a resend. */
const withControlId = (text: string, id: string): string => text.replace(/^(MSH(?:\|[^|\r]*){8}\|)[^|\r]*/, `$1${id}`);
const segment = (ack: string, name: string): string[] => ack.split(/\r/).filter((s) => s.startsWith(`${name}|`));
const msa = (ack: string): string[] => (segment(ack, 'MSA')[0] ?? '').split('|');

describe('HL7 v2 intake', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({
      HL7_MLLP_PORT: '0',
      HL7_MLLP_SENDERS: 'CITY-HOSP:city-hospital,NORTH-HILLS:city-hospital,STMARY:city-hospital,NORTHFJORD:city-hospital,OTHER-HOSP:other-clinic',
      HL7_MAX_MESSAGE_BYTES: String(256 * 1024),
    });
  });
  afterAll(async () => {
    await gw.stop();
  });

  const post = async (text: string, key = KEY_A, path = '/hl7/v2'): Promise<{ status: number; type: string | null; ack: string }> => {
    const res = await fetch(`${gw.url}${path}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'x-application/hl7-v2+er7' },
      body: text,
    });
    return { status: res.status, type: res.headers.get('content-type'), ack: await res.text() };
  };
  const referralsOf = async (externalId: string, clientId = 'city-hospital') => (await listReferrals(gw.db, clientId, { limit: 10, externalId })).items;

  test('REF^I12 over HTTP: RRI^I12 AA once stored; a resend gets the same ACK; I13 adds a document; delivered, accepted and completed', async () => {
    const first = await post(message('ref-i12-breast-epic'));
    expect(first.status).toBe(200);
    expect(first.type).toMatch(/^x-application\/hl7-v2\+er7/);
    expect(segment(first.ack, 'MSH')[0].split('|')[8]).toBe('RRI^I12^RRI_I12');
    expect(msa(first.ack).slice(0, 3)).toEqual(['MSA', 'AA', 'EPIC-000123-1']);
    const [stored] = await referralsOf('EHR-2026-000123');
    expect(stored.status).toBe('queued');
    expect(first.ack).toContain(stored.id);

    const resend = await post(message('ref-i12-breast-epic'));
    expect(resend.ack).toBe(first.ack);
    expect(await referralsOf('EHR-2026-000123')).toHaveLength(1);
    // A month later the recorded answer is forgotten (retention): a resend is answered as a replay, still nothing new.
    await gw.retention.run(new Date(Date.now() + 31 * 86_400_000));
    const late = await post(message('ref-i12-breast-epic'));
    expect(msa(late.ack).slice(0, 4)).toEqual(['MSA', 'AA', 'EPIC-000123-1', `already accepted as ${stored.id}`]);
    expect(await referralsOf('EHR-2026-000123')).toHaveLength(1);

    const added = await post(message('ref-i13-documents-added'));
    expect(msa(added.ack).slice(0, 3)).toEqual(['MSA', 'AA', 'EPIC-000123-2']);
    expect(msa(added.ack)[3]).toMatch(/1 document added/);

    await acceptAndComplete(gw, stored.id, 'Board opinion for the v2 referral.');
    const done = await getReferral(gw.db, stored.id, { payload: false });
    expect(done?.status).toBe('completed');
    const report = await fetch(`${gw.url}/referrals/${stored.id}/report/content`, { headers: { Authorization: `Bearer ${KEY_A}` } });
    expect(await report.text()).toBe('Board opinion for the v2 referral.');
    // The added document reached the centre too.
    await eventually(async () => ((await getReferral(gw.db, stored.id, { payload: false }))?.fhir?.documents.length ?? 0) > 1);
  });

  test('OMG^O19 over MLLP: ORG^O20 AA, then ORC-1 CA cancels it; a facility bound to no client gets AR', async () => {
    const port = gw.mllp?.port as number;
    const created = (await sendMllp('127.0.0.1', port, message('omg-o19-new-360x'))).toString('utf8');
    expect(segment(created, 'MSH')[0].split('|')[8]).toBe('ORG^O20^ORG_O20');
    expect(msa(created)[1]).toBe('AA');
    const [referral] = await referralsOf('NHC-2026-4410');
    expect(referral).toBeDefined();
    const cancelled = (await sendMllp('127.0.0.1', port, message('omg-o19-cancel'))).toString('utf8');
    expect(msa(cancelled)[1]).toBe('AA');
    await eventually(async () => (await getReferral(gw.db, referral.id, { payload: false }))?.status === 'cancelled', 20_000);

    const stranger = message('ref-i12-sarcoma-crlf').replace(/^(MSH\|[^|]*\|[^|]*\|)[^|]*/, '$1UNKNOWN-FACILITY');
    const refused = (await sendMllp('127.0.0.1', port, withControlId(stranger, 'STRANGER-1'))).toString('utf8');
    expect(msa(refused)[1]).toBe('AR');
    expect(segment(refused, 'ERR')[0]).toContain('MSH^1^4');
  });

  test('MLLP keeps the connection after an oversize message (AR) and answers the next one on it', async () => {
    const port = gw.mllp?.port as number;
    const socket: Socket = connect(port, '127.0.0.1');
    const replies: string[] = [];
    let buffer = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (let end = buffer.indexOf('\x1c\r'); end >= 0; end = buffer.indexOf('\x1c\r')) {
        replies.push(buffer.subarray(buffer.indexOf(0x0b) + 1, end).toString('utf8'));
        buffer = buffer.subarray(end + 2);
      }
    });
    await new Promise((resolve) => socket.once('connect', resolve));
    const big = withControlId(message('ref-i12-breast-epic'), 'BIG-1') + `\rNTE|2|P|${'x'.repeat(300 * 1024)}`;
    // Split across writes, with the next message in the same packet as the end of the first.
    const framed = frameMllp(big);
    socket.write(framed.subarray(0, 1000));
    socket.write(Buffer.concat([framed.subarray(1000), frameMllp(withControlId(message('ref-i12-lung-repetitions'), 'AFTER-BIG'))]));
    await eventually(async () => replies.length === 2, 20_000);
    socket.destroy();
    expect(msa(replies[0]).slice(0, 3)).toEqual(['MSA', 'AR', 'BIG-1']);
    expect(segment(replies[0], 'ERR')[0]).toContain('HL7_MAX_MESSAGE_BYTES');
    expect(msa(replies[1]).slice(0, 3)).toEqual(['MSA', 'AA', 'AFTER-BIG']);
  });

  test('bad content is AE naming the segment and field, nothing stored; an unsupported type or version is AR', async () => {
    const noBirthDate = withControlId(message('ref-i12-sarcoma-crlf'), 'BAD-1').replace(/(\r\n?|\n)(PID(?:\|[^|\r\n]*){6}\|)[^|\r\n]*/, '$1$2');
    const externalId = /RF1(?:\|[^|\r\n]*){5}\|([^|^\r\n]*)/.exec(noBirthDate)?.[1] as string;
    const bad = await post(noBirthDate);
    expect(bad.status).toBe(200);
    expect(msa(bad.ack).slice(0, 3)).toEqual(['MSA', 'AE', 'BAD-1']);
    expect(segment(bad.ack, 'ERR').some((e) => e.split('|')[2] === 'PID^1^7')).toBe(true);
    expect(await referralsOf(externalId)).toHaveLength(0);

    const adt = await post(message('ref-i12-lung-repetitions').replace('REF^I12^REF_I12', 'ADT^A01^ADT_A01'));
    expect(msa(adt.ack)[1]).toBe('AR');
    expect(segment(adt.ack, 'ERR')[0]).toContain('200^Unsupported message type');
    const old = await post(message('ref-i12-lung-repetitions').replace(/\|2\.\d(\.\d)?(\||\r|$)/, '|2.1$2'));
    expect(msa(old.ack)[1]).toBe('AR');
    const garbage = await post('hello, this is not HL7');
    expect(msa(garbage.ack)[1]).toBe('AE');
  });

  test('tenant isolation: another client cannot cancel or see a referral by its id, through v2 or FHIR', async () => {
    const created = await post(withControlId(message('ref-i12-sarcoma-crlf'), 'ISO-1'));
    expect([msa(created.ack)[1], created.ack]).toEqual(['AA', created.ack]);
    const id = /(ref_[0-9A-Z]+)/.exec(created.ack)?.[1] as string;
    const [stored] = (await listReferrals(gw.db, 'city-hospital', { limit: 50 })).items.filter((r) => r.id === id);
    const cancel = message('ref-i14-cancel')
      .replace(/^(MSH\|[^|]*\|[^|]*\|)[^|]*/, '$1OTHER-HOSP')
      .replace('EHR-2026-000123', stored.externalId);
    const refused = await post(cancel, KEY_B);
    expect(msa(refused.ack)[1]).toBe('AE');
    expect((await getReferral(gw.db, id, { payload: false }))?.status).not.toBe('cancelled');
    const task = await fetch(`${gw.url}/fhir/R4/Task/${id}`, { headers: { Authorization: `Bearer ${KEY_B}` } });
    expect(task.status).toBe(404);
  });

  test('POST /referrals takes a v2 message too (the intake registry), answered with its ACK', async () => {
    const r = await post(withControlId(message('ref-i12-lung-repetitions'), 'VIA-REFERRALS'), KEY_A, '/referrals');
    expect(r.status).toBe(200);
    expect(msa(r.ack).slice(0, 2)).toEqual(['MSA', 'AA']);
  });

  test('600 mutated messages: each answered AA, AE or AR with a 200, never a 5xx; only the accepted new ones are stored', async () => {
    const random = prng(20261206);
    const sources = ['ref-i12-breast-epic', 'ref-i12-lung-repetitions', 'ref-i12-sarcoma-crlf', 'ref-i12-tumour-board-many-obx', 'omg-o19-new-360x'].map(
      message
    );
    const mutate = (text: string, n: number): string => {
      const segments = withControlId(text, `MUT-${n}`)
        .replace(/EHR-2026-000123|NHC-2026-4410|STM-REF-88412|UH-ORTHO-000981|TB-2026-0042/g, `MUTEXT-${n}`)
        .split(/\r\n?|\n/);
      const at = 1 + Math.floor(random() * (segments.length - 1));
      const fields = (segments[at] ?? '').split('|');
      const f = 1 + Math.floor(random() * Math.max(1, fields.length - 1));
      switch (Math.floor(random() * 8)) {
        case 0:
          segments.splice(at, 1);
          break;
        case 1:
          segments.splice(at, 0, segments[at]);
          break;
        case 2:
          fields[f] = '';
          segments[at] = fields.join('|');
          break;
        case 3:
          fields[f] = ['\\X0D\\', '^^^', '~~~', '\\E\\\\F\\', '99999999999999', 'x'.repeat(2000), '&&&', '\\Xzz\\'][Math.floor(random() * 8)];
          segments[at] = fields.join('|');
          break;
        case 4:
          segments[at] = (segments[at] ?? '').slice(0, Math.floor(random() * (segments[at] ?? '').length));
          break;
        case 5:
          segments.push(`ZXY|1|${'z'.repeat(Math.floor(random() * 50))}`);
          break;
        case 6:
          segments[at] = (segments[at] ?? '').replace(/\|/g, () => (random() < 0.2 ? '' : '|'));
          break;
        default:
          return segments.join('\r').slice(0, Math.floor(random() * text.length));
      }
      return segments.join('\r');
    };
    const before = (await listReferrals(gw.db, 'city-hospital', { limit: 1000 })).items.length;
    const codes: Record<string, number> = {};
    let stored = 0;
    for (let n = 0; n < 600; n++) {
      const r = await post(mutate(sources[n % sources.length], n));
      expect(r.status).toBe(200);
      const code = msa(r.ack)[1];
      expect(['AA', 'AE', 'AR']).toContain(code);
      codes[code] = (codes[code] ?? 0) + 1;
      if (code === 'AA' && /\|accepted as ref_/.test(r.ack)) stored++;
    }
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 1000 })).items.length).toBe(before + stored);
    expect(codes.AE).toBeGreaterThan(0);
    process.stdout.write(`hl7v2 fuzz: 600 messages ${JSON.stringify(codes)}, ${stored} stored\n`);
  });
});
