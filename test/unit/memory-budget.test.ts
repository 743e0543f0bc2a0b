import { MemoryBudget } from '../../src/memory';

/** The memory budget request bodies and delivery payloads share (MAX_INTAKE_BYTES_IN_FLIGHT, INTAKE_CLIENT_SHARE). */
describe('MemoryBudget', () => {
  const granted = (r: unknown): (() => void) => {
    if (typeof r !== 'function') throw new Error(`not granted: ${String(r)}`);
    return r as () => void;
  };

  test('reservations within the budget are granted at once; one that does not fit waits for a release, in order', async () => {
    const budget = new MemoryBudget({ maxBytes: 100, holderShare: 1 });
    const a = granted(await budget.reserve('a', 60, { waitMs: 1000 }));
    const b = granted(await budget.reserve('b', 40, { waitMs: 1000 }));
    expect(budget.held).toBe(100);
    const order: string[] = [];
    const c = budget.reserve('c', 50, { waitMs: 1000 }).then((r) => (order.push('c'), granted(r)));
    const d = budget.reserve('d', 10, { waitMs: 1000 }).then((r) => (order.push('d'), granted(r)));
    await new Promise((r) => setTimeout(r, 20));
    expect(order).toEqual([]);
    a();
    a(); // twice does nothing
    const [rc, rd] = await Promise.all([c, d]);
    expect(order).toEqual(['c', 'd']);
    expect(budget.held).toBe(100);
    b();
    rc();
    rd();
    expect(budget.held).toBe(0);
  });

  test('a holder over its share is passed over, another goes first; the first reservation of an idle holder always fits its share', async () => {
    const budget = new MemoryBudget({ maxBytes: 100, holderShare: 0.5 });
    const big = granted(await budget.reserve('slow-client', 70, { waitMs: 1000 })); // alone: admitted above its share
    const order: string[] = [];
    const again = budget.reserve('slow-client', 10, { waitMs: 1000 }).then((r) => (order.push('slow-client'), granted(r)));
    const other = budget.reserve('(delivery)', 20, { waitMs: 1000 }).then((r) => (order.push('(delivery)'), granted(r)));
    (await other)();
    expect(order).toEqual(['(delivery)']);
    big();
    (await again)();
    expect(order).toEqual(['(delivery)', 'slow-client']);
    expect(budget.held).toBe(0);
  });

  test('no room in time is a timeout, a caller that gives up is aborted; neither keeps anything', async () => {
    const budget = new MemoryBudget({ maxBytes: 100 });
    const all = granted(await budget.reserve('a', 100, { waitMs: 1000 }));
    expect(await budget.reserve('b', 1, { waitMs: 30 })).toBe('timeout');
    const gone = new AbortController();
    const waiting = budget.reserve('c', 1, { waitMs: 10_000, signal: gone.signal });
    gone.abort();
    expect(await waiting).toBe('aborted');
    all();
    expect(budget.held).toBe(0);
    expect(typeof (await budget.reserve('d', 0, { waitMs: 0 }))).toBe('function');
  });
});
