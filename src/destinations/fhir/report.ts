import type { Attachment, DiagnosticReport, DocumentReference, Task } from '@medplum/fhirtypes';
import { centreUnavailable, notFound } from '../../outcomes';
import type { FhirClient } from './client';
import type { StoredReferral } from '../../model';
import type { ReportContent } from '../adapter';

/** Reads the bytes of a referral's opinion report from the centre: inline data, a Binary, or a URL under the centre's base. */
export async function readReportContent(client: FhirClient, referral: StoredReferral): Promise<ReportContent> {
  if (!referral.report) {
    throw notFound('no report');
  }
  const [type, id, , index] = referral.report.reference.split('/');
  let attachment: Attachment | undefined;
  try {
    if (type === 'Task') {
      // An opinion sent inline in Task.output[index].valueAttachment
      const task = await client.read<Task>('Task', id);
      attachment = task.output?.[Number(index)]?.valueAttachment;
    } else {
      const res = await client.read<DocumentReference | DiagnosticReport>(type as 'DocumentReference', id);
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
    return { contentType, body: Buffer.from(attachment.data, 'base64') };
  }
  if (attachment.url) {
    try {
      const got = await client.readUrl(attachment.url, { accept: `${contentType}, application/fhir+json;q=0.1` });
      const binary = got.json as { resourceType?: string; data?: string; contentType?: string } | undefined;
      if (binary?.resourceType === 'Binary') {
        // The server answered with the Binary resource itself rather than its raw bytes.
        return { contentType: binary.contentType ?? contentType, body: Buffer.from(binary.data ?? '', 'base64') };
      }
      return { contentType: got.contentType ?? contentType, body: got.body };
    } catch (err) {
      throw centreUnavailable(`the report content could not be fetched: ${(err as Error).message}`, err);
    }
  }
  throw notFound('the report attachment has neither data nor url');
}
