import { readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import type { Destination } from '../../src/config';
import { type CentreObservation, type DeliveryContext, type DestinationAdapter, DestinationAdapters, fhirDestination } from '../../src/destinations';
import { referralSchema } from '../../src/model';
import { changeStatus, getReferral, insertReferral, newReferralId, nowIso, referralHistory } from '../../src/store';
import { setLogLevel } from '../../src/observability';
import { Poller } from '../../src/tracking';
import { freshSqlite } from '../helpers/db';

/** Destination kinds behind adapters (issue 11 point 3): each destination reaches its centre through its type's adapter. */
describe('destination adapters', () => {
  const done = async (): Promise<{ kind: 'done' }> => ({ kind: 'done' });
  const adapter = (track: DestinationAdapter['track'] = async () => 'delta'): DestinationAdapter => ({
    type: 'direct-messaging',
    submit: done,
    addDocuments: done,
    cancel: done,
    track,
    readReport: async () => ({ contentType: 'text/plain', bytes: 6, body: Readable.from([Buffer.from('report')]) }),
  });
  const other = adapter();

  test('a destination without a type is fhir; each type reaches its own adapter', async () => {
    const adapters = new DestinationAdapters([fhirDestination(), other]);
    expect(adapters.for({ id: 'centre' }).type).toBe('fhir');
    expect(adapters.for({ id: 'centre', type: 'fhir' }).type).toBe('fhir');
    const dm = adapters.for({ id: 'dm', type: 'direct-messaging' as 'fhir' });
    expect(await dm.submit({} as DeliveryContext)).toEqual({ kind: 'done' });
  });

  test('an unknown type, or a type registered twice, is an error naming it', () => {
    expect(() => new DestinationAdapters([other]).for({ id: 'centre' })).toThrow(/destination centre has type fhir, which this gateway does not deliver to/);
    expect(() => new DestinationAdapters([other, other])).toThrow(/direct-messaging is registered twice/);
  });

  test("the tracker applies what any adapter observes: the Task state machine, the report, the centre's withdrawal", async () => {
    setLogLevel('error');
    const db = await freshSqlite();
    try {
      const sample = referralSchema.parse(JSON.parse(readFileSync('fixtures/referrals/breast-second-opinion.json', 'utf8')));
      const ids = [newReferralId(), newReferralId()];
      for (const id of ids) {
        await insertReferral(db, {
          id,
          clientId: 'c',
          externalId: `E-${id}`,
          idempotencyKey: null,
          requestHash: 'h',
          destination: 'dm',
          payload: sample,
          at: nowIso(),
        });
        await changeStatus(db, id, { status: 'sent' });
      }
      const [completing, withdrawn] = ids;
      let observations: CentreObservation[] = [];
      const seen: string[][] = [];
      const dm = adapter(async (ctx) => {
        seen.push((await ctx.openReferrals()).map((r) => r.id).sort());
        for (const o of observations) await ctx.observe(o);
        await ctx.advanceWatermark('2026-12-06T10:00:00.000Z');
        ctx.counted({ requests: 1, seen: observations.length });
        return 'delta';
      });
      const centre = { id: 'dm', type: 'direct-messaging' } as unknown as Destination;
      const directory = { ids: () => ['dm'], get: (id: string) => (id === 'dm' ? centre : undefined) };
      const poller = new Poller(db, directory, new DestinationAdapters([dm]), { cron: '* * * * *', overlapMs: 0, pageSize: 10 });
      const report = { reference: 'Message/9', title: `Tumour board opinion\u0007${'!'.repeat(300)}`, contentType: 'Application/PDF; x=1', url: '' };
      const task = (referralId: string, taskStatus: string, version: string): CentreObservation => ({
        kind: 'task',
        referralId,
        taskStatus,
        version,
        reason: 'reviewed by the board',
        report: async () => report,
      });

      observations = [task(completing, 'accepted', '2'), { kind: 'withdrawn', referralId: withdrawn, reason: 'the centre declined by mail', detail: {} }];
      const [first] = await poller.pollOnce({ force: true });
      expect(first).toMatchObject({ destination: 'dm', mode: 'delta', searches: 1, tasksSeen: 2, changes: 2 });
      expect(seen[0]).toEqual([...ids].sort());
      expect((await getReferral(db, completing, { payload: false }))?.status).toBe('accepted');
      expect(await getReferral(db, withdrawn, { payload: false })).toMatchObject({ status: 'cancelled', statusReason: 'the centre declined by mail' });

      // The same version again is skipped; a completion reads the report, bounded and cleaned; a referral not at
      // this destination, and a withdrawal of a closed referral, change nothing.
      observations = [
        task(completing, 'accepted', '2'),
        task(completing, 'completed', '3'),
        task('ref_elsewhere', 'completed', '1'),
        { kind: 'withdrawn', referralId: withdrawn, reason: 'again', detail: {} },
      ];
      const [second] = await poller.pollOnce({ force: true });
      expect(second.changes).toBe(1);
      const done = await getReferral(db, completing, { payload: false });
      expect(done?.status).toBe('completed');
      expect(done?.report?.title).toHaveLength(200);
      expect(done?.report?.title).not.toContain('\u0007');
      expect(done?.report?.contentType).toBe('application/pdf');
      expect((await referralHistory(db, completing)).map((h) => h.status)).toEqual(['queued', 'sent', 'accepted', 'completed']);
      expect(seen[1]).toEqual([completing]);
    } finally {
      await db.close();
    }
  });
});
