import type { Readable } from 'node:stream';
import type { ReportAttachment } from './message';

// The opinion report for an HL7 v2 message: it travels inside the message (OBX-5, ED, Base64), so unlike the
// report route it is held whole, and only up to what a message may carry.

/** A report as the destination adapter reads it: a stream, with its length when known. */
export interface ReportStream {
  contentType: string;
  bytes?: number;
  body: Readable;
}

/** Room kept in a message for everything but the report (MSH, PID, ORC, OBR, the OBX fields). */
export const MESSAGE_OVERHEAD_BYTES = 16 * 1024;

/** The largest report whose Base64 fits in a message of `maxMessageBytes` (HL7_MAX_MESSAGE_BYTES) beside the other segments. */
export function reportBytesWithin(maxMessageBytes: number): number {
  return Math.max(0, Math.floor((maxMessageBytes - MESSAGE_OVERHEAD_BYTES) / 4) * 3);
}

/** The report is too large for a message: the status goes back without it, and the referral's history says why. */
export class ReportTooLarge extends Error {
  constructor(readonly maxBytes: number) {
    super(
      `the report is larger than the ${maxBytes} bytes an HL7 v2 message here may carry (HL7_MAX_MESSAGE_BYTES); it can be fetched from the gateway's report URL`
    );
    this.name = 'ReportTooLarge';
  }
}

/**
 * The report's bytes, read whole up to `maxBytes`: a larger one (by its announced length, or once more bytes
 * than that have come) stops the read at the centre and is a ReportTooLarge.
 */
export async function collectReport(report: ReportStream, maxBytes: number): Promise<ReportAttachment> {
  if (report.bytes !== undefined && report.bytes > maxBytes) {
    report.body.destroy();
    throw new ReportTooLarge(maxBytes);
  }
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of report.body) {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
    total += buf.length;
    if (total > maxBytes) {
      report.body.destroy();
      throw new ReportTooLarge(maxBytes);
    }
    chunks.push(buf);
  }
  return { contentType: report.contentType, body: Buffer.concat(chunks) };
}
