import { connect, type Socket } from 'node:net';
import { gzipSync } from 'node:zlib';
import type { Gateway } from '../../src/gateway';
import { eventually, fixture, KEY_A, KEY_B, startGateway } from '../helpers/gateway';

/**
 * The HTTP edge against hostile clients (issue 10, points 1, 3, 6 and 9): JSON that parses but nests, repeats
 * keys or carries lone surrogates gets a 4xx naming the place; compressed bodies are limited and budgeted by
 * their decoded size; an over-limit Content-Length is refused at once; one client's slow uploads cannot take
 * the room of the others; slow and too many connections are cut off.
 */

interface Raw {
  socket: Socket;
  /** Everything the server sent so far. */
  text: () => string;
  /** Resolves with the time (Date.now()) the server closed the connection. */
  closed: Promise<number>;
  /** Waits until what the server sent matches. */
  answer: (re?: RegExp, timeoutMs?: number) => Promise<string>;
}

/** A connection written byte for byte, so no HTTP client buffers, fixes or holds back what the test sends. */
function raw(gw: Gateway, first?: string | Buffer): Promise<Raw> {
  const url = new URL(gw.url);
  return new Promise((resolve, reject) => {
    let received = '';
    const socket = connect(Number(url.port), url.hostname);
    const closed = new Promise<number>((done) => socket.once('close', () => done(Date.now())));
    socket.on('data', (d) => (received += d.toString('latin1')));
    socket.on('error', () => undefined);
    socket.once('connect', () => {
      if (first !== undefined) socket.write(first);
      resolve({
        socket,
        text: () => received,
        closed,
        answer: (re = /\r\n\r\n/, timeoutMs = 5000) =>
          eventually(async () => (re.test(received) ? received : undefined), timeoutMs, 10).catch(() => {
            throw new Error(`no answer matching ${re} within ${timeoutMs} ms; got ${JSON.stringify(received.slice(0, 300))}`);
          }),
      });
    });
    socket.once('error', reject);
  });
}

const head = (gw: Gateway, headers: Record<string, string | number>, path = '/referrals'): string =>
  `POST ${path} HTTP/1.1\r\nHost: ${new URL(gw.url).host}\r\n${Object.entries(headers)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join('')}\r\n`;

const outcomeOf = (answer: string): { resourceType: string; issue: Array<{ code: string; expression?: string[]; details: { text: string } }> } =>
  JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as never;

async function inFlight(gw: Gateway): Promise<number> {
  const m = /^referral_intake_bytes_in_flight (\d+)$/m.exec(await (await fetch(`${gw.url}/metrics`)).text());
  return Number(m?.[1]);
}

const submit = (gw: Gateway, body: string | Uint8Array, headers: Record<string, string> = {}, key = KEY_A): Promise<Response> =>
  fetch(`${gw.url}/referrals`, { method: 'POST', headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json', ...headers }, body });

/** The client's referrals with this externalId, as GET /referrals lists them. */
async function listed(gw: Gateway, externalId: string, key = KEY_A): Promise<unknown[]> {
  const res = await fetch(`${gw.url}/referrals?externalId=${encodeURIComponent(externalId)}`, { headers: { Authorization: `Bearer ${key}` } });
  expect(res.status).toBe(200);
  return ((await res.json()) as { items: unknown[] }).items;
}

type Outcome = ReturnType<typeof outcomeOf>;
const expressions = (o: Outcome): string[] => o.issue.flatMap((i) => i.expression ?? []);
const texts = (o: Outcome): string => o.issue.map((i) => i.details.text).join(' | ');

describe('JSON bodies: depth, duplicate keys, Unicode, charset', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ MAX_BODY_BYTES: String(1_000_000) });
  });
  afterAll(async () => {
    await gw.stop();
  });

  /** The fixture as JSON text with `replace` applied to it: the attacks below are not expressible as objects. */
  const text = (externalId: string, edit: (json: string) => string): string => edit(JSON.stringify({ ...fixture(), externalId }));

  test('5,000 nested arrays in questions, or deeply nested objects, answer 400 naming MAX_JSON_DEPTH and where', async () => {
    const arrays = text('EHR-DEEP-ARRAYS', (j) => j.replace(/"questions":\[[^\]]*\]/, `"questions":${'['.repeat(5000)}${']'.repeat(5000)}`));
    const res = await submit(gw, arrays);
    expect(res.status).toBe(400);
    const o = (await res.json()) as Outcome;
    expect(o.resourceType).toBe('OperationOutcome');
    expect(texts(o)).toMatch(/deeper than the limit of 64 levels \(MAX_JSON_DEPTH\)/);
    expect(expressions(o)[0]).toMatch(/^questions(\[0\]){63}$/);

    const objects = text('EHR-DEEP-OBJECTS', (j) => j.replace('"gender":"female"', `"gender":"female","extra":${'{"x":'.repeat(3000)}1${'}'.repeat(3000)}`));
    const res2 = await submit(gw, objects);
    expect(res2.status).toBe(400);
    const o2 = (await res2.json()) as Outcome;
    expect(texts(o2)).toMatch(/MAX_JSON_DEPTH/);
    expect(expressions(o2)[0]).toMatch(/^patient\.extra(\.x)+$/);

    expect(await listed(gw, 'EHR-DEEP-ARRAYS')).toHaveLength(0);
    expect(await listed(gw, 'EHR-DEEP-OBJECTS')).toHaveLength(0);
  });

  test('a key twice in one object answers 400 naming the key and its place, also when spelled with escapes', async () => {
    const consent = text('EHR-DUP-CONSENT', (j) => j.replace('"patientAgreed":true', '"patientAgreed":false,"patientAgreed":true'));
    expect(consent).toContain('"patientAgreed":false,"patientAgreed":true');
    const res = await submit(gw, consent);
    expect(res.status).toBe(400);
    const o = (await res.json()) as Outcome;
    expect(o.issue[0].code).toBe('structure');
    expect(texts(o)).toMatch(/"patientAgreed" appears more than once in consent/);
    expect(expressions(o)).toEqual(['consent.patientAgreed']);

    // Nested, and the second spelled with a \u escape: still the same key.
    const nested = text('EHR-DUP-NESTED', (j) => j.replace(/("identifiers":\[\{"system":"[^"]*","value":"[^"]*")/, '$1,"\\u0076alue":"MRN-OTHER"'));
    expect(nested).toContain('"\\u0076alue":"MRN-OTHER"');
    const res2 = await submit(gw, nested);
    expect(res2.status).toBe(400);
    const o2 = (await res2.json()) as Outcome;
    expect(texts(o2)).toMatch(/"value" appears more than once in patient\.identifiers\[0\]/);
    expect(expressions(o2)).toEqual(['patient.identifiers[0].value']);

    expect(await listed(gw, 'EHR-DUP-CONSENT')).toHaveLength(0);
    expect(await listed(gw, 'EHR-DUP-NESTED')).toHaveLength(0);
  });

  test('a lone UTF-16 surrogate in an identifier value or a name answers 422 naming the field; nothing is stored', async () => {
    const body = fixture();
    const withSurrogate = (edit: (b: Record<string, any>) => void, externalId: string): string => {
      const b = { ...structuredClone(body), externalId };
      edit(b);
      // JSON.stringify writes a lone surrogate as the escape \ud800, as a client's JSON library would.
      return JSON.stringify(b);
    };
    const idBody = withSurrogate((b) => (b.patient.identifiers[0].value = 'MRN-\ud800-1'), 'EHR-LONE-ID');
    expect(idBody).toContain('MRN-\\ud800-1');
    const res = await submit(gw, idBody, {}, KEY_B);
    expect(res.status).toBe(422);
    const o = (await res.json()) as Outcome;
    expect(expressions(o)).toEqual(['patient.identifiers[0].value']);
    expect(texts(o)).toMatch(/not well-formed Unicode/);

    const nameBody = withSurrogate((b) => (b.patient.name.family = 'R\udc00o'), 'EHR-LONE-NAME');
    const res2 = await submit(gw, nameBody, {}, KEY_B);
    expect(res2.status).toBe(422);
    expect(expressions((await res2.json()) as Outcome)).toEqual(['patient.name.family']);

    const list = await fetch(`${gw.url}/referrals`, { headers: { Authorization: `Bearer ${KEY_B}` } });
    expect(((await list.json()) as { items: unknown[] }).items).toHaveLength(0);
  });

  test('only UTF-8: bytes that are not UTF-8 answer 400, another charset 415, an unknown Content-Encoding 415', async () => {
    const bytes = Buffer.from(
      JSON.stringify({ ...fixture(), externalId: 'EHR-LATIN1', patient: { ...fixture().patient, name: { given: ['Zoë'], family: 'Müller' } } }),
      'latin1'
    );
    const res = await submit(gw, bytes);
    expect(res.status).toBe(400);
    expect(texts((await res.json()) as Outcome)).toMatch(/not valid UTF-8/);

    const utf16 = await submit(gw, Buffer.from(JSON.stringify({ ...fixture(), externalId: 'EHR-UTF16' }), 'utf16le'), {
      'Content-Type': 'application/json; charset=utf-16le',
    });
    expect(utf16.status).toBe(415);
    expect(((await utf16.json()) as Outcome).resourceType).toBe('OperationOutcome');

    const compress = await submit(gw, JSON.stringify(fixture()), { 'Content-Encoding': 'compress' });
    expect(compress.status).toBe(415);
    expect(expressions((await compress.json()) as Outcome)).toEqual(['Content-Encoding']);

    expect(await listed(gw, 'EHR-LATIN1')).toHaveLength(0);
    expect(await listed(gw, 'EHR-UTF16')).toHaveLength(0);
  });
});

describe('compressed bodies and declared lengths', () => {
  let gw: Gateway;
  beforeAll(async () => {
    // The share is the whole budget here: this is about what a body costs, not about fairness.
    gw = await startGateway({
      MAX_BODY_BYTES: String(1_000_000),
      MAX_INTAKE_BYTES_IN_FLIGHT: String(2_000_000),
      INTAKE_WAIT_MS: '300',
      INTAKE_CLIENT_SHARE: '1',
    });
  });
  afterAll(async () => {
    await gw.stop();
  });

  /** 15 MB of JSON that gzips to about 15 KB. */
  const bomb = gzipSync(Buffer.from(`{"externalId":"EHR-BOMB","questions":["${'A'.repeat(15_000_000)}"]}`), { level: 9 });

  test('a 15 KB gzip body that inflates past MAX_BODY_BYTES answers 413 before the client has sent it all', async () => {
    expect(bomb.length).toBeLessThan(20_000);
    const c = await raw(
      gw,
      head(gw, { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', 'Content-Encoding': 'gzip', 'Content-Length': bomb.length })
    );
    // A third of it inflates to about 5 MB: the service must stop there, not wait for (and inflate) the rest.
    c.socket.write(bomb.subarray(0, Math.floor(bomb.length / 3)));
    try {
      const answer = await c.answer(/\r\n\r\n\{.*\}$/s, 3000);
      expect(answer).toMatch(/^HTTP\/1\.1 413 /);
      expect(texts(outcomeOf(answer))).toMatch(/MAX_BODY_BYTES/);
      await c.closed; // the connection is closed: the client stops sending
      expect(await inFlight(gw)).toBe(0);
    } finally {
      c.socket.destroy();
    }
  });

  test('gzip bodies are budgeted at MAX_BODY_BYTES, not at their compressed length; a valid gzip referral is accepted', async () => {
    const partial = gzipSync(Buffer.from(JSON.stringify({ ...fixture(), externalId: 'EHR-GZ-SLOW' })));
    const slow = async (): Promise<Raw> => {
      const c = await raw(
        gw,
        head(gw, { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', 'Content-Encoding': 'gzip', 'Content-Length': partial.length })
      );
      c.socket.write(partial.subarray(0, 10)); // the gzip header, then nothing
      return c;
    };
    const open: Raw[] = [];
    const valid = gzipSync(Buffer.from(JSON.stringify({ ...fixture(), externalId: 'EHR-GZ-OK' })));
    try {
      open.push(await slow());
      // Its compressed length is about 1.5 KB; what it may inflate to (and what is held) is MAX_BODY_BYTES.
      await eventually(async () => (await inFlight(gw)) === 1_000_000, 3000);
      open.push(await slow());
      await eventually(async () => (await inFlight(gw)) === 2_000_000, 3000);

      const refused = await submit(gw, valid, { 'Content-Encoding': 'gzip' });
      expect(refused.status).toBe(503); // no room: like two uncompressed bodies of MAX_BODY_BYTES
      expect(refused.headers.get('retry-after')).toBe('1');
    } finally {
      for (const c of open) c.socket.destroy();
    }
    await eventually(async () => (await inFlight(gw)) === 0);
    const accepted = await submit(gw, valid, { 'Content-Encoding': 'gzip' });
    expect(accepted.status).toBe(202);
    expect(((await accepted.json()) as { externalId: string }).externalId).toBe('EHR-GZ-OK');
  });

  test('Content-Length: 1 TB answers 413 at once, without a body and without waiting for the budget; the connection is closed', async () => {
    // Fill the budget first: a refusal that waited for room would take INTAKE_WAIT_MS and answer 503.
    const holders: Raw[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        holders.push(
          await raw(gw, head(gw, { Authorization: `Bearer ${KEY_B}`, 'Content-Type': 'application/json', 'Content-Length': 1_000_000 }) + '{"externalId":')
        );
      }
      await eventually(async () => (await inFlight(gw)) === 2_000_000, 3000);

      const started = Date.now();
      const c = await raw(gw, head(gw, { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', 'Content-Length': 1024 ** 4 }));
      const answer = await c.answer(/\r\n\r\n\{.*\}$/s, 3000);
      const closedAt = await Promise.race([c.closed, new Promise<number>((r) => setTimeout(() => r(Number.POSITIVE_INFINITY), 1500).unref())]);
      expect(answer).toMatch(/^HTTP\/1\.1 413 /);
      expect(answer).toMatch(/\r\nConnection: close\r\n/i);
      expect(texts(outcomeOf(answer))).toMatch(/limit of 1000000 bytes \(MAX_BODY_BYTES\)/);
      expect(closedAt - started).toBeLessThan(1000);
      expect(await inFlight(gw)).toBe(2_000_000); // it never took room
      c.socket.destroy();
    } finally {
      for (const h of holders) h.socket.destroy();
    }
    await eventually(async () => (await inFlight(gw)) === 0);
  });
});

describe('fair intake: a per-client share and a body deadline', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({
      MAX_BODY_BYTES: String(1_000_000),
      MAX_INTAKE_BYTES_IN_FLIGHT: String(1_200_000),
      INTAKE_CLIENT_SHARE: '0.5',
      INTAKE_WAIT_MS: '2000',
      INTAKE_BODY_TIMEOUT_MS: '1000',
    });
  });
  afterAll(async () => {
    await gw.stop();
  });

  test("client a's slow uploads cannot take client b's room; a's slow body gets 408 after INTAKE_BODY_TIMEOUT_MS", async () => {
    // Client a opens three uploads of 400 KB and sends one byte a second: 1.2 MB, the whole budget, twice its share.
    const uploads: Raw[] = [];
    const timers: NodeJS.Timeout[] = [];
    const slow = async (): Promise<Raw> => {
      const c = await raw(gw, head(gw, { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', 'Content-Length': 400_000 }) + '{"externalId":');
      timers.push(setInterval(() => c.socket.writable && c.socket.write(' '), 1000));
      uploads.push(c);
      return c;
    };
    try {
      const startedFirst = Date.now();
      const first = await slow();
      await eventually(async () => (await inFlight(gw)) === 400_000);
      await slow();
      await slow();
      await new Promise((r) => setTimeout(r, 100));
      // a's second and third wait: a already holds 400 KB of its 600 KB share.
      expect(await inFlight(gw)).toBe(400_000);

      // b's normal referral is served at once.
      const startedB = Date.now();
      const b = await submit(gw, JSON.stringify({ ...fixture(), externalId: 'EHR-FAIR-B' }), {}, KEY_B);
      expect(b.status).toBe(202);
      expect(Date.now() - startedB).toBeLessThan(1000);

      // a's first upload is cut off at its deadline, with an OperationOutcome, and its room is free at once.
      const answer = await first.answer(/\r\n\r\n\{.*\}$/s, 3000);
      expect(answer).toMatch(/^HTTP\/1\.1 408 /);
      expect(texts(outcomeOf(answer))).toMatch(/INTAKE_BODY_TIMEOUT_MS/);
      expect(Date.now() - startedFirst).toBeGreaterThanOrEqual(900);
      await first.closed;
    } finally {
      for (const t of timers) clearInterval(t);
      for (const u of uploads) u.socket.destroy();
    }
    await eventually(async () => (await inFlight(gw)) === 0);
    expect(await listed(gw, 'EHR-FAIR-B', KEY_B)).toHaveLength(1);
  });
});

describe('connections: a cap per address and a headers deadline', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await startGateway({ MAX_CONNECTIONS_PER_ADDRESS: '5', HEADERS_TIMEOUT_MS: '500' });
  });
  afterAll(async () => {
    await gw.stop();
  });

  test('the 6th concurrent connection from 127.0.0.1 gets 503 with Retry-After and is closed; a free slot serves again', async () => {
    const five = await Promise.all(Array.from({ length: 5 }, () => raw(gw, 'GET /healthz HTTP/1.1\r\n')));
    try {
      const sixth = await raw(gw, `GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n`);
      const answer = await sixth.answer(/too many open connections/, 2000);
      expect(answer).toMatch(/^HTTP\/1\.1 503 /);
      expect(answer).toMatch(/\r\nRetry-After: 1\r\n/);
      expect(answer).toMatch(/\r\nConnection: close\r\n/);
      await sixth.closed;

      five[0].socket.destroy();
      await five[0].closed;
      const served = await eventually(async () => {
        const c = await raw(gw, `GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
        const text = await c.answer(/\r\n\r\n/, 2000);
        await c.closed;
        return /^HTTP\/1\.1 200 /.test(text) ? text : undefined;
      }, 2000);
      expect(served).toMatch(/"status":"ok"/);
    } finally {
      for (const c of five) c.socket.destroy();
    }
    const metrics = await eventually(async () => {
      const m = await (await fetch(`${gw.url}/metrics`)).text();
      return /^http_connections_refused_total [1-9]/m.test(m) ? m : undefined;
    }, 2000);
    expect(metrics).toMatch(/^http_connections_refused_total [1-9]/m);
  });

  test('a client sending its headers slowly is answered 408 and closed after HEADERS_TIMEOUT_MS', async () => {
    const started = Date.now();
    const c = await raw(gw, `GET /healthz HTTP/1.1\r\nHost: x\r\n`);
    const drip = setInterval(() => c.socket.writable && c.socket.write('X'), 100);
    try {
      let timer: NodeJS.Timeout | undefined;
      const closedAt = await Promise.race([c.closed, new Promise<number>((r) => (timer = setTimeout(() => r(-1), 3000)))]);
      clearTimeout(timer);
      expect(closedAt).toBeGreaterThan(0);
      expect(closedAt - started).toBeGreaterThanOrEqual(450);
      expect(closedAt - started).toBeLessThan(2000);
      expect(c.text()).toMatch(/^HTTP\/1\.1 408 /);
    } finally {
      clearInterval(drip);
      c.socket.destroy();
    }
  });
});
