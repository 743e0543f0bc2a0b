import type { Gateway } from '../../src/gateway';
import { type IntakeFormat, IntakeRegistry, jsonFormat } from '../../src/intake';
import { referralSchema } from '../../src/model';
import { zodIssues } from '../../src/outcomes';
import { fixture, KEY_A, startGateway } from '../helpers/gateway';

/**
 * A new intake format is its own module plus one registry line (src/intake/README.md): POST /referrals reads it
 * with the format's parser and answers in the format's own terms. This one wraps the referral in an envelope with
 * a message id (the idempotency key, as an HL7 v2 control id is) and answers in plain-text acknowledgements that
 * name the envelope's own field on a refusal.
 */
const envelopeFormat: IntakeFormat = {
  name: 'envelope',
  contentTypes: ['application/vnd.test-envelope+json'],
  submission(body) {
    const envelope = body as { messageId: string; referral: Record<string, unknown> };
    return {
      format: 'envelope',
      externalId: typeof envelope.referral?.externalId === 'string' ? envelope.referral.externalId : null,
      idempotencyKey: envelope.messageId,
      requestHash: async () => JSON.stringify(envelope.referral),
      read() {
        const parsed = referralSchema.safeParse(envelope.referral);
        return parsed.success ? { ok: true, referral: parsed.data } : { ok: false, issues: zodIssues(parsed.error, ['body']) };
      },
      locate: (modelPath) => `body.${modelPath}`,
    };
  },
  accepted: ({ created, id }, submission) => ({
    status: 200,
    headers: {},
    contentType: 'text/plain',
    body: `ACK ${submission.idempotencyKey} ${created ? 'accepted' : 'already accepted'} ${id}`,
  }),
  refused: ({ status, outcome }, submission) => ({
    status: 200,
    headers: {},
    contentType: 'text/plain',
    body: `NAK ${submission?.idempotencyKey ?? '-'} ${status} ${outcome.issue?.[0]?.expression?.[0] ?? ''}`,
  }),
};

describe('an intake format answers in its own terms', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({}, { intake: new IntakeRegistry([envelopeFormat, jsonFormat]) });
  });
  afterAll(async () => {
    await gw.stop();
  });

  const post = async (body: unknown): Promise<{ status: number; type: string | null; text: string }> => {
    const res = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/vnd.test-envelope+json' },
      body: JSON.stringify(body),
    });
    return { status: res.status, type: res.headers.get('content-type'), text: await res.text() };
  };

  test("accepted, replayed and refused submissions get the format's acknowledgements; JSON keeps its contract beside it", async () => {
    const referral: Record<string, any> = { ...fixture(), externalId: 'EHR-ENVELOPE-1' };
    const first = await post({ messageId: 'MSG-1', referral });
    expect(first).toMatchObject({ status: 200, type: expect.stringMatching(/^text\/plain/), text: expect.stringMatching(/^ACK MSG-1 accepted ref_/) });
    const id = first.text.split(' ').pop();
    expect((await post({ messageId: 'MSG-1', referral })).text).toBe(`ACK MSG-1 already accepted ${id}`);

    const bad = await post({
      messageId: 'MSG-2',
      referral: { ...referral, externalId: 'EHR-ENVELOPE-2', patient: { ...referral.patient, birthDate: 'yesterday' } },
    });
    expect(bad).toMatchObject({ status: 200, text: 'NAK MSG-2 422 body.patient.birthDate' });

    const json = await fetch(`${gw.url}/referrals`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ ...referral, externalId: 'EHR-ENVELOPE-3' }),
    });
    expect(json.status).toBe(202);
    expect(json.headers.get('location')).toMatch(/^\/referrals\/ref_/);
  });
});
