import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';

/**
 * The capability folders of src/ form no cycle, counting type imports too (import-x/no-cycle checks files; this
 * checks folders): each folder can be read, tested and replaced knowing only what it imports.
 */
describe('folder dependencies', () => {
  const src = 'src';
  const files = (dir: string): string[] =>
    readdirSync(dir).flatMap((name) => {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) return files(p);
      return p.endsWith('.ts') ? [p] : [];
    });
  /** The folder a path under src/ belongs to ('(root)' for src/*.ts). */
  const folderOf = (path: string): string => {
    const rel = relative(src, path);
    const isDir = (() => {
      try {
        return statSync(path).isDirectory();
      } catch {
        return false;
      }
    })();
    return rel.includes('/') || isDir ? rel.split('/')[0] : '(root)';
  };

  const graph = new Map<string, Set<string>>();
  for (const file of files(src)) {
    const from = folderOf(file);
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(/^(?:import|export)\b[^;]*?\bfrom\s+'(\.[^']+)'/gms)) {
      const to = folderOf(normalize(join(dirname(file), m[1])));
      if (to !== from && !to.startsWith('..')) (graph.get(from) ?? graph.set(from, new Set()).get(from))?.add(to);
    }
  }

  /** Strongly connected components with more than one folder (Tarjan). */
  const cycles = (): string[][] => {
    const index = new Map<string, number>();
    const low = new Map<string, number>();
    const stack: string[] = [];
    const onStack = new Set<string>();
    const out: string[][] = [];
    let next = 0;
    const visit = (v: string): void => {
      index.set(v, next);
      low.set(v, next++);
      stack.push(v);
      onStack.add(v);
      for (const w of graph.get(v) ?? []) {
        if (!index.has(w)) {
          visit(w);
          low.set(v, Math.min(low.get(v) as number, low.get(w) as number));
        } else if (onStack.has(w)) {
          low.set(v, Math.min(low.get(v) as number, index.get(w) as number));
        }
      }
      if (low.get(v) === index.get(v)) {
        const component: string[] = [];
        let w: string | undefined;
        do {
          w = stack.pop() as string;
          onStack.delete(w);
          component.push(w);
        } while (w !== v);
        if (component.length > 1) out.push(component.sort());
      }
    };
    for (const v of graph.keys()) if (!index.has(v)) visit(v);
    return out;
  };

  test('the graph was read (the composition root reaches the capabilities)', () => {
    expect([...(graph.get('(root)') ?? [])]).toEqual(expect.arrayContaining(['api', 'delivery', 'store', 'referral', 'sandbox']));
  });

  test('no folder-level import cycle', () => {
    expect(cycles()).toEqual([]);
  });

  test('the leaves import nothing of ours: outcomes, json, model', () => {
    expect([...(graph.get('outcomes') ?? [])]).toEqual([]);
    expect([...(graph.get('json') ?? [])]).toEqual([]);
    expect([...(graph.get('model') ?? [])]).toEqual([]);
  });
});
