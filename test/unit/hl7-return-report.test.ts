import { Readable } from 'node:stream';
import { collectReport, reportBytesWithin, ReportTooLarge } from '../../src/hl7return';

/** The report in an HL7 v2 message (OBX-5, Base64) is read whole, but only up to what the message may carry. */
describe('the report for an HL7 v2 message', () => {
  const chunks = (n: number, size: number): Buffer[] => Array.from({ length: n }, (_, i) => Buffer.alloc(size, i));

  test('its Base64 and the other segments fit in HL7_MAX_MESSAGE_BYTES', () => {
    const max = 25 * 1024 * 1024;
    const cap = reportBytesWithin(max);
    expect(Math.ceil(cap / 3) * 4).toBeLessThanOrEqual(max - 16 * 1024);
    expect(Math.ceil((cap + 3) / 3) * 4).toBeGreaterThan(max - 16 * 1024);
    expect(reportBytesWithin(1024)).toBe(0);
  });

  test('a report within the cap is collected whole, with its type', async () => {
    const parts = chunks(4, 1000);
    const got = await collectReport({ contentType: 'application/pdf', body: Readable.from(parts) }, 4000);
    expect(got).toEqual({ contentType: 'application/pdf', body: Buffer.concat(parts) });
  });

  test('a larger one stops the read and says so: by its announced length before any byte, or once too many bytes came', async () => {
    const announced = Readable.from(chunks(4, 1000));
    await expect(collectReport({ contentType: 'application/pdf', bytes: 4000, body: announced }, 3999)).rejects.toBeInstanceOf(ReportTooLarge);
    expect(announced.destroyed).toBe(true);
    let pulled = 0;
    const endless = new Readable({
      read() {
        pulled++;
        this.push(Buffer.alloc(1000));
      },
    });
    await expect(collectReport({ contentType: 'application/pdf', body: endless }, 3500)).rejects.toThrow(
      /larger than the 3500 bytes an HL7 v2 message here may carry/
    );
    expect(endless.destroyed).toBe(true);
    expect(pulled).toBeLessThan(10);
  });
});
