import { CircuitBreaker, type CircuitTransition, type Permit } from '../../src/delivery/circuit';

function setup(opts: Partial<ConstructorParameters<typeof CircuitBreaker>[0]> = {}) {
  let now = 1_000_000;
  const transitions: CircuitTransition[] = [];
  const b = new CircuitBreaker(
    { failureThreshold: 5, cooldownMs: 30_000, maxCooldownMs: 600_000, probeWaitMs: 1_000, ...opts },
    () => now,
    (t) => transitions.push(t)
  );
  return {
    b,
    transitions,
    advance: (ms: number) => {
      now += ms;
    },
    now: () => now,
  };
}

function permit(b: CircuitBreaker): Permit {
  const a = b.admit();
  if (!a.allowed) throw new Error(`expected admission, circuit is ${a.state}`);
  return a.permit;
}

describe('CircuitBreaker', () => {
  it('stays closed below the threshold; a success resets the count', () => {
    const { b } = setup();
    for (let i = 0; i < 4; i++) b.failed(permit(b));
    expect(b.currentState).toBe('closed');
    b.succeeded(permit(b));
    expect(b.consecutiveFailures).toBe(0);
    for (let i = 0; i < 4; i++) b.failed(permit(b));
    expect(b.currentState).toBe('closed');
  });

  it('opens after 5 consecutive failures (default) and refuses until the 30 s cool-down has passed', () => {
    const { b, advance, now, transitions } = setup();
    for (let i = 0; i < 5; i++) b.failed(permit(b));
    expect(b.currentState).toBe('open');
    const openedAt = now();
    const refused = b.admit();
    expect(refused).toEqual({ allowed: false, retryAt: openedAt + 30_000, state: 'open' });
    advance(29_999);
    expect(b.admit().allowed).toBe(false);
    expect(transitions).toEqual([{ from: 'closed', to: 'open', cooldownMs: 30_000, consecutiveFailures: 5 }]);
  });

  it('half-open lets exactly one probe through; others wait probeWaitMs; a successful probe closes it', () => {
    const { b, advance, now } = setup();
    for (let i = 0; i < 5; i++) b.failed(permit(b));
    advance(30_000);
    expect(b.currentState).toBe('half-open');
    const probe = b.admit();
    expect(probe).toMatchObject({ allowed: true, permit: { probe: true } });
    expect(b.admit()).toEqual({ allowed: false, retryAt: now() + 1_000, state: 'half-open' });
    if (probe.allowed) b.succeeded(probe.permit);
    expect(b.currentState).toBe('closed');
    expect(b.admit().allowed).toBe(true);
  });

  it('a failed probe re-opens with a doubled cool-down, capped at maxCooldownMs; success resets the cool-down', () => {
    const { b, advance, transitions } = setup({ cooldownMs: 30_000, maxCooldownMs: 100_000 });
    for (let i = 0; i < 5; i++) b.failed(permit(b));
    const cooldowns: number[] = [];
    for (const expected of [60_000, 100_000, 100_000]) {
      advance(1_000_000); // past any cool-down
      const p = permit(b);
      expect(p.probe).toBe(true);
      b.failed(p);
      const last = transitions.at(-1)!;
      expect(last.to).toBe('open');
      cooldowns.push(last.cooldownMs!);
      expect(last.cooldownMs).toBe(expected);
    }
    expect(cooldowns).toEqual([60_000, 100_000, 100_000]);
    advance(100_000);
    b.succeeded(permit(b));
    expect(b.currentState).toBe('closed');
    // Next time it opens, it is for the base cool-down again.
    for (let i = 0; i < 5; i++) b.failed(permit(b));
    expect(transitions.at(-1)).toMatchObject({ to: 'open', cooldownMs: 30_000 });
  });

  it('the default 10-minute cap', () => {
    const { b, advance, transitions } = setup({ maxCooldownMs: undefined, cooldownMs: undefined });
    for (let i = 0; i < 5; i++) b.failed(permit(b));
    for (let i = 0; i < 8; i++) {
      advance(10 * 60_000);
      b.failed(permit(b));
    }
    expect(transitions.at(-1)).toMatchObject({ to: 'open', cooldownMs: 600_000 });
  });

  it('a released probe frees the slot without changing the state', () => {
    const { b, advance } = setup({ failureThreshold: 1 });
    b.failed(permit(b));
    advance(30_000);
    const p = permit(b);
    b.released(p);
    expect(b.currentState).toBe('half-open');
    expect(permit(b).probe).toBe(true);
  });

  it('results of requests admitted before the circuit opened or closed do not move it again', () => {
    const { b, advance } = setup({ failureThreshold: 2 });
    const early = [permit(b), permit(b), permit(b)];
    b.failed(early[0]);
    b.failed(early[1]);
    expect(b.currentState).toBe('open');
    b.succeeded(early[2]); // started before the circuit opened: not evidence that the server is back
    expect(b.currentState).toBe('open');
    advance(30_000);
    const probe = permit(b);
    const stale = setup(); // a permit of another breaker is ignored too
    b.failed(permit(stale.b));
    b.succeeded(probe);
    expect(b.currentState).toBe('closed');
    b.failed(probe); // settling twice counts once
    expect(b.consecutiveFailures).toBe(0);
  });
});
