import { reportHeaders } from '../../src/api/referrals-router';
import { type CheckIssue } from '../../src/referral/check';
import { capIssues } from '../../src/outcomes';
import { centreContentType, centreText, MAX_STATUS_REASON_CHARS } from '../../src/tracking/centre-text';

describe('text and types a centre supplies', () => {
  test('status reasons are cut to the documented length, never inside a surrogate pair, and made well-formed', () => {
    expect(centreText('Accepted by the tumour board', MAX_STATUS_REASON_CHARS)).toBe('Accepted by the tumour board');
    const long = centreText('a'.repeat(5000), MAX_STATUS_REASON_CHARS) as string;
    expect(long).toHaveLength(MAX_STATUS_REASON_CHARS);
    expect(long.endsWith('…')).toBe(true);
    const emoji = centreText(`${'a'.repeat(8)}😀😀`, 10) as string;
    expect(emoji.isWellFormed()).toBe(true);
    expect(emoji).toBe(`${'a'.repeat(8)}…`);
    expect(centreText('bad \ud800 half\u0000', 100)).toBe('bad \ufffd half');
    expect(centreText(undefined, 10)).toBeUndefined();
  });

  test('content types are kept only when well-formed', () => {
    expect(centreContentType('application/PDF; charset=binary')).toBe('application/pdf');
    expect(centreContentType('text/html')).toBe('text/html');
    expect(centreContentType('<script>')).toBeUndefined();
    expect(centreContentType('text/plain\r\nSet-Cookie: a=b')).toBeUndefined();
  });

  test.each([
    ['application/pdf', 'inline', /^default-src 'none'; object-src 'self'/],
    ['text/plain', 'inline', /^sandbox;/],
    ['image/png', 'inline', /^sandbox;/],
    ['text/html', 'attachment', /^sandbox;/],
    ['image/svg+xml', 'attachment', /^sandbox;/],
    ['application/javascript', 'attachment', /^sandbox;/],
    [undefined, 'attachment', /^sandbox;/],
  ])('a %s report is served %s', (type, disposition, csp) => {
    const h = reportHeaders('ref_1', type);
    expect(h['Content-Disposition'].split(';')[0]).toBe(disposition);
    expect(h['X-Content-Type-Options']).toBe('nosniff');
    expect(h['Content-Security-Policy']).toMatch(csp);
  });

  test('an error lists at most the cap, then one issue counting the rest', () => {
    const issues: CheckIssue[] = Array.from({ length: 250 }, (_, i) => ({ code: 'invalid', expression: `x[${i}]`, message: `x[${i}]: bad`, detail: 'bad' }));
    const capped = capIssues(issues, 100);
    expect(capped).toHaveLength(101);
    expect(capped[100]).toMatchObject({ code: 'too-costly', severity: 'information', detail: '150 more issues not listed (at most 100 are)' });
    expect(capIssues(issues.slice(0, 3), 100)).toHaveLength(3);
  });
});
