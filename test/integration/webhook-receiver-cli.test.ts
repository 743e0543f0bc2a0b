import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import type { Gateway } from '../../src/gateway';
import { createSigner } from '../../src/webhooks/dispatcher';
import { eventually, fixture, KEY_A, startGateway } from '../helpers/gateway';
import { spawnTs } from '../helpers/processes';

const SECRET = 'walkthrough-webhook-secret-1';

/** `npm run webhooks:listen`: the receiver the README's walk-through uses to watch status webhooks arrive. */
describe('webhook receiver (src/cli/webhook-receiver.ts)', () => {
  let child: ChildProcess;
  let url: string;
  let out = '';
  const lines = (): Array<{ signature: string; webhookId: string | null; event: { status?: string; referralId?: string } }> =>
    out
      .split('\n')
      .filter((l) => l.includes('"signature"'))
      .map((l) => JSON.parse(l));

  beforeAll(async () => {
    child = spawnTs('src/cli/webhook-receiver.ts', { PORT: '0', HOST: '127.0.0.1', WEBHOOK_SECRET: SECRET });
    child.stderr?.resume();
    url = await new Promise<string>((resolve, reject) => {
      child.stdout?.on('data', (d: Buffer) => {
        out += d.toString();
        const m = /"event":"receiver-listening","url":"([^"]+)"/.exec(out);
        if (m) resolve(m[1]);
      });
      child.once('exit', (code) => reject(new Error(`receiver exited with ${code}`)));
    });
  });
  afterAll(async () => {
    child.kill('SIGTERM');
    await once(child, 'exit');
  });

  test('prints each signed event from the service as verified, in order', async () => {
    const gw: Gateway = await startGateway({ WEBHOOK_SECRET: SECRET });
    try {
      const res = await fetch(`${gw.url}/referrals`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ ...fixture(), externalId: 'EHR-WALKTHROUGH', callbackUrl: url }),
      });
      expect(res.status).toBe(202);
      const { id } = (await res.json()) as { id: string };
      const seen = await eventually(async () => {
        const mine = lines().filter((l) => l.event.referralId === id);
        return mine.length >= 1 ? mine : undefined;
      });
      expect(seen[0]).toMatchObject({ signature: 'verified', webhookId: expect.stringMatching(/^wh_/), event: { status: 'sent' } });
    } finally {
      await gw.stop();
    }
  });

  test('a forged signature is answered 401 and printed as invalid', async () => {
    const payload = JSON.stringify({ type: 'referral.status-changed', referralId: 'ref_forged', status: 'completed' });
    const signer = createSigner('some-other-secret-entirely');
    const now = new Date();
    const res = await fetch(url, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        'webhook-id': 'wh_forged',
        'webhook-timestamp': String(Math.floor(now.getTime() / 1000)),
        'webhook-signature': signer.sign('wh_forged', now, payload),
      },
      body: payload,
    });
    expect(res.status).toBe(401);
    const line = await eventually(async () => lines().find((l) => l.webhookId === 'wh_forged'));
    expect(line.signature).toBe('invalid');
  });
});
