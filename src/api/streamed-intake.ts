import type { IncomingMessage } from 'node:http';
import { type Readable, Transform } from 'node:stream';
import busboy from 'busboy';
import { type Request, type RequestHandler, type Response, Router } from 'express';
import type { IntakeRegistry, IntakeReply, Submission } from '../intake';
import type { BlobRef } from '../model';
import { Failure, malformed, tooLarge } from '../outcomes';
import type { DocumentIntake, ReferralService, SubmitResult } from '../referral';
import { submissions } from '../observability';
import type { MemoryBudget } from '../memory';
import { intakeBudget, intakeCost, STREAM_WINDOW_BYTES } from './intake-budget';
import { closeAfterAnswer, parseJsonBytes } from './json-body';
import { noteStoreUnavailable } from './middleware';
import { httpAnswer } from './send-outcome';

// Documents that stream in (issue 13), before the JSON body reader: POST /referrals as multipart/form-data (a
// `referral` part, then the file parts its documents name) and PUT /referrals/{id}/documents/{n}/content (the raw
// bytes of a document declared `upload: true`). Bytes go to the blob store as they arrive; nothing holds a document.

export interface StreamedIntakeOptions {
  /** MAX_BODY_BYTES: the largest `referral` part. */
  maxBodyBytes: number;
  /** MAX_JSON_DEPTH. */
  maxDepth: number;
  /** INTAKE_BODY_TIMEOUT_MS: the longest a streamed body may send nothing (then 408). */
  idleTimeoutMs: number;
}

/** The part that carries the referral (as a field, or a file part of type application/json). */
const REFERRAL_PART = 'referral';

/**
 * The SHA-256 (hex) a digest header declares: `Repr-Digest` / `Content-Digest` (RFC 9530: `sha-256=:<base64>:`) or
 * `Digest` (RFC 3230: `SHA-256=<base64>`). Other algorithms are ignored; a sha-256 entry that is not a 32-byte digest
 * is refused (400).
 */
export function declaredSha256(headers: Request['headers']): string | undefined {
  for (const name of ['repr-digest', 'content-digest', 'digest'] as const) {
    const value = headers[name];
    if (typeof value !== 'string') continue;
    for (const member of value.split(',')) {
      const eq = member.indexOf('=');
      if (eq < 0 || member.slice(0, eq).trim().toLowerCase() !== 'sha-256') continue;
      let b64 = member.slice(eq + 1).trim();
      if (name !== 'digest') {
        if (!/^:[A-Za-z0-9+/]+=*:$/.test(b64)) {
          throw malformed({ code: 'value', expression: name, message: `${name}: sha-256 must be a byte sequence (:base64:)` });
        }
        b64 = b64.slice(1, -1);
      }
      const bytes = Buffer.from(b64, 'base64');
      if (bytes.length !== 32) throw malformed({ code: 'value', expression: name, message: `${name}: sha-256 is not a 32-byte digest` });
      return bytes.toString('hex');
    }
  }
  return undefined;
}

/**
 * The request body as a stream that notes its progress: aborts `signal` when the client goes away before the answer is
 * sent, or sends nothing for `idleMs`. Read the body through `body` (a listener on the request itself would start it
 * flowing before anyone reads it).
 */
function watchBody(req: Request, res: Response, idleMs: number): { body: Readable; signal: AbortSignal; idle: () => boolean; stop: () => void } {
  const controller = new AbortController();
  let timedOut = false;
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, idleMs);
    timer.unref();
  };
  const body = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      arm();
      done(null, chunk);
    },
  });
  req.on('error', (err) => body.destroy(err));
  req.pipe(body);
  const onClose = (): void => {
    if (!res.writableEnded) controller.abort();
  };
  res.on('close', onClose);
  arm();
  return {
    body,
    signal: controller.signal,
    idle: () => timedOut,
    stop: () => clearTimeout(timer),
  };
}

function send(res: Response, reply: IntakeReply): void {
  if (res.headersSent || res.destroyed) return;
  res.status(reply.status).set(reply.headers).type(reply.contentType).send(reply.body);
}

const idleFailure = (ms: number): Failure =>
  new Failure('timeout', { code: 'timeout', expression: '$', message: `the body sent nothing for ${ms} ms; nothing was kept` });

/** Reads a whole (small) part into one buffer, refusing it past `max` bytes. */
async function readPart(stream: Readable, max: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    n += chunk.length;
    if (n > max) {
      stream.resume();
      throw tooLarge(`the ${REFERRAL_PART} part is larger than ${max} bytes (MAX_BODY_BYTES)`, REFERRAL_PART);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/**
 * A multipart/form-data referral. The `referral` part comes first (a field, or a file part of type
 * application/json): it is read and checked before any file part is accepted, so a bad referral is refused before
 * gigabytes are sent. Each file part then streams into the blob store, hashed and checked against its document's
 * `sha256`, within MAX_DOCUMENT_BYTES and the referral's MAX_REFERRAL_DOCUMENT_BYTES. The referral is stored once
 * every part its documents name has arrived and is durable; on any refusal nothing is kept.
 */
async function multipartReferral(req: Request, res: Response, deps: Deps, bug: (err: unknown) => void): Promise<void> {
  const format = deps.intake.forContentType('application/json');
  const watch = watchBody(req, res, deps.opts.idleTimeoutMs);
  const received = new Map<number, BlobRef>();
  let submission: Submission | undefined;
  let settled = false;
  /** Ends the wait for the body: it was read to its end, or the request was refused or abandoned on the way. */
  let stopWaiting: () => void = () => undefined;

  const refuse = async (err: unknown): Promise<void> => {
    if (settled) return;
    settled = true;
    stopWaiting();
    await deps.documents.release(received.values(), { discard: true }).catch(() => undefined);
    const failure = watch.idle() ? idleFailure(deps.opts.idleTimeoutMs) : err;
    const answer = httpAnswer(failure);
    submissions.inc({ outcome: answer && answer.status < 500 ? `refused-${answer.status}` : 'error' });
    if (res.destroyed || watch.signal.aborted) {
      if (!watch.idle()) return; // the client went away: there is no one to answer
    }
    if (!answer) {
      bug(err); // not a refusal: the error handler logs it and answers a bare 500
      return;
    }
    noteStoreUnavailable(failure, req.correlationId);
    req.unpipe(); // the rest is read and dropped, not buffered for a reader that stopped
    closeAfterAnswer(req, res);
    send(res, format.refused({ ...answer, cause: failure }, submission));
  };

  let bb: busboy.Busboy;
  try {
    bb = busboy({
      headers: req.headers,
      limits: { fieldSize: deps.opts.maxBodyBytes, fields: 1, files: 101, parts: 102, fileSize: Number.MAX_SAFE_INTEGER, headerPairs: 50 },
    });
  } catch (err) {
    await refuse(
      malformed({ code: 'structure', expression: 'Content-Type', message: `not a readable multipart/form-data request: ${(err as Error).message}` })
    );
    return;
  }

  /** The prepared referral, once its part has been read and checked. */
  let prepared: Awaited<ReturnType<ReferralService['prepare']>> | undefined;
  let readingReferral: Promise<void> | undefined;
  /** The parts are handled one after another, in the order they came. */
  let chain: Promise<void> = Promise.resolve();
  const filled = new Set<string>();
  let total = 0;

  const takeReferral = (bytes: Buffer): Promise<void> =>
    (async () => {
      const value = await parseJsonBytes(bytes, deps.opts.maxDepth);
      submission = format.submission(value, req.headers);
      prepared = await deps.service.prepare(req.clientId as string, submission);
    })();

  const failed = (err: unknown): void => {
    watch.body.unpipe(bb);
    void refuse(err);
  };

  bb.on('field', (name, value, info) => {
    if (settled) return;
    if (name !== REFERRAL_PART || readingReferral) {
      failed(malformed({ code: 'structure', expression: name, message: `unexpected field "${name}": send one "${REFERRAL_PART}" part, then the file parts` }));
      return;
    }
    if (info.valueTruncated) {
      failed(tooLarge(`the ${REFERRAL_PART} part is larger than ${deps.opts.maxBodyBytes} bytes (MAX_BODY_BYTES)`, REFERRAL_PART));
      return;
    }
    readingReferral = takeReferral(Buffer.from(value, 'utf8'));
    chain = chain.then(() => readingReferral).catch(failed);
  });

  bb.on('file', (name, stream) => {
    if (settled) {
      stream.resume();
      return;
    }
    if (name === REFERRAL_PART && !readingReferral) {
      readingReferral = readPart(stream, deps.opts.maxBodyBytes).then(takeReferral);
      chain = chain.then(() => readingReferral).catch(failed);
      return;
    }
    chain = chain.then(async () => {
      if (settled) return;
      if (!prepared) {
        throw malformed({ code: 'structure', expression: name, message: `part "${name}" came before the "${REFERRAL_PART}" part, which must come first` });
      }
      if (prepared.kind === 'replay') {
        stream.resume(); // answered as the original: its bytes are already held
        return;
      }
      const index = prepared.files.get(name);
      if (index === undefined || filled.has(name)) {
        throw malformed({
          code: 'structure',
          expression: name,
          message: filled.has(name) ? `part "${name}" was sent twice` : `part "${name}" is named by no document's "file"`,
        });
      }
      filled.add(name);
      const doc = prepared.referral.documents[index];
      const expression = prepared.locate(`documents[${index}]`);
      const { maxBytes, limitName } = deps.documents.allowance(total);
      const ref = await deps.documents.receive(stream, { maxBytes, expectedSha256: doc.sha256, signal: watch.signal, expression, limitName });
      received.set(index, ref);
      total += ref.bytes;
    });
    chain = chain.catch((err: unknown) => {
      stream.resume();
      failed(err);
    });
  });

  for (const limit of ['partsLimit', 'filesLimit', 'fieldsLimit'] as const) {
    bb.on(limit, () => failed(tooLarge(`too many parts: one "${REFERRAL_PART}" part and at most 100 file parts`, '$')));
  }
  bb.on('error', (err: unknown) =>
    failed(malformed({ code: 'structure', expression: '$', message: `the multipart body could not be read: ${(err as Error).message}` }))
  );

  const finished = new Promise<void>((resolve) => {
    stopWaiting = resolve;
    bb.on('close', resolve);
  });
  watch.body.on('error', (err) => failed(err));
  watch.body.pipe(bb);

  try {
    await finished;
    await chain;
    watch.stop();
    if (settled) return;
    if (!prepared) throw malformed({ code: 'required', expression: REFERRAL_PART, message: `the "${REFERRAL_PART}" part is missing` });
    let result: SubmitResult;
    if (prepared.kind === 'replay') {
      result = prepared.result;
    } else {
      const missing = [...prepared.files].filter(([name]) => !filled.has(name));
      if (missing.length > 0) {
        const locate = prepared.locate;
        throw new Failure(
          'invalid',
          missing.map(([name, i]) => ({
            code: 'required' as const,
            expression: locate(`documents[${i}].file`),
            message: `${locate(`documents[${i}].file`)}: part "${name}" never came; nothing was kept`,
          }))
        );
      }
      result = await deps.service.complete(req.clientId as string, prepared, received);
    }
    settled = true;
    await deps.documents.release(received.values(), { discard: false });
    submissions.inc({ outcome: result.created ? 'accepted' : 'replayed' });
    send(res, format.accepted({ created: result.created, id: result.view.id, view: result.view }, submission as Submission));
  } catch (err) {
    watch.stop();
    await refuse(err);
  }
}

/** PUT /referrals/{id}/documents/{n}/content: the raw bytes of a document declared `upload: true`. */
async function uploadContent(req: Request, res: Response, deps: Deps): Promise<void> {
  const n = Number(req.params.n);
  const encoding = (req.headers['content-encoding'] ?? 'identity').trim().toLowerCase();
  if (encoding !== 'identity' && encoding !== '') {
    throw new Failure('unsupported', { code: 'not-supported', expression: 'Content-Encoding', message: 'send the document as it is (no Content-Encoding)' });
  }
  const declared = req.headers['content-length'] === undefined ? undefined : Number(req.headers['content-length']);
  const sha256 = declaredSha256(req.headers);
  const watch = watchBody(req, res, deps.opts.idleTimeoutMs);
  try {
    const done = await deps.documents.upload(req.clientId as string, String(req.params.id), n, {
      contentType: req.headers['content-type'],
      body: watch.body,
      sha256,
      length: declared,
      signal: watch.signal,
    });
    const view = await deps.service.view(await deps.service.get(req.clientId as string, done.referralId, { payload: false }));
    res.status(done.replay ? 200 : 202).json(view);
  } catch (err) {
    if (!req.complete) {
      req.unpipe();
      closeAfterAnswer(req, res);
    }
    throw watch.idle() ? idleFailure(deps.opts.idleTimeoutMs) : err;
  } finally {
    watch.stop();
  }
}

interface Deps {
  service: ReferralService;
  documents: DocumentIntake;
  intake: IntakeRegistry;
  opts: StreamedIntakeOptions;
}

/**
 * The streamed routes under /referrals, mounted after authentication and before the JSON body reader. A POST whose
 * Content-Type is not multipart/form-data passes on to the JSON and HL7 v2 intake.
 */
export function streamedIntakeRouter(
  service: ReferralService,
  documents: DocumentIntake,
  intake: IntakeRegistry,
  opts: StreamedIntakeOptions & { memory: MemoryBudget; waitMs: number }
): Router {
  const deps: Deps = { service, documents, intake, opts };
  // The memory budget: a streamed body holds a window of its bytes at once, and a multipart body its referral part too.
  const budget = (extra: (req: Request) => number): RequestHandler =>
    intakeBudget({ budget: opts.memory, maxBodyBytes: opts.maxBodyBytes, waitMs: opts.waitMs, cost: (req) => STREAM_WINDOW_BYTES + extra(req as Request) });
  const multipartCost = budget((req) => intakeCost(req.headers, opts.maxBodyBytes));
  const uploadCost = budget(() => 0);
  const r = Router();
  r.post(
    '/',
    (req, _res, next) => next(req.is('multipart/form-data') ? undefined : 'router'),
    multipartCost,
    (req, res, next) => {
      multipartReferral(req, res, deps, next).catch(next);
    }
  );
  r.put('/:id/documents/:n/content', uploadCost, (req, res, next) => {
    uploadContent(req, res, deps).catch(next);
  });
  return r;
}

/** Whether a request is one of the streamed routes (exempt from REQUEST_TIMEOUT_MS; an idle body is cut off instead). */
export function isStreamedRequest(req: IncomingMessage): boolean {
  const path = (req.url ?? '').split('?')[0];
  if (req.method === 'PUT') return /^\/referrals\/[^/]+\/documents\/[^/]+\/content\/?$/.test(path);
  return req.method === 'POST' && /^\/referrals\/?$/.test(path) && /^multipart\/form-data\b/i.test(req.headers['content-type'] ?? '');
}
