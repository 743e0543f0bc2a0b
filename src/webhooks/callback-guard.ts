// Status webhooks go to URLs that API clients choose. Unless WEBHOOK_ALLOW_PRIVATE_NETWORKS allows it
// (the default outside production), the gateway refuses to POST to loopback, private, link-local and
// other non-public addresses, so a client cannot make the gateway reach into the network it runs in
// (its own admin API, a cloud metadata endpoint, a database).
import { lookup as dnsLookup } from 'node:dns/promises';
import { BlockList, isIP } from 'node:net';

/** Address ranges that are not the public internet (IANA special-purpose registries, RFC 6890 and successors). */
const NON_PUBLIC = new BlockList();
for (const [net, prefix] of [
  ['0.0.0.0', 8], // "this network"
  ['10.0.0.0', 8], // private
  ['100.64.0.0', 10], // carrier-grade NAT
  ['127.0.0.0', 8], // loopback
  ['169.254.0.0', 16], // link-local, cloud metadata endpoints
  ['172.16.0.0', 12], // private
  ['192.0.0.0', 24], // IETF protocol assignments
  ['192.0.2.0', 24], // documentation
  ['192.168.0.0', 16], // private
  ['198.18.0.0', 15], // benchmarking
  ['198.51.100.0', 24], // documentation
  ['203.0.113.0', 24], // documentation
  ['224.0.0.0', 4], // multicast
  ['240.0.0.0', 4], // reserved, broadcast
] as const) {
  NON_PUBLIC.addSubnet(net, prefix, 'ipv4');
}
for (const [net, prefix] of [
  ['::', 128], // unspecified
  ['::1', 128], // loopback
  ['64:ff9b:1::', 48], // local-use NAT64
  ['100::', 64], // discard
  ['2001:db8::', 32], // documentation
  ['fc00::', 7], // unique local
  ['fe80::', 10], // link-local
  ['ff00::', 8], // multicast
] as const) {
  NON_PUBLIC.addSubnet(net, prefix, 'ipv6');
}

/** True when `ip` (IPv4 or IPv6, IPv4-mapped included) is a public internet address. */
export function isPublicAddress(ip: string): boolean {
  const family = isIP(ip);
  if (family === 4) return !NON_PUBLIC.check(ip, 'ipv4');
  if (family !== 6) return false;
  // ::ffff:a.b.c.d and ::ffff:XXXX:XXXX reach the IPv4 address: judge that one.
  const mapped = /^::ffff:(?:(\d+\.\d+\.\d+\.\d+)|([0-9a-f]{1,4}):([0-9a-f]{1,4}))$/i.exec(ip);
  if (mapped) {
    const v4 = mapped[1] ?? [parseInt(mapped[2], 16) >> 8, parseInt(mapped[2], 16) & 255, parseInt(mapped[3], 16) >> 8, parseInt(mapped[3], 16) & 255].join('.');
    return isPublicAddress(v4);
  }
  return !NON_PUBLIC.check(ip, 'ipv6');
}

const LOCAL_NAMES = /(^|\.)(localhost|local|internal|localdomain|home\.arpa)$/i;

function hostOf(url: URL): string {
  // URL.hostname keeps the brackets of an IPv6 literal.
  return url.hostname.replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '');
}

/**
 * What is wrong with a callback URL's host without resolving it: a non-public IP literal or a local
 * name (`localhost`, `*.local`, `*.internal`...). Undefined when nothing is.
 */
export function literalCallbackProblem(rawUrl: string): string | undefined {
  let url: URL;
  try {
    url = new URL(rawUrl);
  } catch {
    return 'is not a valid URL';
  }
  const host = hostOf(url);
  if (isIP(host)) {
    return isPublicAddress(host) ? undefined : `points at a non-public address (${host}); callbacks must reach the public internet`;
  }
  return LOCAL_NAMES.test(host) ? `points at a local host name (${host}); callbacks must reach the public internet` : undefined;
}

export type Lookup = (hostname: string) => Promise<string[]>;

const systemLookup: Lookup = async (hostname) => (await dnsLookup(hostname, { all: true, verbatim: true })).map((a) => a.address);

export type CallbackCheck = { ok: true } | { ok: false; permanent: boolean; reason: string };

/**
 * Resolves the callback URL's host and checks every address it has. A name that does not resolve is a
 * temporary problem (DNS may be down); a non-public address is a permanent refusal. The request that
 * follows resolves the name again, so a DNS server that answers differently within seconds could still
 * steer it (DNS rebinding); the check stops every static misconfiguration and casual probing.
 */
export async function checkCallbackAddress(url: URL, lookup: Lookup = systemLookup): Promise<CallbackCheck> {
  const literal = literalCallbackProblem(url.toString());
  if (literal) return { ok: false, permanent: true, reason: `the callback URL ${literal}` };
  const host = hostOf(url);
  if (isIP(host)) return { ok: true };
  let addresses: string[];
  try {
    addresses = await lookup(host);
  } catch (err) {
    return { ok: false, permanent: false, reason: `the callback host does not resolve (${(err as { code?: string }).code ?? 'DNS error'})` };
  }
  const bad = addresses.find((a) => !isPublicAddress(a));
  if (addresses.length === 0) return { ok: false, permanent: false, reason: 'the callback host has no address' };
  if (bad) return { ok: false, permanent: true, reason: `the callback host resolves to a non-public address (${bad}); callbacks must reach the public internet` };
  return { ok: true };
}
