// Status webhooks go to URLs that API clients choose. Unless WEBHOOK_ALLOW_PRIVATE_NETWORKS allows it
// (the default outside production), the gateway refuses to POST to loopback, private, link-local and
// other non-public addresses, so a client cannot make the gateway reach into the network it runs in
// (its own admin API, a cloud metadata endpoint, a database).
import type { LookupAddress } from 'node:dns';
import { lookup as dnsLookup } from 'node:dns/promises';
import { BlockList, isIP } from 'node:net';
import { Agent, fetch as undiciFetch } from 'undici';

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

/** The eight 16-bit groups of an IPv6 address (a trailing dotted IPv4 part included), or undefined. */
function ipv6Groups(ip: string): number[] | undefined {
  let text = ip.toLowerCase().replace(/%.*$/, '');
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted) {
    if (isIP(dotted[1]) !== 4) return undefined;
    const [a, b, c, d] = dotted[1].split('.').map(Number);
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const halves = text.split('::');
  if (halves.length > 2) return undefined;
  const part = (h: string): number[] => (h === '' ? [] : h.split(':').map((g) => parseInt(g, 16)));
  const head = part(halves[0]);
  const tail = halves.length === 2 ? part(halves[1]) : [];
  const fill = 8 - head.length - tail.length;
  if (halves.length === 1 ? head.length !== 8 : fill < 1) return undefined;
  const groups = [...head, ...new Array<number>(halves.length === 2 ? fill : 0).fill(0), ...tail];
  return groups.every((g) => Number.isInteger(g) && g >= 0 && g <= 0xffff) ? groups : undefined;
}

const v4Of = (hi: number, lo: number): string => [hi >> 8, hi & 255, lo >> 8, lo & 255].join('.');

/**
 * The IPv4 address an IPv6 address reaches or carries, for the forms that embed one: IPv4-compatible
 * (::a.b.c.d), IPv4-mapped (::ffff:a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), NAT64 (64:ff9b::/96)
 * and 6to4 (2002::/16). Judging these by their IPv4 part stops `[::127.0.0.1]` and friends.
 */
function embeddedIpv4(g: number[]): string | undefined {
  const zeros = (from: number, to: number): boolean => g.slice(from, to).every((x) => x === 0);
  if (zeros(0, 5) && (g[5] === 0 || g[5] === 0xffff)) return v4Of(g[6], g[7]); // ::/96 and ::ffff:0:0/96
  if (zeros(0, 4) && g[4] === 0xffff && g[5] === 0) return v4Of(g[6], g[7]); // ::ffff:0:0:0/96
  if (g[0] === 0x64 && g[1] === 0xff9b && zeros(2, 6)) return v4Of(g[6], g[7]); // 64:ff9b::/96
  if (g[0] === 0x2002) return v4Of(g[1], g[2]); // 6to4
  return undefined;
}

/** True when `ip` (IPv4 or IPv6, forms embedding an IPv4 address included) is a public internet address. */
export function isPublicAddress(ip: string): boolean {
  const family = isIP(ip);
  if (family === 4) return !NON_PUBLIC.check(ip, 'ipv4');
  if (family !== 6) return false;
  const groups = ipv6Groups(ip);
  if (!groups) return false;
  const v4 = embeddedIpv4(groups);
  if (v4) return isPublicAddress(v4);
  if (groups[0] === 0x2001 && groups[1] === 0) return false; // Teredo: the client address is obfuscated; not a callback target
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
  return literalHostProblem(hostOf(url));
}

function literalHostProblem(host: string): string | undefined {
  if (isIP(host)) {
    return isPublicAddress(host) ? undefined : `points at a non-public address (${host}); callbacks must reach the public internet`;
  }
  return LOCAL_NAMES.test(host) ? `points at a local host name (${host}); callbacks must reach the public internet` : undefined;
}

/** Why a host that resolved to `addresses` may not be called (none, or one not `allowed`); undefined when it may. */
function addressesProblem(addresses: string[], allowed: (ip: string) => boolean): { code: string; reason: string; permanent: boolean } | undefined {
  if (addresses.length === 0) return { code: 'ENOTFOUND', reason: 'the callback host has no address', permanent: false };
  const bad = addresses.find((a) => !allowed(a));
  return bad
    ? {
        code: NON_PUBLIC_CODE,
        reason: `the callback host resolves to a non-public address (${bad}); callbacks must reach the public internet`,
        permanent: true,
      }
    : undefined;
}

export type Lookup = (hostname: string) => Promise<string[]>;

const systemLookup: Lookup = async (hostname) => (await dnsLookup(hostname, { all: true, verbatim: true })).map((a) => a.address);

export type CallbackCheck = { ok: true } | { ok: false; permanent: boolean; reason: string };

/**
 * Resolves the callback URL's host and checks every address it has. A name that does not resolve is a
 * temporary problem (DNS may be down); a non-public address is a permanent refusal. This gives the clear
 * reason; `guardedFetch` checks again at connect time, on the addresses actually connected to.
 */
export async function checkCallbackAddress(url: URL, lookup: Lookup = systemLookup): Promise<CallbackCheck> {
  const host = hostOf(url);
  const literal = literalHostProblem(host);
  if (literal) return { ok: false, permanent: true, reason: `the callback URL ${literal}` };
  if (isIP(host)) return { ok: true };
  let addresses: string[];
  try {
    addresses = await lookup(host);
  } catch (err) {
    return { ok: false, permanent: false, reason: `the callback host does not resolve (${(err as { code?: string }).code ?? 'DNS error'})` };
  }
  const problem = addressesProblem(addresses, isPublicAddress);
  return problem ? { ok: false, permanent: problem.permanent, reason: problem.reason } : { ok: true };
}

/** The error a guarded connection fails with when its host resolves to a non-public address. */
export const NON_PUBLIC_CODE = 'ERR_CALLBACK_NON_PUBLIC';

type NetLookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/**
 * A `lookup` for net/tls.connect that resolves with `lookup` and fails the connection when any address is
 * not public. Because the socket connects to exactly the addresses checked here, a DNS answer that changes
 * between the check and the request (DNS rebinding) cannot steer the request into a private network.
 */
export function guardedNetLookup(lookup: Lookup = systemLookup, allowed: (ip: string) => boolean = isPublicAddress) {
  return (hostname: string, options: { all?: boolean }, callback: NetLookupCallback): void => {
    lookup(hostname).then(
      (addresses) => {
        const problem = addressesProblem(addresses, allowed);
        if (problem) {
          const err: NodeJS.ErrnoException = new Error(problem.reason);
          err.code = problem.code;
          callback(err, '');
          return;
        }
        const list = addresses.map((address) => ({ address, family: isIP(address) }));
        if (options.all) callback(null, list);
        else callback(null, list[0].address, list[0].family);
      },
      (err: NodeJS.ErrnoException) => callback(err, '')
    );
  };
}

/**
 * `fetch` for callbacks that never connects to a non-public address: an undici Agent whose connections
 * resolve through `guardedNetLookup` (IP literals are refused before, by `checkCallbackAddress`).
 */
export function guardedFetch(lookup: Lookup = systemLookup, allowed: (ip: string) => boolean = isPublicAddress): typeof fetch {
  const agent = new Agent({ connect: { lookup: guardedNetLookup(lookup, allowed) as never } });
  return ((input: string | URL, init?: RequestInit) =>
    undiciFetch(input, { ...(init as object), dispatcher: agent } as Parameters<typeof undiciFetch>[1])) as unknown as typeof fetch;
}
