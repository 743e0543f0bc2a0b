import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import nock from 'nock';
import { startSandboxServer } from '../../src/sandbox/server';
import type { Gateway } from '../../src/gateway';
import { serviceDatabases } from '../helpers/db';
import { startGateway } from '../helpers/gateway';
import { writeDestinationsFile } from '../helpers/destinations';
import { allowAllNetwork, allowOnlyLoopback } from '../helpers/nock';
import { setWatermark } from '../../src/store';

/** Each destination is polled on its own: a slow or failing centre does not hold up the others, and is backed off. */
describe('polling several destinations', () => {
  let gw: Gateway;
  let sandbox: Awaited<ReturnType<typeof startSandboxServer>>;

  beforeAll(async () => {
    sandbox = await startSandboxServer(0);
    const dir = mkdtempSync(join(tmpdir(), 'rg-dest-'));
    const file = join(dir, 'destinations.json');
    const org = (value: string) => ({ system: 'https://referral-gateway.dev/fhir/sid/destination', value });
    writeFileSync(
      file,
      JSON.stringify({
        destinations: [
          { id: 'fast-centre', name: 'Fast', organization: org('fast'), baseUrl: sandbox.url, pollCron: '*/5 * * * * *' },
          {
            id: 'slow-centre',
            name: 'Slow',
            organization: org('slow'),
            baseUrl: 'https://slow.example.org/fhir/R4',
            timeoutMs: 3000,
            pollCron: '*/7 * * * * *',
          },
        ],
      })
    );
    allowOnlyLoopback();
    gw = await startGateway({ DESTINATIONS_FILE: file });
    // Both have something open, so both have something to poll.
    await setWatermark(gw.db, 'fast-centre', new Date(Date.now() - 60_000).toISOString());
    await setWatermark(gw.db, 'slow-centre', new Date(Date.now() - 60_000).toISOString());
  });
  afterAll(async () => {
    await gw.stop();
    await sandbox.close();
    allowAllNetwork();
  });

  test('a hanging centre does not delay the others, and a failing one is backed off', async () => {
    const slow = nock('https://slow.example.org')
      .get(/\/fhir\/R4\/Task.*/)
      .delay(2500)
      .reply(503, 'busy');
    const fast = gw.destinations.get('fast-centre');
    const slowDest = gw.destinations.get('slow-centre');
    if (!fast || !slowDest) throw new Error('destinations expected');

    const slowCycle = gw.poller.pollDestination(slowDest);
    const started = Date.now();
    const fastCycle = await gw.poller.pollDestination(fast);
    expect(fastCycle.error).toBeUndefined();
    expect(fastCycle.searches).toBeGreaterThanOrEqual(2); // Task and ServiceRequest deltas at the fast centre
    expect(Date.now() - started).toBeLessThan(1500); // did not wait for the slow one

    const failed = await slowCycle;
    expect(failed.error).toMatch(/503/);
    expect(slow.isDone()).toBe(true);

    // While it is down the slow centre is skipped until its backoff has passed (no request is made).
    const skipped = await gw.poller.pollDestination(slowDest);
    expect(skipped.mode).toBe('skipped');
    expect(nock.pendingMocks()).toHaveLength(0);
  }, 20_000);
});

/** Two instances of the service on one database (a second replica for availability): each centre is polled by one. */
describe.each(serviceDatabases())('two instances sharing a %s database', (name, database) => {
  test('only one polls a destination; when it stops, the other takes over', async () => {
    const { url, drop } = await database();
    const sandbox = await startSandboxServer(0);
    const dir = mkdtempSync(join(tmpdir(), 'rg-two-'));
    const file = writeDestinationsFile(dir, { baseUrl: sandbox.url });
    const a = await startGateway({ DATABASE_URL: url, DESTINATIONS_FILE: file });
    const b = await startGateway({ DATABASE_URL: url, DESTINATIONS_FILE: file });
    try {
      for (const gw of [a, b]) await setWatermark(gw.db, 'centre', new Date(Date.now() - 60_000).toISOString());
      const [first] = await a.poller.pollOnce();
      expect(first).toMatchObject({ destination: 'centre', mode: 'delta' });
      expect(first.searches).toBeGreaterThanOrEqual(2);
      const [second] = await b.poller.pollOnce();
      if (name === 'postgres') {
        expect(second).toMatchObject({ mode: 'skipped', searches: 0, reason: 'another instance polls this destination' });
      } else {
        // In-memory SQLite: two separate databases, so each instance polls its own referrals.
        expect(second.mode).toBe('delta');
      }
      await a.stop();
      const [after] = await b.poller.pollOnce();
      expect(after).toMatchObject({ destination: 'centre', mode: 'delta' });
      expect(after.searches).toBeGreaterThanOrEqual(2);
    } finally {
      await a.stop().catch(() => undefined);
      await b.stop();
      await sandbox.close();
      await drop();
    }
  });
});

// nock patches Node's HTTP client for the whole jest worker: undo it for the test files that run after this one.
afterAll(() => {
  nock.restore();
});
