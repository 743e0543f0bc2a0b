import { once } from 'node:events';
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import {
  createMllpServer,
  frameMllp,
  MLLP_OVERSIZE_HEAD_BYTES,
  MllpError,
  type MllpConnection,
  type MllpServerOptions,
  sendMllp,
} from '../../src/intake/hl7v2/mllp';
import { logger } from '../../src/observability';
import { LogCapture } from '../helpers/log-capture';

/** MLLP framing over real sockets on loopback: splits, batches, order, size limit, disconnects, failures, idleness, and the client. */

const VT = 0x0b;
const FS = 0x1c;
const CR = 0x0d;
const PATIENT = 'DOE^JANE';

const hl7 = (id: string, extra = ''): string => `MSH|^~\\&|EHR|FAC|GW|CC|20240101120000||ORM^O01|${id}|P|2.5\rPID|1||123^^^MRN||${PATIENT}\r${extra}`;
const ack = (message: Buffer | string): string => `MSA|AA|${controlId(message)}`;
const controlId = (message: Buffer | string): string => message.toString('utf8').split('\r')[0].split('|')[9] ?? '';
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function eventually(check: () => boolean, timeoutMs = 2000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > until) {
      throw new Error('condition not met in time');
    }
    await sleep(5);
  }
}

const servers: Server[] = [];
const sockets = new Set<Socket>();

async function listen(server: Server): Promise<number> {
  servers.push(server);
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

interface Started {
  port: number;
  server: Server;
  calls: Buffer[];
  connections: MllpConnection[];
  /** The server's side of each connection, to see what it has read. */
  accepted: Socket[];
}

async function start(overrides: Partial<MllpServerOptions> = {}): Promise<Started> {
  const calls: Buffer[] = [];
  const connections: MllpConnection[] = [];
  const server = createMllpServer({
    maxMessageBytes: 4096,
    onMessage: async (message, connection) => {
      calls.push(message);
      connections.push(connection);
      return ack(message);
    },
    onOversize: (head) => `MSA|AR|${controlId(head)}`,
    ...overrides,
  });
  const accepted: Socket[] = [];
  server.on('connection', (s: Socket) => accepted.push(s));
  const port = await listen(server);
  return { port, server, calls, connections, accepted };
}

/** A raw client that collects the server's framed replies (parsed here, independently of the module). */
interface Peer {
  socket: Socket;
  replies: string[];
  closed: Promise<void>;
  reply(n: number): Promise<string[]>;
}

async function peer(port: number): Promise<Peer> {
  const socket = connect({ port, host: '127.0.0.1', noDelay: true });
  sockets.add(socket);
  await once(socket, 'connect');
  const replies: string[] = [];
  let buf = Buffer.alloc(0);
  socket.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    for (let end = buf.indexOf('\x1c\r'); end >= 0; end = buf.indexOf('\x1c\r')) {
      replies.push(buf[0] === VT ? buf.subarray(1, end).toString('utf8') : 'UNFRAMED');
      buf = buf.subarray(end + 2);
    }
  });
  socket.on('error', () => undefined);
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  return {
    socket,
    replies,
    closed,
    reply: async (n) => {
      await eventually(() => replies.length >= n);
      return replies;
    },
  };
}

const capture = new LogCapture({ level: 'silly' });
const savedLevel = logger.level;

beforeAll(() => {
  logger.level = 'silly';
  logger.add(capture);
  for (const t of logger.transports) if (t !== capture) t.silent = true;
});

afterAll(async () => {
  for (const t of logger.transports) t.silent = false;
  logger.remove(capture);
  logger.level = savedLevel;
  for (const s of sockets) s.destroy();
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  // Nothing logged carries message content.
  expect(capture.lines.length).toBeGreaterThan(0);
  expect(capture.lines.join('\n')).not.toContain('DOE');
  expect(capture.lines.join('\n')).not.toContain('MSH');
});

describe('MLLP server framing', () => {
  test('a message split byte by byte, the connection described to the handler, the reply framed', async () => {
    const { port, calls, connections } = await start();
    const p = await peer(port);
    for (const byte of frameMllp(hl7('BYTES'))) {
      await new Promise<void>((resolve) => p.socket.write(Buffer.from([byte]), () => resolve()));
    }
    expect(await p.reply(1)).toEqual(['MSA|AA|BYTES']);
    expect(calls.map((c) => c.toString())).toEqual([hl7('BYTES')]);
    expect(Buffer.isBuffer(calls[0])).toBe(true);
    expect(connections[0]).toEqual({ id: expect.any(String), remoteAddress: '127.0.0.1', remotePort: p.socket.localPort, localPort: port });
  });

  test('an end block split between packets: 0x1C alone does not end the message, 0x1C then another byte is content', async () => {
    const { port, calls } = await start();
    const p = await peer(port);
    const framed = frameMllp(hl7('SPLITEND'));
    p.socket.write(framed.subarray(0, framed.length - 1)); // up to and including 0x1C
    await sleep(30);
    expect(calls).toHaveLength(0);
    p.socket.write(framed.subarray(framed.length - 1)); // the 0x0D
    expect(await p.reply(1)).toEqual(['MSA|AA|SPLITEND']);

    // A lone 0x1C inside the content (split right after it) stays in the message.
    p.socket.write(Buffer.concat([Buffer.from([VT]), Buffer.from(hl7('LONEFS', 'NTE|1||a')), Buffer.from([FS])]));
    await sleep(30);
    p.socket.write(Buffer.concat([Buffer.from('b\r'), Buffer.from([FS, CR])]));
    expect(await p.reply(2)).toEqual(['MSA|AA|SPLITEND', 'MSA|AA|LONEFS']);
    expect(calls[1].toString()).toBe(hl7('LONEFS', 'NTE|1||a\x1cb\r'));
  });

  test('several messages in one write, with stray line ends and junk between them, are answered in order', async () => {
    const { port, calls } = await start();
    const p = await peer(port);
    p.socket.write(
      Buffer.concat([
        Buffer.from('GET / HTTP/1.1\r\n\r\n'),
        frameMllp(hl7('A')),
        Buffer.from('\r\n'),
        frameMllp(hl7('B')),
        frameMllp(hl7('C')),
        Buffer.from('\n'),
      ])
    );
    expect(await p.reply(3)).toEqual(['MSA|AA|A', 'MSA|AA|B', 'MSA|AA|C']);
    expect(calls.map((c) => c.toString())).toEqual([hl7('A'), hl7('B'), hl7('C')]);
  });

  test('one message at a time per connection: a slow first handler is answered before a fast second one', async () => {
    const events: string[] = [];
    const { port } = await start({
      onMessage: async (message) => {
        const id = controlId(message);
        events.push(`start ${id}`);
        await sleep(id === 'SLOW' ? 150 : 1);
        events.push(`end ${id}`);
        return ack(message);
      },
    });
    const p = await peer(port);
    p.socket.write(Buffer.concat([frameMllp(hl7('SLOW')), frameMllp(hl7('FAST'))]));
    expect(await p.reply(2)).toEqual(['MSA|AA|SLOW', 'MSA|AA|FAST']);
    expect(events).toEqual(['start SLOW', 'end SLOW', 'start FAST', 'end FAST']);
  });

  test('an oversize message is answered by onOversize with its head, and the next message on the connection is answered', async () => {
    const heads: Buffer[] = [];
    const { port, calls } = await start({
      maxMessageBytes: 1024,
      onOversize: (head) => {
        heads.push(head);
        return `MSA|AR|${controlId(head)}`;
      },
    });
    const p = await peer(port);
    const small = hl7('BIGSMALL', 'OBX|1|TX|||' + 'x'.repeat(2000) + '\r');
    const big = hl7('BIG', 'OBX|1|TX|||' + 'y'.repeat(200_000) + '\r');
    p.socket.write(frameMllp(small).subarray(0, 700));
    p.socket.write(frameMllp(small).subarray(700));
    p.socket.write(Buffer.concat([frameMllp(big), frameMllp(hl7('NEXT'))]));
    expect(await p.reply(3)).toEqual(['MSA|AR|BIGSMALL', 'MSA|AR|BIG', 'MSA|AA|NEXT']);
    expect(calls.map((c) => c.toString())).toEqual([hl7('NEXT')]);
    expect(heads[0].toString()).toBe(small); // under 64 KiB: the whole of it, nothing more
    expect(heads[1]).toHaveLength(MLLP_OVERSIZE_HEAD_BYTES);
    expect(heads[1].toString()).toBe(big.slice(0, MLLP_OVERSIZE_HEAD_BYTES));
    // A message exactly at the limit is accepted.
    const exact = hl7('EXACT');
    const atLimit = exact + 'z'.repeat(1024 - Buffer.byteLength(exact));
    p.socket.write(frameMllp(atLimit));
    expect((await p.reply(4))[3]).toBe('MSA|AA|EXACT');
  });

  test('back-pressure: while a handler runs the server stops reading, and carries on once it resolves', async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const { port, accepted } = await start({
      maxMessageBytes: 1024,
      onMessage: async (message) => {
        if (controlId(message) === 'HOLD') {
          await released;
        }
        return ack(message);
      },
    });
    const p = await peer(port);
    const flood = Buffer.alloc(12 * 1024 * 1024, 0x41); // an oversize frame's content, far more than socket buffers hold
    p.socket.write(frameMllp(hl7('HOLD')));
    p.socket.write(Buffer.concat([Buffer.from([VT]), Buffer.from(hl7('FLOOD')), flood, Buffer.from([FS, CR])]));
    p.socket.write(frameMllp(hl7('AFTER')));
    await sleep(150);
    // The server has read little more than the first message (its socket's buffer fills, then the kernel's): the rest waits on the sender's side.
    expect(accepted[0].bytesRead).toBeLessThan(1024 * 1024);
    expect(p.socket.writableLength).toBeGreaterThan(6 * 1024 * 1024);
    release();
    // Draining the flood takes a while on a loaded 2-core machine (the full suite runs beside other work).
    await eventually(() => p.replies.length >= 3, 20_000);
    expect(p.replies).toEqual(['MSA|AA|HOLD', 'MSA|AR|FLOOD', 'MSA|AA|AFTER']);
  }, 30_000);

  test('a peer that disconnects mid-message leaves nothing behind: the handler is never called for it', async () => {
    const { port, server, calls } = await start();
    const p = await peer(port);
    const framed = frameMllp(hl7('HALF'));
    p.socket.write(framed.subarray(0, framed.length - 1)); // everything but the final 0x0D
    await sleep(30);
    p.socket.destroy();
    const open = (): Promise<number> => new Promise((resolve) => server.getConnections((_e, n) => resolve(n)));
    while ((await open()) > 0) {
      await sleep(5);
    }
    expect(calls).toHaveLength(0);
    // What the server held of it (the content and the 0x1C waiting for its 0x0D) was dropped, and only counted in the log.
    expect(capture.lines.join('\n')).toContain(`"partialBytesDropped":${Buffer.byteLength(hl7('HALF')) + 1}`);
    // The server takes the next connection as usual.
    expect((await sendMllp('127.0.0.1', port, hl7('NEWCONN'), { timeoutMs: 1000 })).toString()).toBe('MSA|AA|NEWCONN');
  });

  test('a peer that half-closes after its messages still gets every reply, then the server ends the connection', async () => {
    const { port } = await start({
      onMessage: async (message) => {
        await sleep(20);
        return ack(message);
      },
    });
    const p = await peer(port);
    p.socket.end(Buffer.concat([frameMllp(hl7('H1')), frameMllp(hl7('H2'))]));
    await p.closed;
    expect(p.replies).toEqual(['MSA|AA|H1', 'MSA|AA|H2']);
  });

  test('a handler that rejects or throws closes that connection without a reply; the process and the server go on', async () => {
    const { port } = await start({
      onMessage: async (message) => {
        const id = controlId(message);
        if (id === 'REJECT') {
          throw new Error(`cannot store ${message.toString()}`); // content in the error: it must not reach the logs
        }
        if (id === 'THROW') {
          throw new TypeError(message.toString());
        }
        return ack(message);
      },
    });
    const before = capture.lines.length;
    for (const id of ['REJECT', 'THROW']) {
      const p = await peer(port);
      p.socket.write(Buffer.concat([frameMllp(hl7(id)), frameMllp(hl7('QUEUED'))]));
      await p.closed;
      expect(p.replies).toEqual([]); // nor is the message queued behind it answered
    }
    const failures = capture.lines.slice(before).filter((l) => l.includes('handler failed'));
    expect(failures).toHaveLength(2);
    expect(failures.join()).toContain('"error":"TypeError"');
    expect((await sendMllp('127.0.0.1', port, hl7('STILLUP'), { timeoutMs: 1000 })).toString()).toBe('MSA|AA|STILLUP');
  });

  test('a reply holding framing bytes is a handler failure too (it would break the framing)', async () => {
    const { port } = await start({ onMessage: async () => 'MSA|AA|X\x1c\r' });
    const p = await peer(port);
    p.socket.write(frameMllp(hl7('BADREPLY')));
    await p.closed;
    expect(p.replies).toEqual([]);
  });

  test('an idle connection is closed; a handler slower than the idle timeout is not idleness', async () => {
    const { port } = await start({
      idleTimeoutMs: 100,
      onMessage: async (message) => {
        await sleep(250);
        return ack(message);
      },
    });
    const p = await peer(port);
    p.socket.write(frameMllp(hl7('SLOWER')));
    expect(await p.reply(1)).toEqual(['MSA|AA|SLOWER']);
    const repliedAt = Date.now();
    await p.closed;
    const idleFor = Date.now() - repliedAt;
    expect(idleFor).toBeGreaterThanOrEqual(50);
    expect(idleFor).toBeLessThan(1000);
  });
});

describe('sendMllp', () => {
  /** A plain TCP server with a scripted behaviour on the first packet it gets, to play a misbehaving MLLP peer. */
  async function rawServer(onData: (socket: Socket, data: Buffer) => void): Promise<number> {
    const server = createServer((socket) => socket.once('data', (d: Buffer) => onData(socket, d)));
    return listen(server);
  }

  test('sends a framed message and resolves with the unframed reply, strings as UTF-8', async () => {
    const received: string[] = [];
    const { port } = await start({
      onMessage: async (message) => {
        received.push(message.toString('utf8'));
        return `${ack(message)}|Zoë`;
      },
    });
    const reply = await sendMllp('127.0.0.1', port, Buffer.from(hl7('CLIENT')), { timeoutMs: 1000 });
    expect(reply.toString('utf8')).toBe('MSA|AA|CLIENT|Zoë');
    expect(received).toEqual([hl7('CLIENT')]);
  });

  test('a reply split across packets, after a stray line end', async () => {
    const port = await rawServer((socket) => {
      const framed = frameMllp('MSA|AA|SPLIT');
      socket.write(Buffer.concat([Buffer.from('\r\n'), framed.subarray(0, 5)]));
      setTimeout(() => socket.write(framed.subarray(5, framed.length - 1)), 20);
      setTimeout(() => socket.write(framed.subarray(framed.length - 1)), 40);
    });
    expect((await sendMllp('127.0.0.1', port, hl7('X'), { timeoutMs: 1000 })).toString()).toBe('MSA|AA|SPLIT');
  });

  test('rejects on timeout when the server never replies', async () => {
    const port = await rawServer(() => undefined);
    const startedAt = Date.now();
    await expect(sendMllp('127.0.0.1', port, hl7('WAIT'), { timeoutMs: 150 })).rejects.toMatchObject({ name: 'MllpError', reason: 'timeout' });
    expect(Date.now() - startedAt).toBeLessThan(1000);
  });

  test('rejects when the server closes without replying, or mid-reply', async () => {
    const closing = await rawServer((socket) => socket.destroy());
    await expect(sendMllp('127.0.0.1', closing, hl7('CLOSE'), { timeoutMs: 1000 })).rejects.toMatchObject({ reason: 'closed' });
    const partial = await rawServer((socket) => socket.end(frameMllp('MSA|AA|CUT').subarray(0, 6)));
    await expect(sendMllp('127.0.0.1', partial, hl7('CUT'), { timeoutMs: 1000 })).rejects.toMatchObject({ reason: 'closed' });
  });

  test('rejects an unframed reply, and one over maxReplyBytes', async () => {
    const http = await rawServer((socket) => socket.write('HTTP/1.1 400 Bad Request\r\n\r\n'));
    await expect(sendMllp('127.0.0.1', http, hl7('HTTP'), { timeoutMs: 1000 })).rejects.toMatchObject({ reason: 'unframed' });
    const big = await rawServer((socket) => socket.write(Buffer.concat([Buffer.from([VT]), Buffer.alloc(2000, 0x41)])));
    await expect(sendMllp('127.0.0.1', big, hl7('BIG'), { timeoutMs: 1000, maxReplyBytes: 1000 })).rejects.toMatchObject({ reason: 'oversize' });
  });

  test('rejects with the socket error when nothing listens, and a message holding framing bytes before connecting', async () => {
    const server = createServer();
    const port = await listen(server);
    await new Promise((resolve) => server.close(resolve));
    await expect(sendMllp('127.0.0.1', port, hl7('NOBODY'), { timeoutMs: 1000 })).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    await expect(sendMllp('127.0.0.1', port, 'MSH|\x0b')).rejects.toBeInstanceOf(RangeError);
    expect(new MllpError('closed', 'x')).toBeInstanceOf(Error);
  });
});
