import { type Request, type Response, Router } from 'express';
import { fhirBundleFormat, type IntakeReply, type Submission, taskMirror, taskSearchset } from '../intake';
import { submissions } from '../observability';
import { invalidInput } from '../outcomes';
import type { ReferralService } from '../referral';
import { noteStoreUnavailable } from './middleware';
import { httpAnswer } from './send-outcome';

function send(res: Response, reply: IntakeReply): void {
  res.status(reply.status).set(reply.headers).type(reply.contentType).send(reply.body);
}

/**
 * FHIR intake for FHIR-capable EHRs, under /fhir/R4 with the same API keys:
 * - POST /Bundle, or POST / with a transaction, collection or message Bundle: a referral Bundle (BSeR / Gravity
 *   style), through the same use case as JSON; 201 with the Location of the gateway's Task for it;
 * - GET /Task/{id} and GET /Task?identifier=[system|]value: the referral as a Task mirroring the centre's (status,
 *   businessStatus, statusReason, output with the report). Another client's referral is not found, as in the JSON API.
 */
export function fhirRouter(service: ReferralService): Router {
  const r = Router();

  const submit = async (req: Request, res: Response): Promise<void> => {
    let submission: Submission | undefined;
    try {
      submission = fhirBundleFormat.submission(req.body, req.headers);
      const result = await service.submit(req.clientId as string, submission);
      submissions.inc({ outcome: result.created ? 'accepted' : 'replayed' });
      send(res, fhirBundleFormat.accepted({ created: result.created, id: result.view.id, view: result.view }, submission));
    } catch (err) {
      const answer = httpAnswer(err);
      submissions.inc({ outcome: answer && answer.status < 500 ? `refused-${answer.status}` : 'error' });
      if (!answer) throw err;
      noteStoreUnavailable(err, req.correlationId);
      send(res, fhirBundleFormat.refused({ ...answer, cause: err }, submission));
    }
  };
  r.post('/Bundle', submit);
  r.post('/', submit);

  r.get('/Task/:id', async (req, res) => {
    const referral = await service.get(req.clientId as string, req.params.id, { payload: false });
    res.type('application/fhir+json').send(JSON.stringify(taskMirror(await service.view(referral))));
  });

  r.get('/Task', async (req, res) => {
    const identifier = req.query.identifier;
    if (typeof identifier !== 'string' || identifier.length === 0 || identifier.length > 300) {
      throw invalidInput({
        code: 'required',
        message: 'identifier: search Tasks by identifier ([system|]value: the ServiceRequest identifier you sent)',
        expression: 'identifier',
      });
    }
    const value = identifier.includes('|') ? identifier.slice(identifier.indexOf('|') + 1) : identifier;
    const { items } = await service.list(req.clientId as string, { externalId: value, limit: 20 });
    res.type('application/fhir+json').send(JSON.stringify(taskSearchset(items)));
  });

  return r;
}
