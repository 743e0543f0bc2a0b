import type { DoctorReport, DoctorStatus } from './types';

const STATUS_WORD: Record<DoctorStatus, string> = { ok: 'ok', warn: 'WARN', fail: 'FAIL', skip: 'skip' };

function wrap(text: string, width: number): string[] {
  if (width < 20) return [text];
  const out: string[] = [];
  let current = '';
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (current === '') {
      current = word;
    } else if (current.length + 1 + word.length <= width) {
      current += ` ${word}`;
    } else {
      out.push(current);
      current = word;
    }
    while (current.length > width) {
      out.push(current.slice(0, width));
      current = current.slice(width);
    }
  }
  if (current !== '') out.push(current);
  return out.length ? out : [''];
}

/**
 * The report as a terminal table: status word (ok, WARN, FAIL, skip), check, detail; advice on its own
 * line under the detail ("→ ..."); then the verdict, suggested settings and cleanup. No colours.
 */
export function formatDoctorTable(report: DoctorReport, opts: { width?: number } = {}): string {
  const width = Math.max(80, opts.width ?? 120);
  const labelWidth = Math.max('CHECK'.length, ...report.checks.map((c) => c.label.length));
  const statusWidth = 6;
  const indent = ' '.repeat(statusWidth + 2 + labelWidth + 2);
  const detailWidth = width - indent.length;
  const out: string[] = [];
  out.push(`referral-gateway doctor: destination "${report.destination}" at ${report.baseUrl}`);
  out.push(`checked ${report.checkedAt}`);
  out.push('');
  out.push(`${'STATUS'.padEnd(statusWidth)}  ${'CHECK'.padEnd(labelWidth)}  DETAIL`);
  for (const c of report.checks) {
    const lines = wrap(c.detail, detailWidth);
    out.push(`${STATUS_WORD[c.status].padEnd(statusWidth)}  ${c.label.padEnd(labelWidth)}  ${lines[0]}`);
    for (const more of lines.slice(1)) out.push(indent + more);
    if (c.advice) {
      const advice = wrap(`→ ${c.advice}`, detailWidth);
      for (const a of advice) out.push(indent + a);
    }
  }
  out.push('');
  const fails = report.checks.filter((c) => c.status === 'fail').length;
  const warns = report.checks.filter((c) => c.status === 'warn').length;
  out.push(
    report.canWork
      ? `Result: the gateway CAN work with this destination as configured${warns ? ` (${warns} warning${warns === 1 ? '' : 's'})` : ''}.`
      : `Result: the gateway CANNOT work with this destination as configured: ${fails} check${fails === 1 ? '' : 's'} failed${warns ? `, ${warns} warning${warns === 1 ? '' : 's'}` : ''}.`
  );
  const keys = Object.keys(report.suggested);
  out.push(keys.length ? `Suggested settings for this destination: ${JSON.stringify(report.suggested)}` : 'Suggested settings: none (nothing to change).');
  out.push(
    report.cleanup.left.length === 0
      ? `Cleanup: deleted ${report.cleanup.deleted} probe resource${report.cleanup.deleted === 1 ? '' : 's'}.`
      : `Cleanup: deleted ${report.cleanup.deleted}; could not delete ${report.cleanup.left.length}: ${report.cleanup.left.join(', ')}`
  );
  return out.join('\n') + '\n';
}
