import { type Variable, variables } from './variables';

/** The README's configuration table sits between these markers; `npx tsx src/cli/config-table.ts --write` rewrites it. */
export const TABLE_START = '<!-- config-table:start -->';
export const TABLE_END = '<!-- config-table:end -->';

/** The schema's own default as the table shows it (text in backticks), or undefined when it has none. */
export function schemaDefault(v: Variable): string | undefined {
  const parsed = v.schema?.safeParse(undefined);
  if (!parsed?.success || parsed.data === undefined) return undefined;
  return typeof parsed.data === 'string' ? `\`${parsed.data}\`` : String(parsed.data);
}

/** The default column: the declared text, else the schema's default, else a dash. */
export function shownDefault(v: Variable): string {
  return v.shownDefault ?? schemaDefault(v) ?? '—';
}

/** The markdown table of every declared variable, in declaration order. */
export function configTable(): string {
  const cell = (s: string): string => s.replace(/\|/g, '\\|');
  const rows = Object.entries(variables as Record<string, Variable>).map(([name, v]) => `| \`${name}\` | ${cell(shownDefault(v))} | ${cell(v.doc)} |`);
  return ['| Variable | Default | Meaning |', '|---|---|---|', ...rows].join('\n');
}

function region(readme: string): { start: number; end: number } {
  const start = readme.indexOf(TABLE_START);
  const end = readme.indexOf(TABLE_END);
  if (start < 0 || end < start) throw new Error(`README.md has no ${TABLE_START} ... ${TABLE_END} region for the configuration table`);
  return { start: start + TABLE_START.length, end };
}

/** The table now between the markers of `readme`. */
export function readmeConfigTable(readme: string): string {
  const { start, end } = region(readme);
  return readme.slice(start, end).trim();
}

/** `readme` with the region between the markers replaced by `table`; blank lines around it keep the comments out of the table. */
export function withConfigTable(readme: string, table: string = configTable()): string {
  const { start, end } = region(readme);
  return `${readme.slice(0, start)}\n\n${table}\n\n${readme.slice(end)}`;
}
