import { ackReply, buildAck, hl7v2Format, parseV2, readV2Referral, v2Submission } from '../intake';
import type { IntakeReply, V2Submission } from '../intake';
import { logger } from '../observability';
import { invalidInput, notFound, zodIssues } from '../outcomes';
import { addDocumentsSchema, type ReferralService } from '../referral';
import { type Db, recordAnswer, recordedAnswer } from '../store';
import { noteStoreUnavailable } from './middleware';
import { httpAnswer } from './send-outcome';

/**
 * Answers one HL7 v2 message from a client, whatever carried it (POST /hl7/v2, an MLLP connection): REF^I12 and
 * OMG^O19 (ORC-1 NW) new referrals through the same use case as JSON, REF^I14 and OMG^O19 with ORC-1 CA cancels,
 * REF^I13 documents added. The acknowledgement is built after the work is stored durably: AA; AE naming the segment
 * and field of bad content; AR for a type or version not taken, or when the gateway cannot take work now. A resend
 * (same client, sending facility and control id) is answered with the acknowledgement recorded for the original.
 */
export async function answerV2Message(service: ReferralService, db: Db, clientId: string, text: string, correlationId?: string): Promise<IntakeReply> {
  const parsed = parseV2(text);
  if (!parsed.ok) {
    const code = parsed.location === 'MSH' ? 'AE' : 'AR';
    return ackReply(buildAck(parsed.message, code, [parsed]));
  }
  const key = { clientId, sender: parsed.sendingFacility || parsed.message.header.getField(3)?.getComponent(1) || '-', controlId: parsed.controlId };
  const recorded = await recordedAnswer(db, key);
  if (recorded !== undefined) return ackReply(recorded);

  const reading = readV2Referral(parsed.message);
  const submission: V2Submission = v2Submission(parsed, reading);
  let reply: IntakeReply;
  try {
    reply = await carryOut(service, clientId, submission);
  } catch (err) {
    const answer = httpAnswer(err);
    noteStoreUnavailable(err, correlationId);
    if (!answer) {
      logger.error('HL7 v2 message failed', { correlationId, clientId, messageType: parsed.type, error: (err as Error).message });
    }
    const refusal = answer ?? { status: 500, headers: {}, outcome: { resourceType: 'OperationOutcome', issue: [] } };
    reply = hl7v2Format.refused({ ...refusal, cause: err }, submission);
    // A refusal for load or an outage may pass: the resend is worked again. Content refusals are final.
    if (refusal.status >= 500) return reply;
  }
  await recordAnswer(db, key, reply.body);
  return reply;
}

/** The message's action, through the use case it names. */
async function carryOut(service: ReferralService, clientId: string, submission: V2Submission): Promise<IntakeReply> {
  const { reading, message } = submission;
  switch (reading.action) {
    case 'new': {
      const result = await service.submit(clientId, submission);
      return hl7v2Format.accepted({ created: result.created, id: result.view.id, view: result.view }, submission);
    }
    case 'cancel': {
      const id = await referralOf(service, clientId, reading.externalId, submission);
      const view = await service.cancel(clientId, id, reading.cancelReason ?? 'cancelled by the referrer');
      return ackReply(buildAck(message, 'AA', [], `${view.status === 'cancelled' ? 'cancelled' : 'cancel accepted'}: ${id}`));
    }
    case 'modify': {
      const id = await referralOf(service, clientId, reading.externalId, submission);
      const documents = addDocumentsSchema.safeParse(reading.referral.documents ?? []);
      if (!documents.success) {
        throw invalidInput(zodIssues(documents.error, ['documents']).map((i) => ({ ...i, expression: submission.locate(i.expression) })));
      }
      await service.addDocuments(clientId, id, documents.data);
      return ackReply(buildAck(message, 'AA', [], `${documents.data.length} document${documents.data.length === 1 ? '' : 's'} added to ${id}`));
    }
  }
}

/** The client's referral the message refers to (its externalId: RF1-6, ORC-2), or a not-found located there. */
async function referralOf(service: ReferralService, clientId: string, externalId: string | null, submission: V2Submission): Promise<string> {
  const where = submission.locate('externalId');
  if (!externalId) throw notFound('the message names no referral (its originating referral id)', where);
  const found = await service.list(clientId, { externalId, limit: 1 });
  const id = found.items[0]?.id;
  if (!id) throw notFound(`no referral ${externalId.slice(0, 64)} from this sender`, where);
  return id;
}
