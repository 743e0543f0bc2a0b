import { createHash } from 'node:crypto';
import { withoutDocumentBytes } from '../../src/model';
import { closedStatuses, cutoff } from '../../src/retention/policy';
import { terminalStatuses } from '../../src/tracking/state';

describe('retention policy', () => {
  const pdf = Buffer.from('%PDF-1.7 pathology report, 3 pages');

  test('inline bytes are replaced by their size and SHA-256; documents sent by URL stay as they were', () => {
    const docs = [
      { kind: 'pathology-report', title: 'Core biopsy', contentType: 'application/pdf', data: pdf.toString('base64') },
      { kind: 'imaging-study', title: 'MRI', contentType: 'application/dicom', url: 'https://pacs.example.org/studies/1' },
    ];
    const { documents, removed } = withoutDocumentBytes(docs, '2026-12-30T00:00:00.000Z');
    expect(removed).toBe(1);
    expect(documents[0]).toEqual({
      kind: 'pathology-report',
      title: 'Core biopsy',
      contentType: 'application/pdf',
      dataRemoved: { bytes: pdf.length, sha256: createHash('sha256').update(pdf).digest('hex'), removedAt: '2026-12-30T00:00:00.000Z' },
    });
    expect(documents[1]).toBe(docs[1]);
    // The input is not changed (the function is pure).
    expect(docs[0].data).toBe(pdf.toString('base64'));
  });

  test('stripping twice removes nothing more', () => {
    const once = withoutDocumentBytes([{ kind: 'other', data: pdf.toString('base64') }], '2026-12-30T00:00:00.000Z');
    const twice = withoutDocumentBytes(once.documents, '2027-01-30T00:00:00.000Z');
    expect(twice.removed).toBe(0);
    expect(twice.documents).toEqual(once.documents);
  });

  test('closed statuses are final ones an operator cannot re-queue (delivery-failed is not closed)', () => {
    for (const s of closedStatuses) expect(terminalStatuses.has(s)).toBe(true);
    expect(closedStatuses).not.toContain('delivery-failed');
  });

  test('the cut-off is whole days before now', () => {
    expect(cutoff(new Date('2026-12-31T12:00:00.000Z'), 30)).toBe('2026-12-01T12:00:00.000Z');
  });
});
