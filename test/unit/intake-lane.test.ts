import { IntakeLane } from '../../src/referral/intake-lane';

/** The intake lane: at most `width` submissions do their heavy steps at a time, and the event loop turns between steps. */
describe('IntakeLane', () => {
  test('at most `width` run at once, the others start in arrival order as places come free', async () => {
    const lane = new IntakeLane(2);
    const started: number[] = [];
    let running = 0;
    let most = 0;
    await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        lane.run(async (pause) => {
          started.push(i);
          running++;
          most = Math.max(most, running);
          await pause();
          await pause();
          running--;
        })
      )
    );
    expect(most).toBe(2);
    expect(started).toEqual([0, 1, 2, 3, 4, 5]);
    expect(lane.load).toEqual({ active: 0, waiting: 0 });
  });

  test('I/O waiting to run (a health probe) runs between two steps of a submission, and between submissions', async () => {
    const lane = new IntakeLane(1);
    const order: string[] = [];
    const probe = (name: string): void => {
      setImmediate(() => order.push(name));
    };
    const work = (name: string) =>
      lane.run(async (pause) => {
        order.push(`${name}:hash`);
        probe(`probe after ${name}:hash`);
        await pause();
        order.push(`${name}:check`);
        return name;
      });
    const results = await Promise.all([work('a'), work('b')]);
    expect(results).toEqual(['a', 'b']);
    expect(order).toEqual(['a:hash', 'probe after a:hash', 'a:check', 'b:hash', 'probe after b:hash', 'b:check']);
  });

  test('a failing submission gives its place back', async () => {
    const lane = new IntakeLane(1);
    await expect(lane.run(async () => Promise.reject(new Error('refused')))).rejects.toThrow('refused');
    await expect(lane.run(async () => 'next')).resolves.toBe('next');
    expect(lane.load).toEqual({ active: 0, waiting: 0 });
    expect(() => new IntakeLane(0)).toThrow(RangeError);
  });
});
