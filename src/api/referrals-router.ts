import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { type Response, Router } from 'express';
import { z } from 'zod';
import type { IntakeRegistry, IntakeReply, Submission } from '../intake';
import { referralStatusSchema, addDocumentsSchema, cancelSchema } from '../referral';
import type { StoredReferral } from '../model';
import type { ReferralService, SubmitResult } from '../referral';
import { logger, submissions } from '../observability';
import { noteStoreUnavailable } from './middleware';
import { httpAnswer } from './send-outcome';
import { Failure, invalidInput, zodIssues } from '../outcomes';

/** The query of GET /referrals. */
export const listQuery = z.strictObject({
  status: referralStatusSchema.optional(),
  externalId: z.string().min(1).max(128).optional(),
  updatedSince: z.iso
    .datetime({ offset: true })
    .transform((s) => new Date(s).toISOString())
    .optional(),
  limit: z.coerce.number().int().min(1).max(200).default(50),
  cursor: z.string().max(200).optional(),
});

function decodeCursor(cursor: string): { createdAt: string; id: string } {
  try {
    const [createdAt, id] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as [string, string];
    if (typeof createdAt === 'string' && typeof id === 'string') return { createdAt, id };
  } catch {
    // fall through
  }
  throw new Failure('malformed', { code: 'invalid', message: 'cursor: not a cursor this service issued', expression: 'cursor' });
}

const encodeCursor = (c: { createdAt: string; id: string }): string => Buffer.from(JSON.stringify([c.createdAt, c.id])).toString('base64url');

/** Report types a browser may show inline; anything else (HTML, SVG, scripts, unknown) is served as a download. */
export const INLINE_REPORT_TYPES: ReadonlySet<string> = new Set(['application/pdf', 'text/plain', 'image/png', 'image/jpeg', 'image/gif', 'image/webp']);

const EXTENSIONS: Record<string, string> = {
  'application/pdf': 'pdf',
  'text/plain': 'txt',
  'image/png': 'png',
  'image/jpeg': 'jpg',
  'image/gif': 'gif',
  'image/webp': 'webp',
  'text/html': 'html',
};

/**
 * The headers a centre-supplied report is served with. The type is the centre's, so it is not trusted:
 * only the inline allow-list is shown in the browser, everything else is an attachment; the browser may
 * not sniff another type; and the document runs sandboxed with no scripts, frames or fetches (a PDF keeps
 * the viewer it needs: no sandbox token, which would stop Chromium's viewer, but still no scripts or fetches).
 */
export function reportHeaders(referralId: string, contentType: string | undefined): Record<string, string> {
  const type = contentType?.split(';')[0].trim().toLowerCase() || 'application/octet-stream';
  const inline = INLINE_REPORT_TYPES.has(type);
  const filename = `report-${referralId.replace(/[^\w.-]/g, '_')}.${EXTENSIONS[type] ?? 'bin'}`;
  return {
    'Content-Type': type === 'text/plain' ? 'text/plain; charset=utf-8' : type,
    'Content-Disposition': `${inline ? 'inline' : 'attachment'}; filename="${filename}"`,
    'X-Content-Type-Options': 'nosniff',
    'Content-Security-Policy':
      type === 'application/pdf'
        ? "default-src 'none'; object-src 'self'; frame-ancestors 'none'"
        : "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'none'",
    'Cache-Control': 'private, no-store',
  };
}

export interface ReportReader {
  /**
   * The report's content type and bytes as a stream from the destination (and their length when known). A
   * failure to start the read rejects; `signal` stops the read (the client is gone).
   */
  read(referral: StoredReferral, opts: { signal: AbortSignal }): Promise<{ contentType: string; bytes?: number; body: Readable }>;
}

/** A body parsed with a zod schema, or the 422 naming the fields (`prefix` is where the schema's value sits in the body). */
function parseBody<T>(schema: z.ZodType<T>, value: unknown, prefix: ReadonlyArray<PropertyKey> = []): T {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw invalidInput(zodIssues(parsed.error, prefix));
  return parsed.data;
}

function sendReply(res: Response, reply: IntakeReply): void {
  res.status(reply.status).set(reply.headers).type(reply.contentType).send(reply.body);
}

/** The referral routes: each parses its input, calls one use case and sends the answer. */
export function referralsRouter(service: ReferralService, intake: IntakeRegistry, reports: ReportReader): Router {
  const r = Router();

  /** A submission in any intake format, answered in that format's terms (accepted or refused). */
  r.post('/', async (req, res) => {
    const format = intake.forContentType(req.get('content-type'));
    let submission: Submission | undefined;
    let result: SubmitResult;
    try {
      submission = format.submission(req.body, req.headers);
      result = await service.submit(req.clientId as string, submission);
    } catch (err) {
      const answer = httpAnswer(err);
      submissions.inc({ outcome: answer && answer.status < 500 ? `refused-${answer.status}` : 'error' });
      if (!answer) throw err; // a bug: the error handler logs it and answers a bare 500
      noteStoreUnavailable(err, req.correlationId);
      sendReply(res, format.refused({ ...answer, cause: err }, submission));
      return;
    }
    submissions.inc({ outcome: result.created ? 'accepted' : 'replayed' });
    sendReply(res, format.accepted({ created: result.created, id: result.view.id, view: result.view }, submission));
  });

  r.get('/', async (req, res) => {
    const q = listQuery.safeParse(req.query);
    if (!q.success) throw new Failure('malformed', zodIssues(q.error));
    const { items, next } = await service.list(req.clientId as string, {
      status: q.data.status,
      externalId: q.data.externalId,
      updatedSince: q.data.updatedSince,
      limit: q.data.limit,
      cursor: q.data.cursor ? decodeCursor(q.data.cursor) : undefined,
    });
    res.json({ items, nextCursor: next ? encodeCursor(next) : null });
  });

  r.get('/:id', async (req, res) => {
    const referral = await service.get(req.clientId as string, req.params.id, { payload: false });
    res.json(await service.view(referral));
  });

  r.post('/:id/cancel', async (req, res) => {
    const { reason } = parseBody(cancelSchema, req.body ?? {});
    const view = await service.cancel(req.clientId as string, req.params.id, reason);
    res.status(202).json(view);
  });

  r.post('/:id/documents', async (req, res) => {
    // The documents as an array, or as { documents: [...] } (issues then name documents[i]).
    const bare = Array.isArray(req.body);
    const documents = parseBody(addDocumentsSchema, bare ? req.body : (req.body as { documents?: unknown } | undefined)?.documents, bare ? [] : ['documents']);
    const view = await service.addDocuments(req.clientId as string, req.params.id, documents);
    res.status(202).json(view);
  });

  r.get('/:id/report/content', async (req, res) => {
    const referral = await service.get(req.clientId as string, req.params.id, { payload: false });
    if (!referral.report) {
      throw new Failure('not-found', { code: 'not-found', message: `Referral ${referral.id} has no report yet (status ${referral.status})` });
    }
    // Streamed as it comes from the centre. A client that goes away stops the read there.
    const gone = new AbortController();
    res.once('close', () => gone.abort());
    const content = await reports.read(referral, { signal: gone.signal });
    if (gone.signal.aborted || req.method === 'HEAD') content.body.destroy();
    if (gone.signal.aborted) return;
    for (const [name, value] of Object.entries(reportHeaders(referral.id, content.contentType))) res.setHeader(name, value);
    if (content.bytes !== undefined) res.setHeader('Content-Length', String(content.bytes));
    res.status(200);
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    try {
      await pipeline(content.body, res);
    } catch (err) {
      // After the headers the only honest answer is a cut transfer (no final chunk, or short of Content-Length),
      // never a response that ends as if it were whole: pipeline has destroyed the response.
      res.destroy();
      if ((err as { code?: string }).code !== 'ERR_STREAM_PREMATURE_CLOSE') {
        logger.warn('report transfer broke off', { correlationId: req.correlationId, referralId: referral.id, error: (err as Error).message });
      }
    }
  });

  return r;
}
