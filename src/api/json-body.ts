import type { Transform } from 'node:stream';
import { createBrotliDecompress, createGunzip, createInflate } from 'node:zlib';
import type { Request, RequestHandler, Response } from 'express';
import { Counter } from 'prom-client';
import { metricsRegistry } from '../observability';
import { releaseIntake } from './intake-budget';
import { freeNow, LARGE_BODY_CHARS, type LongString, NotUtf8Error, type PathSegment, parseBytes, type ScanProblem, scanJson, scanJsonBytes } from '../json';
import { Failure, type IssueInput, pathToExpression } from '../outcomes';

/**
 * The JSON body reader of /referrals and /admin (in place of express.json). It refuses what a hostile
 * client could use to take memory, time or a stack from the service, before anything else sees the body:
 *
 *   - a Content-Length over MAX_BODY_BYTES: 413 before a byte is read (and the connection is closed);
 *   - Content-Encoding other than identity, gzip, deflate or br, and a charset other than UTF-8: 415;
 *   - more than MAX_BODY_BYTES after decoding (a zip bomb is cut off there, never inflated whole): 413;
 *   - a body not fully received INTAKE_BODY_TIMEOUT_MS after it was admitted: 408;
 *   - bytes that are not UTF-8: 400; JSON nested deeper than MAX_JSON_DEPTH, or an object with a key twice: 400
 *     (one iterative scan before JSON.parse, so nothing recursive ever meets an unbounded depth);
 *   - strings, values or keys, that are not well-formed Unicode (a lone UTF-16 surrogate): 422 naming the field.
 *
 * The body is held once at a time: the received bytes until they are decoded to text, the text until it is
 * parsed; the parsed value (req.body) is all that is left when the router runs.
 */

export interface JsonBodyOptions {
  /** MAX_BODY_BYTES: the largest body, counted after Content-Encoding is undone. */
  maxBodyBytes: number;
  /** MAX_JSON_DEPTH: the deepest nesting of arrays and objects. */
  maxDepth: number;
  /** INTAKE_BODY_TIMEOUT_MS: from the start of reading (admission) until the last byte has arrived. */
  bodyTimeoutMs: number;
}

const JSON_TYPES = ['application/json', 'application/*+json'];
const ENCODINGS = new Set(['identity', 'gzip', 'x-gzip', 'deflate', 'br']);
/** Issues of one kind named in one answer (a body full of bad strings gets a short answer). */
const MAX_ISSUES = 20;
/** Characters of a key kept in a path or message. */
const KEY_CHARS = 64;

const refusedCounter = new Counter({
  name: 'referral_body_refused_total',
  help: 'Request bodies refused by the JSON body reader, by reason',
  labelNames: ['reason'] as const,
  registers: [metricsRegistry],
});

type Reason = 'too-large' | 'encoding' | 'charset' | 'timeout' | 'aborted' | 'decompress' | 'utf8' | 'syntax' | 'depth' | 'duplicate-key' | 'unicode';

/** 415 for a Content-Encoding the reader does not undo. */
const unsupportedEncoding = (): Failure =>
  refused(
    'encoding',
    new Failure('unsupported', {
      code: 'not-supported',
      message: 'unsupported Content-Encoding: send identity, gzip, deflate or br',
      expression: 'Content-Encoding',
    })
  );

function refused(reason: Reason, err: Failure): Failure {
  refusedCounter.inc({ reason });
  return err;
}

/** The request says it has a body (Node gives a request without either header none). */
export function hasBody(req: Request): boolean {
  return req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0');
}

function declaredLength(req: Request): number | undefined {
  const v = req.headers['content-length'];
  if (v === undefined) return undefined;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : Number.POSITIVE_INFINITY;
}

/** The body's Content-Encoding, lower-cased; `identity` when none. */
export function contentEncoding(req: Request): string {
  const v = req.headers['content-encoding'];
  return (v ?? 'identity').trim().toLowerCase() || 'identity';
}

function charsetOf(req: Request): string | undefined {
  const type = req.headers['content-type'];
  if (!type) return undefined;
  for (const param of type.split(';').slice(1)) {
    const i = param.indexOf('=');
    if (i < 0) continue;
    if (param.slice(0, i).trim().toLowerCase() === 'charset') {
      return param
        .slice(i + 1)
        .trim()
        .replace(/^"(.*)"$/, '$1')
        .toLowerCase();
    }
  }
  return undefined;
}

const tooLarge = (maxBodyBytes: number): Failure =>
  refused(
    'too-large',
    new Failure('too-large', { code: 'too-costly', message: `the body is larger than the limit of ${maxBodyBytes} bytes (MAX_BODY_BYTES)`, expression: '$' })
  );

/**
 * What can be refused from the headers alone, before the intake budget is waited for: a declared length over
 * MAX_BODY_BYTES (413, and the connection is closed so the client stops sending), an unknown Content-Encoding
 * or a charset other than UTF-8 (415).
 */
export function bodyPrecheck(opts: Pick<JsonBodyOptions, 'maxBodyBytes'>): RequestHandler {
  return (req, res, next) => {
    if (!hasBody(req)) {
      next();
      return;
    }
    const declared = declaredLength(req);
    if (declared !== undefined && declared > opts.maxBodyBytes) {
      closeAfterAnswer(req, res);
      next(tooLarge(opts.maxBodyBytes));
      return;
    }
    const encoding = contentEncoding(req);
    if (!ENCODINGS.has(encoding)) {
      next(unsupportedEncoding());
      return;
    }
    const charset = charsetOf(req);
    if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
      next(
        refused(
          'charset',
          new Failure('unsupported', { code: 'not-supported', message: 'unsupported charset: the body must be UTF-8', expression: 'Content-Type' })
        )
      );
      return;
    }
    next();
  };
}

/** The rest of the body is not read: answer with Connection: close, discard what still arrives until the socket closes. */
export function closeAfterAnswer(req: Request, res: Response): void {
  res.setHeader('Connection', 'close');
  req.resume();
}

/** The JSON body reader; mount it after bodyPrecheck (and after the intake budget where there is one). */
export function jsonBody(opts: JsonBodyOptions): RequestHandler {
  return (req, res, next) => {
    if (!hasBody(req) || req.readableEnded || !req.is(JSON_TYPES)) {
      // No body, or not JSON (requireJson has refused those with a body): nothing to read.
      next();
      return;
    }
    readBody(req, res, opts).then(
      (body) => {
        parseChecked(body, opts.maxDepth).then(
          (value) => {
            req.body = value;
            next();
          },
          (err: unknown) => next(err)
        );
      },
      (err: unknown) => next(err)
    );
  };
}

/**
 * The body of a text format (HL7 v2 ER7) as a string, read with the same limits as JSON (MAX_BODY_BYTES,
 * INTAKE_BODY_TIMEOUT_MS, Content-Encoding). HL7 v2 is ASCII unless MSH-18 says otherwise; the bytes are decoded as
 * UTF-8 (ASCII is a subset) with invalid sequences replaced, so a message in another charset still parses and its
 * structure can be answered.
 */
export function textBody(opts: Omit<JsonBodyOptions, 'maxDepth'>, types: readonly string[]): RequestHandler {
  return (req, res, next) => {
    if (!hasBody(req) || req.readableEnded || !req.is([...types])) {
      next();
      return;
    }
    readBody(req, res, { ...opts, maxDepth: 0 }).then(
      (body) => {
        req.body = body.bytes.toString('utf8');
        next();
      },
      (err: unknown) => next(err)
    );
  };
}

/**
 * Receives the body, undoing Content-Encoding, within MAX_BODY_BYTES (decoded, and the bytes on the wire too)
 * and INTAKE_BODY_TIMEOUT_MS, as bytes (parseChecked decodes them). Rejects with the Failure to answer; on any failure
 * the intake budget is released at once and the connection is closed after the answer.
 */
function readBody(req: Request, res: Response, opts: JsonBodyOptions): Promise<ReceivedBody> {
  return new Promise<ReceivedBody>((resolve, reject) => {
    const encoding = contentEncoding(req);
    const declared = declaredLength(req);
    let decoder: Transform | undefined;
    if (encoding === 'gzip' || encoding === 'x-gzip') decoder = createGunzip();
    else if (encoding === 'deflate') decoder = createInflate();
    else if (encoding === 'br') decoder = createBrotliDecompress();
    else if (encoding !== 'identity') {
      reject(unsupportedEncoding());
      return;
    }
    if (declared !== undefined && declared > opts.maxBodyBytes) {
      closeAfterAnswer(req, res);
      reject(tooLarge(opts.maxBodyBytes));
      return;
    }

    // An identity body of known length is copied into one buffer of that length as it arrives. Otherwise (a
    // compressed or chunked body) the chunks are kept while they are few; past SMALL_UNKNOWN_BYTES they move into
    // one buffer of MAX_BODY_BYTES, of which only the pages written take memory, so a large body is never held
    // twice (chunks and their join).
    let whole: Buffer | undefined = decoder === undefined && declared !== undefined ? Buffer.allocUnsafe(declared) : undefined;
    let chunks: Buffer[] = [];
    let decoded = 0;
    let wire = 0;
    let settled = false;

    const cleanup = (): void => {
      settled = true;
      clearTimeout(timer);
      req.off('data', onWire);
      req.off('end', onWireEnd);
      req.off('error', onAborted);
      req.off('close', onClose);
      if (decoder) {
        decoder.off('data', onDecoded);
        decoder.off('end', onDone);
        decoder.off('error', onDecodeError);
        req.unpipe(decoder);
        decoder.destroy();
        decoder.on('error', () => undefined);
      }
    };
    const fail = (err: Failure): void => {
      if (settled) return;
      cleanup();
      if (whole) freeNow(whole);
      whole = undefined;
      chunks = [];
      releaseIntake(req);
      closeAfterAnswer(req, res);
      reject(err);
    };

    const onDecoded = (chunk: Buffer): void => {
      if (settled) return;
      decoded += chunk.length;
      if (decoded > opts.maxBodyBytes) {
        fail(tooLarge(opts.maxBodyBytes));
        return;
      }
      if (!whole && decoded > SMALL_UNKNOWN_BYTES) {
        whole = Buffer.allocUnsafe(opts.maxBodyBytes);
        let at = 0;
        for (const c of chunks) at += c.copy(whole, at);
        chunks = [];
      }
      if (whole) {
        if (decoded > whole.length) {
          fail(tooLarge(opts.maxBodyBytes)); // more than declared: Node's parser does not allow it, but never overrun
          return;
        }
        chunk.copy(whole, decoded - chunk.length);
      } else {
        chunks.push(chunk);
      }
    };
    const onWire = (chunk: Buffer): void => {
      wire += chunk.length;
      if (decoder && wire > opts.maxBodyBytes) fail(tooLarge(opts.maxBodyBytes));
      else if (!decoder) onDecoded(chunk);
    };
    const onDone = (): void => {
      if (settled) return;
      cleanup();
      let body: ReceivedBody;
      // Only a buffer allocated here may be freed at once (a chunk may share memory with others).
      if (whole) {
        body = { bytes: decoded === whole.length ? whole : whole.subarray(0, decoded), allocation: whole };
      } else if (chunks.length === 1) {
        body = { bytes: chunks[0], allocation: undefined };
      } else {
        const joined = Buffer.concat(chunks, decoded);
        body = { bytes: joined, allocation: joined };
      }
      whole = undefined;
      chunks = [];
      resolve(body);
    };
    const onWireEnd = (): void => {
      if (!decoder) onDone();
    };
    const onDecodeError = (): void => {
      let name = 'gzip';
      if (encoding === 'br') name = 'brotli';
      else if (encoding === 'deflate') name = 'deflate';
      fail(
        refused(
          'decompress',
          new Failure('malformed', { code: 'structure', message: `the body is not valid ${name} data (Content-Encoding: ${encoding})`, expression: '$' })
        )
      );
    };
    const onAborted = (): void => {
      fail(refused('aborted', new Failure('malformed', { code: 'incomplete', message: 'the request was aborted' })));
    };
    const onClose = (): void => {
      if (!req.complete) onAborted();
    };

    const timer = setTimeout(() => {
      fail(
        refused(
          'timeout',
          new Failure('timeout', {
            code: 'timeout',
            message: `the body did not arrive within ${opts.bodyTimeoutMs} ms (INTAKE_BODY_TIMEOUT_MS)`,
            expression: '$',
          })
        )
      );
    }, opts.bodyTimeoutMs);

    req.on('data', onWire);
    req.on('end', onWireEnd);
    req.on('error', onAborted);
    req.on('close', onClose);
    if (decoder) {
      decoder.on('data', onDecoded);
      decoder.on('end', onDone);
      decoder.on('error', onDecodeError);
      req.pipe(decoder);
    }
  });
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Compressed or chunked bodies are kept as chunks up to this size, then in one buffer. */
const SMALL_UNKNOWN_BYTES = 1024 * 1024;

/** A body as received (Content-Encoding undone); `allocation`: the reader's own buffer it lies in, freed at once when done. */
interface ReceivedBody {
  bytes: Buffer;
  allocation: Buffer | undefined;
}

/** Lets other callbacks (a /healthz probe) run between the heavy synchronous steps of a large body. */
const yieldToLoop = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

const notUtf8 = (): Failure => refused('utf8', new Failure('malformed', { code: 'structure', message: 'the body is not valid UTF-8', expression: '$' }));
const notJson = (): Failure => refused('syntax', new Failure('malformed', { code: 'structure', message: 'the body is not valid JSON', expression: '$' }));

/**
 * The body's bytes to a value: the scan (depth, duplicate keys), JSON.parse, then the Unicode walk. A large
 * body with long strings (documents) is scanned and parsed as bytes (parseBytes: no string of the whole body,
 * the documents' text outside the heap); any other is decoded to text first. The bytes are freed as soon as
 * they are no longer needed.
 */
/** A JSON text received whole (a multipart part), parsed with the same checks as a JSON body (depth, duplicate keys, Unicode). */
export function parseJsonBytes(bytes: Buffer, maxDepth: number): Promise<unknown> {
  return parseChecked({ bytes, allocation: undefined }, maxDepth);
}

async function parseChecked(body: ReceivedBody, maxDepth: number): Promise<unknown> {
  const { bytes } = body;
  if (bytes.length === 0) return {}; // as express.json: an empty JSON body is an empty object
  const large = bytes.length > LARGE_BODY_CHARS;
  let value: unknown;
  let parsed = false;
  try {
    if (large) {
      await yieldToLoop();
      const longs: LongString[] = [];
      const problem = scanJsonBytes(bytes, maxDepth, longs);
      if (problem) throw problemError(problem, maxDepth);
      if (longs.length > 0) {
        await yieldToLoop();
        try {
          value = parseBytes(bytes, longs);
          parsed = true;
        } catch (err) {
          throw err instanceof NotUtf8Error ? notUtf8() : notJson();
        }
      }
    }
    if (!parsed) {
      let text: string;
      try {
        text = utf8.decode(bytes);
      } catch {
        throw notUtf8();
      }
      if (body.allocation) freeNow(body.allocation); // before JSON.parse makes its copy (the finally is then a no-op)
      if (!large) {
        const problem = scanJson(text, maxDepth);
        if (problem) throw problemError(problem, maxDepth);
      }
      try {
        value = JSON.parse(text);
      } catch {
        throw notJson();
      }
    }
  } finally {
    if (body.allocation) freeNow(body.allocation);
  }
  if (large) await yieldToLoop();
  const bad = illFormedStrings(value, MAX_ISSUES);
  if (bad.length > 0) {
    refusedCounter.inc({ reason: 'unicode' });
    throw new Failure(
      'invalid',
      bad.map((b): IssueInput => {
        const expression = expressionOf(b.path);
        return {
          code: 'invalid',
          expression,
          message: b.inKey
            ? `${expression}: a property name is not well-formed Unicode (a lone UTF-16 surrogate)`
            : `${expression}: the text is not well-formed Unicode (a lone UTF-16 surrogate); FHIR strings must be valid Unicode`,
        };
      })
    );
  }
  return value;
}

const shortKey = (k: string): string => (k.length > KEY_CHARS ? `${k.slice(0, KEY_CHARS)}…` : k);

/** A FHIRPath-like expression (patient.identifiers[0].value) with each key cut to KEY_CHARS characters. */
export function expressionOf(path: ReadonlyArray<PathSegment>): string {
  return pathToExpression(path.map((p) => (typeof p === 'string' ? shortKey(p) : p)));
}

function problemError(p: ScanProblem, maxDepth: number): Failure {
  if (p.kind === 'depth') {
    const expression = expressionOf(p.path);
    refusedCounter.inc({ reason: 'depth' });
    return new Failure('malformed', {
      code: 'too-costly',
      expression,
      message: `${expression}: the JSON nests arrays and objects deeper than the limit of ${maxDepth} levels (MAX_JSON_DEPTH)`,
    });
  }
  if (p.kind === 'duplicate') {
    const where = expressionOf(p.path);
    const expression = expressionOf([...p.path, p.key]);
    refusedCounter.inc({ reason: 'duplicate-key' });
    return new Failure('malformed', {
      code: 'structure',
      expression,
      message: `${expression}: the key ${JSON.stringify(shortKey(p.key))} appears more than once in ${where === '$' ? 'the body' : where}; each key may appear once`,
    });
  }
  refusedCounter.inc({ reason: 'syntax' });
  return new Failure('malformed', { code: 'structure', message: 'the body is not valid JSON', expression: '$' });
}

/**
 * The strings (values, and keys: `inKey`, with the path of their object) that are not well-formed Unicode,
 * at most `max`, in document order. Iterative; the depth is bounded by the scan anyway.
 */
export function illFormedStrings(root: unknown, max: number): Array<{ path: PathSegment[]; inKey: boolean }> {
  const out: Array<{ path: PathSegment[]; inKey: boolean }> = [];
  if (typeof root === 'string') {
    if (!root.isWellFormed()) out.push({ path: [], inKey: false });
    return out;
  }
  if (root === null || typeof root !== 'object') return out;
  interface Frame {
    node: Record<string, unknown> | unknown[];
    keys: string[] | undefined;
    i: number;
    name: PathSegment;
  }
  const frameOf = (node: object, name: PathSegment): Frame =>
    Array.isArray(node) ? { node, keys: undefined, i: 0, name } : { node: node as Record<string, unknown>, keys: Object.keys(node), i: 0, name };
  const stack: Frame[] = [frameOf(root, '')];
  const pathHere = (extra?: PathSegment): PathSegment[] => {
    const p = stack.slice(1).map((f) => f.name);
    if (extra !== undefined) p.push(extra);
    return p;
  };
  while (stack.length > 0) {
    const f = stack[stack.length - 1];
    const length = f.keys ? f.keys.length : (f.node as unknown[]).length;
    if (f.i >= length) {
      stack.pop();
      continue;
    }
    const at = f.i++;
    let name: PathSegment;
    let child: unknown;
    if (f.keys) {
      name = f.keys[at];
      if (!name.isWellFormed()) {
        out.push({ path: pathHere(), inKey: true });
        if (out.length >= max) return out;
      }
      child = (f.node as Record<string, unknown>)[name];
    } else {
      name = at;
      child = (f.node as unknown[])[at];
    }
    if (typeof child === 'string') {
      if (!child.isWellFormed()) {
        out.push({ path: pathHere(name), inKey: false });
        if (out.length >= max) return out;
      }
    } else if (child !== null && typeof child === 'object') {
      stack.push(frameOf(child, name));
    }
  }
  return out;
}
