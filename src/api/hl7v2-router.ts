import { Router } from 'express';
import { HL7V2_CONTENT_TYPES } from '../intake';
import { submissions } from '../observability';
import { unsupported } from '../outcomes';
import type { ReferralService } from '../referral';
import type { Db } from '../store';
import { answerV2Message } from './hl7v2-handler';

/**
 * POST /hl7/v2: one HL7 v2 message (ER7, `x-application/hl7-v2+er7`) with the same API keys as the JSON API,
 * answered with its acknowledgement as the body (src/api/hl7v2-handler.ts): 200 for AA, AE and AR alike (the
 * interface engine reads MSA-1), except that a refusal for load or an outage keeps its 503 and Retry-After.
 */
export function hl7v2Router(service: ReferralService, db: Db): Router {
  const r = Router();
  r.post('/', async (req, res) => {
    if (typeof req.body !== 'string') {
      throw unsupported(`an HL7 v2 message is taken as ${HL7V2_CONTENT_TYPES.join(' or ')}`, 'Content-Type');
    }
    const reply = await answerV2Message(service, db, req.clientId as string, req.body, req.correlationId);
    const msa = /\rMSA\|(A[AER])/.exec(reply.body)?.[1];
    submissions.inc({ outcome: msa === 'AA' ? 'accepted' : `refused-hl7v2-${msa ?? 'none'}` });
    res.status(reply.status).set(reply.headers).type(reply.contentType).send(reply.body);
  });
  return r;
}
