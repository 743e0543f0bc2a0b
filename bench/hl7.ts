/**
 * bench/hl7: REF^I12 referrals per second over MLLP (each acknowledged after the durable store), over one
 * connection and over 8, next to the JSON intake (POST /referrals) of the same referrals measured in the same run,
 * with the ratio (target >= 0.8: after parsing, the work is the same).
 *
 *   npm run bench:hl7                  # 400 referrals a phase, ROUNDS=3 alternating which format goes first, WARMUP=40
 *   N=1000 ROUNDS=5 npm run bench:hl7
 *
 * The gateway runs as its own process (src/index.ts, SQLite in a temp dir), delivering to a sandbox FHIR server in
 * a process of its own, as bench/intake does. The messages are fixtures/hl7v2/ref-i12-breast-epic.hl7, each with its
 * own control id (MSH-10) and originating referral id (RF1-6); the JSON referrals are what the gateway's own mapping
 * reads from those messages (readV2Referral), so both formats carry the same referrals. One connection sends one
 * message and waits for its ACK (MLLP is one message at a time per connection); HTTP uses keep-alive connections in
 * the same way, one request at a time each.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent, request } from 'undici';
import { Hl7Message } from '@medplum/core';
import { frameMllp } from '../src/intake/hl7v2/mllp';
import { readV2Referral } from '../src/intake/hl7v2/map';
import { startScript as start, stopScripts } from './processes';

const N = Number(process.env.N ?? 400);
const ROUNDS = Number(process.env.ROUNDS ?? 3);
/** Referrals of each format sent before the first round (not timed): JIT, tables, the store's first pages. */
const WARMUP = Number(process.env.WARMUP ?? 40);
const template = readFileSync('fixtures/hl7v2/ref-i12-breast-epic.hl7', 'utf8');

/** The template with its own control id and referral id. */
function message(tag: string): string {
  return template.replace('EPIC-000123-1', `CTL-${tag}`).replace('EHR-2026-000123', `BENCH-${tag}`);
}

/** One MLLP connection that sends a message and waits for its acknowledgement. */
async function mllpConnection(port: number): Promise<{ send(text: string): Promise<string>; close(): void }> {
  const socket: Socket = connect(port, '127.0.0.1');
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  socket.setNoDelay(true);
  let buffer = Buffer.alloc(0);
  let waiting: ((reply: string) => void) | undefined;
  socket.on('data', (chunk: Buffer) => {
    buffer = Buffer.concat([buffer, chunk]);
    const end = buffer.indexOf('\x1c\r');
    if (end >= 0 && waiting) {
      const reply = buffer.subarray(buffer.indexOf(0x0b) + 1, end).toString('utf8');
      buffer = buffer.subarray(end + 2);
      const w = waiting;
      waiting = undefined;
      w(reply);
    }
  });
  return {
    send: (text) =>
      new Promise<string>((resolve) => {
        waiting = resolve;
        socket.write(frameMllp(text));
      }),
    close: () => socket.destroy(),
  };
}

/** Runs `count` sends over `connections` workers; returns referrals per second and the p99 latency. */
async function drive(
  count: number,
  connections: number,
  send: (worker: number, i: number) => Promise<boolean>
): Promise<{ rps: number; p99: number; failed: number }> {
  const latencies: number[] = [];
  let next = 0;
  let failed = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: connections }, async (_, w) => {
      for (let i = next++; i < count; i = next++) {
        const t0 = performance.now();
        if (!(await send(w, i))) failed++;
        latencies.push(performance.now() - t0);
      }
    })
  );
  const seconds = (performance.now() - started) / 1000;
  latencies.sort((a, b) => a - b);
  return { rps: count / seconds, p99: latencies[Math.floor(latencies.length * 0.99)] ?? 0, failed };
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'rg-bench-hl7-'));
  const centre = await start('src/cli/sandbox.ts', { PORT: '0', LOG_LEVEL: 'warn' }, /sandbox-listening.*127\.0\.0\.1:(\d+)/);
  const gateway = await start(
    'src/index.ts',
    {
      NODE_ENV: 'test',
      PORT: '0',
      HOST: '127.0.0.1',
      DATABASE_URL: `sqlite:${join(dir, 'bench.db')}`,
      API_KEYS: 'bench:bench-key-0001',
      HL7_MLLP_PORT: '0',
      HL7_MLLP_CLIENT: 'bench',
      LOG_LEVEL: 'warn',
      DESTINATIONS_FILE: join(dir, 'none.json'),
      FHIR_BASE_URL: `http://127.0.0.1:${centre.port}/fhir/R4`,
    },
    /HL7 v2 over MLLP on [^:]+:(\d+)/
  );
  const httpPort = Number(/listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(gateway.printed)?.[1]);
  const agent = new Agent({ connections: 8, pipelining: 1 });
  const postJson = async (body: unknown): Promise<boolean> => {
    const res = await request(`http://127.0.0.1:${httpPort}/referrals`, {
      method: 'POST',
      dispatcher: agent,
      headers: { 'content-type': 'application/json', authorization: 'Bearer bench-key-0001' },
      body: JSON.stringify(body),
    });
    await res.body.dump();
    return res.statusCode === 202;
  };
  try {
    process.stdout.write(`\nREF^I12 over MLLP next to the same referrals as JSON (POST /referrals), ${N} a phase, ${ROUNDS} rounds, Node ${process.version}\n`);
    const warm = await mllpConnection(gateway.port);
    for (let i = 0; i < WARMUP; i++) {
      await warm.send(message(`WV-${i}`));
      await postJson(readV2Referral(Hl7Message.parse(message(`WJ-${i}`).replace(/\r?\n/g, '\r'))).referral);
    }
    warm.close();
    const rows: Array<{ connections: number; v2: number; json: number }> = [];
    for (let round = 1; round <= ROUNDS; round++) {
      for (const connections of [1, 8]) {
        const tag = (kind: string, i: number): string => `${kind}-${round}-${connections}-${i}`;
        // The JSON referrals are read from the very messages the v2 phase sends (not timed).
        const json = Array.from({ length: N }, (_, i) => readV2Referral(Hl7Message.parse(message(tag('J', i)).replace(/\r?\n/g, '\r'))).referral);
        const links = await Promise.all(Array.from({ length: connections }, () => mllpConnection(gateway.port)));
        const v2Phase = (): Promise<{ rps: number; p99: number; failed: number }> =>
          drive(N, connections, async (w, i) => /\rMSA\|AA\|/.test(await (links[w] as { send(t: string): Promise<string> }).send(message(tag('V', i)))));
        const jsonPhase = (): Promise<{ rps: number; p99: number; failed: number }> => drive(N, connections, (_w, i) => postJson(json[i]));
        // Which format goes first alternates between rounds, for each number of connections.
        const first = (round + connections) % 2 === 0 ? 'v2' : 'json';
        const a = first === 'v2' ? await v2Phase() : await jsonPhase();
        const b = first === 'v2' ? await jsonPhase() : await v2Phase();
        const [v2, js] = first === 'v2' ? [a, b] : [b, a];
        for (const l of links) l.close();
        rows.push({ connections, v2: v2.rps, json: js.rps });
        process.stdout.write(
          `  round ${round}, ${connections} connection${connections === 1 ? ' ' : 's'} (${first} first): ` +
            `MLLP ${v2.rps.toFixed(1).padStart(6)} referrals/s (p99 ${v2.p99.toFixed(0)} ms, ${v2.failed} not AA)   ` +
            `JSON ${js.rps.toFixed(1).padStart(6)} referrals/s (p99 ${js.p99.toFixed(0)} ms, ${js.failed} not 202)   ratio ${(v2.rps / js.rps).toFixed(2)}\n`
        );
      }
    }
    for (const connections of [1, 8]) {
      const ratios = rows
        .filter((r) => r.connections === connections)
        .map((r) => r.v2 / r.json)
        .sort((x, y) => x - y);
      const median = ratios[Math.floor(ratios.length / 2)] ?? 0;
      process.stdout.write(
        `  ${connections} connection${connections === 1 ? ': ' : 's:'} median ratio MLLP/JSON ${median.toFixed(2)} (range ${ratios[0]?.toFixed(2)}-${ratios.at(-1)?.toFixed(2)}; target >= 0.8)\n`
      );
    }
  } finally {
    await agent.close();
    await stopScripts(gateway, centre);
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.message}\n`);
  process.exit(1);
});
