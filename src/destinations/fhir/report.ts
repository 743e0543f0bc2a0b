import { Readable } from 'node:stream';
import type { Attachment, DiagnosticReport, DocumentReference, Task } from '@medplum/fhirtypes';
import { centreUnavailable, notFound } from '../../outcomes';
import type { FhirClient } from './client';
import type { StoredReferral } from '../../model';
import type { ReadReportOptions, ReportContent } from '../adapter';

/**
 * The most of a JSON answer read to find a Binary resource in it (a server that answers the attachment URL with
 * the Binary as FHIR JSON rather than its raw bytes): base64 of a report of about 24 MiB. Medplum refuses JSON
 * strings over 1 MB, so such answers are small; raw bytes are streamed whatever their size.
 */
export const MAX_JSON_REPORT_BYTES = 32 * 1024 * 1024;

/**
 * The bytes of a referral's opinion report from the centre, as a stream: inline `data` (already in memory with
 * the resource, decoded), or the attachment's `url` read as it arrives: a Binary under the centre's base (raw,
 * with the report's type in Accept), or an attachment URL the server gave outside it (presigned storage, when
 * the destination allows it; without the gateway's credentials). An answer that is the Binary resource as JSON
 * is read whole (at most MAX_JSON_REPORT_BYTES) and its data decoded. The resource is read again for every call,
 * so a presigned URL (Medplum's are valid about an hour) is always a fresh one.
 * Failures before the first byte of the report are Failures (404 nothing to read, 502 the centre did not
 * return it); once the stream is handed over, a break in the centre's answer fails the stream.
 */
export async function readReportContent(client: FhirClient, referral: StoredReferral, opts: ReadReportOptions = {}): Promise<ReportContent> {
  if (!referral.report) {
    throw notFound('no report');
  }
  const [type, id, , index] = referral.report.reference.split('/');
  let attachment: Attachment | undefined;
  try {
    if (type === 'Task') {
      // An opinion sent inline in Task.output[index].valueAttachment
      const task = await client.read<Task>('Task', id, { signal: opts.signal });
      attachment = task.output?.[Number(index)]?.valueAttachment;
    } else {
      const res = await client.read<DocumentReference | DiagnosticReport>(type as 'DocumentReference', id, { signal: opts.signal });
      attachment = res.resourceType === 'DocumentReference' ? res.content?.[0]?.attachment : (res as DiagnosticReport).presentedForm?.[0];
    }
  } catch (err) {
    throw centreUnavailable(`the centre's server did not return the report: ${(err as Error).message}`, err);
  }
  if (!attachment) {
    throw notFound('the report has no attachment');
  }
  const contentType = attachment.contentType ?? 'application/octet-stream';
  if (attachment.data) {
    return inMemory(contentType, Buffer.from(attachment.data, 'base64'));
  }
  if (attachment.url) {
    return fromUrl(client, attachment.url, contentType, opts);
  }
  throw notFound('the report attachment has neither data nor url');
}

async function fromUrl(client: FhirClient, url: string, contentType: string, opts: ReadReportOptions): Promise<ReportContent> {
  const failed = (err: unknown): Error => centreUnavailable(`the report content could not be fetched: ${(err as Error).message}`, err);
  let got;
  try {
    got = await client.openUrl(url, { accept: `${contentType}, application/fhir+json;q=0.1`, signal: opts.signal });
  } catch (err) {
    throw failed(err);
  }
  const declared = contentType.split(';')[0].trim().toLowerCase();
  const json = got.contentType === 'application/fhir+json' || (/[/+]json$/.test(got.contentType) && !/[/+]json$/.test(declared));
  if (json) {
    // Perhaps the Binary resource itself rather than its raw bytes.
    let bytes: Buffer;
    try {
      bytes = await collect(got.body, MAX_JSON_REPORT_BYTES);
    } catch (err) {
      throw failed(err);
    }
    const binary = parseObject(bytes);
    if (binary?.resourceType === 'Binary') {
      const data = typeof binary.data === 'string' ? binary.data : '';
      return inMemory(typeof binary.contentType === 'string' ? binary.contentType : contentType, Buffer.from(data, 'base64'));
    }
    return inMemory(got.contentType, bytes);
  }
  let body: Readable;
  try {
    body = await primed(got.body);
  } catch (err) {
    throw failed(err);
  }
  return { contentType: got.contentType, ...(got.contentLength !== undefined ? { bytes: got.contentLength } : {}), body };
}

function inMemory(contentType: string, bytes: Buffer): ReportContent {
  return { contentType, bytes: bytes.length, body: Readable.from(bytes.length > 0 ? [bytes] : [], { objectMode: false }) };
}

/**
 * The stream once its first chunk has come (or its end): a failure before any byte is the caller's to answer
 * (an OperationOutcome), not a broken transfer. The chunk is put back in front.
 */
function primed(body: Readable): Promise<Readable> {
  return new Promise<Readable>((resolve, reject) => {
    const cleanup = (): void => {
      body.off('data', onData);
      body.off('end', onEnd);
      body.off('error', onError);
    };
    const onData = (chunk: Buffer): void => {
      body.pause();
      cleanup();
      body.unshift(chunk);
      resolve(body);
    };
    const onEnd = (): void => {
      cleanup();
      resolve(Readable.from([], { objectMode: false }));
    };
    const onError = (err: Error): void => {
      cleanup();
      body.destroy();
      reject(err);
    };
    body.on('data', onData);
    body.once('end', onEnd);
    body.once('error', onError);
  });
}

/** The whole stream, refused (and the stream destroyed) past `cap` bytes. */
async function collect(body: Readable, cap: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of body) {
    total += (chunk as Buffer).length;
    if (total > cap) {
      body.destroy();
      throw new Error(`the answer is JSON larger than ${cap} bytes, not the report's raw bytes`);
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}

function parseObject(bytes: Buffer): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(bytes.toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}
