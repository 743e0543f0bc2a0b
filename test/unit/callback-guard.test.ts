import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { checkCallbackAddress, guardedFetch, isPublicAddress, literalCallbackProblem, NON_PUBLIC_CODE } from '../../src/webhooks/callback-guard';

/** Callbacks must not let an API client make the gateway reach into its own network. */
describe('callback address guard', () => {
  test.each([
    ['127.0.0.1', false],
    ['10.1.2.3', false],
    ['172.16.0.1', false],
    ['172.31.255.255', false],
    ['192.168.1.10', false],
    ['169.254.169.254', false], // cloud metadata endpoint
    ['100.64.0.1', false],
    ['0.0.0.0', false],
    ['224.0.0.1', false],
    ['::1', false],
    ['fd00::1', false],
    ['fe80::1', false],
    ['::ffff:127.0.0.1', false], // IPv4-mapped loopback
    ['::ffff:a9fe:a9fe', false], // 169.254.169.254, hex-mapped
    ['8.8.8.8', true],
    ['172.32.0.1', true],
    ['93.184.216.34', true],
    ['2606:4700::1111', true],
    ['::ffff:8.8.8.8', true],
    ['not-an-ip', false],
    // IPv6 forms that embed an IPv4 address are judged by it (issue 10).
    ['::127.0.0.1', false], // IPv4-compatible
    ['::7f00:1', false],
    ['::ffff:0:127.0.0.1', false], // IPv4-translated
    ['::ffff:0:a9fe:a9fe', false],
    ['64:ff9b::127.0.0.1', false], // NAT64
    ['64:ff9b::a00:1', false], // NAT64 of 10.0.0.1
    ['64:ff9b::8.8.8.8', true],
    ['2002:7f00:1::', false], // 6to4 of 127.0.0.1
    ['2002:c0a8:101::1', false], // 6to4 of 192.168.1.1
    ['2002:808:808::1', true],
    ['2001:0:4136:e378:8000:63bf:3fff:fdd2', false], // Teredo
    ['::', false],
  ])('%s is public: %s', (ip, expected) => {
    expect(isPublicAddress(ip)).toBe(expected);
  });

  test('literal hosts and local names are refused without resolving; public names pass', () => {
    expect(literalCallbackProblem('http://127.0.0.1:8080/hook')).toMatch(/non-public address \(127\.0\.0\.1\)/);
    expect(literalCallbackProblem('http://[::1]/hook')).toMatch(/non-public address \(::1\)/);
    expect(literalCallbackProblem('http://[::127.0.0.1]/hook')).toMatch(/non-public address/);
    expect(literalCallbackProblem('http://[::ffff:0:127.0.0.1]/hook')).toMatch(/non-public address/);
    expect(literalCallbackProblem('http://[64:ff9b::7f00:1]/hook')).toMatch(/non-public address/);
    expect(literalCallbackProblem('http://[2002:7f00:1::]/hook')).toMatch(/non-public address/);
    expect(literalCallbackProblem('http://169.254.169.254/latest/meta-data')).toMatch(/non-public/);
    expect(literalCallbackProblem('http://localhost:3000/hook')).toMatch(/local host name \(localhost\)/);
    expect(literalCallbackProblem('https://api.LOCALHOST./x')).toMatch(/local host name/);
    expect(literalCallbackProblem('https://db.internal/x')).toMatch(/local host name/);
    expect(literalCallbackProblem('https://ehr.example.org/hooks/referrals')).toBeUndefined();
    expect(literalCallbackProblem('https://8.8.8.8/hooks')).toBeUndefined();
  });

  test('a name is resolved and every address checked; DNS failure is temporary, a private address permanent', async () => {
    const dns = (answers: Record<string, string[]>) => async (h: string) => {
      if (!(h in answers)) throw Object.assign(new Error('not found'), { code: 'ENOTFOUND' });
      return answers[h];
    };
    const lookup = dns({ 'ehr.example.org': ['93.184.216.34', '2606:2800:220:1::1'], 'sneaky.example.org': ['93.184.216.34', '10.0.0.5'] });
    expect(await checkCallbackAddress(new URL('https://ehr.example.org/h'), lookup)).toEqual({ ok: true });
    expect(await checkCallbackAddress(new URL('https://sneaky.example.org/h'), lookup)).toEqual({
      ok: false,
      permanent: true,
      reason: expect.stringMatching(/resolves to a non-public address \(10\.0\.0\.5\)/),
    });
    expect(await checkCallbackAddress(new URL('https://gone.example.org/h'), lookup)).toEqual({
      ok: false,
      permanent: false,
      reason: expect.stringMatching(/ENOTFOUND/),
    });
    // Literals never reach the resolver.
    expect(await checkCallbackAddress(new URL('http://192.168.0.1/h'), lookup)).toMatchObject({ ok: false, permanent: true });
  });
});

describe('guardedFetch: the check happens on the address actually connected to', () => {
  let server: Server;
  let port: number;
  let hits = 0;
  beforeAll(async () => {
    server = createServer((_req, res) => {
      hits++;
      res.writeHead(204).end();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });

  test('a name that resolves to a private address at connect time is never connected to (DNS rebinding)', async () => {
    const before = hits;
    const f = guardedFetch(async () => ['127.0.0.1']);
    const err = (await f(`http://rebind.example.org:${port}/hook`, { method: 'POST', body: '{}' }).catch((e: unknown) => e)) as {
      cause?: { code?: string; message?: string };
    };
    expect(err.cause?.code).toBe(NON_PUBLIC_CODE);
    expect(err.cause?.message).toMatch(/non-public address \(127\.0\.0\.1\)/);
    expect(hits).toBe(before);
  });

  test('an allowed address is connected to normally (the same plumbing, with a policy that allows loopback)', async () => {
    const before = hits;
    const f = guardedFetch(
      async () => ['127.0.0.1'],
      () => true
    );
    const res = await f(`http://hooks.example.org:${port}/hook`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } });
    expect(res.status).toBe(204);
    expect(hits).toBe(before + 1);
  });
});
