import type { Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { deliveryQueue, leasedQueue, listReferrals, openAtDestination, setWatermark } from '../../src/store';

/**
 * Polling scales with changes, not with referrals: with 2,000 open referrals at the centre and 20
 * Tasks changed, one cycle makes at most 1 + ceil(20 / page size) search requests, counted at the
 * server.
 */
describe('polling cost', () => {
  let gw: Gateway;
  const PAGE = 10;
  const OPEN = 2000;
  const CHANGED = 20;

  beforeAll(async () => {
    gw = await startGateway({ DELIVERY_CONCURRENCY: '8' }, { pollOverlapMs: 300, pollPageSize: PAGE });
  });
  afterAll(async () => {
    await gw.stop();
  });

  test(`${OPEN} open referrals, ${CHANGED} changed: at most 1 + ceil(${CHANGED}/${PAGE}) searches`, async () => {
    const body = fixture('breast-second-opinion');
    body.documents = body.documents.slice(0, 1);
    const ids: string[] = [];
    let next = 0;
    await Promise.all(
      Array.from({ length: 16 }, async () => {
        while (next < OPEN) {
          const i = next++;
          const res = await fetch(`${gw.url}/referrals`, {
            method: 'POST',
            headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
            body: JSON.stringify({ ...body, externalId: `EHR-COST-${i}` }),
          });
          expect(res.status).toBe(202);
          ids.push(((await res.json()) as { id: string }).id);
        }
      })
    );
    await eventually(async () => (await leasedQueue.pendingCount(gw.db, deliveryQueue)) === 0, 120_000, 200);
    const sandbox = gw.sandbox;
    if (!sandbox) throw new Error('sandbox expected');

    // Steady state: an earlier cycle has seen every Task (the watermark is past them all) and the
    // overlap window has gone by.
    await new Promise((r) => setTimeout(r, 400));
    await setWatermark(gw.db, 'sandbox', new Date().toISOString());

    const open = await openAtDestination(gw.db, 'sandbox');
    expect(open).toHaveLength(OPEN);
    for (const r of open.slice(0, CHANGED)) {
      const taskId = (r.fhir?.task as string).split('/')[1];
      const task = await sandbox.repo.readResource<Task>('Task', taskId);
      await sandbox.repo.updateResource<Task>({ ...task, status: 'accepted' });
    }
    const before = { ...sandbox.stats.searches };
    const [cycle] = await gw.poller.pollOnce({ force: true });
    const made = Object.entries(sandbox.stats.searches).reduce((n, [type, count]) => n + count - (before[type] ?? 0), 0);

    expect(cycle.changes).toBe(CHANGED);
    expect(made).toBe(cycle.searches);
    expect(made).toBeLessThanOrEqual(1 + Math.ceil(CHANGED / PAGE));
    expect((await listReferrals(gw.db, 'city-hospital', { limit: 200, status: 'accepted' })).items).toHaveLength(CHANGED);
  }, 180_000);
});
