// MLLP (HL7 v2's Minimal Lower Layer Protocol, release 1): each message travels as 0x0B <bytes> 0x1C 0x0D over
// TCP. A server that hands whole messages to an async handler one at a time per connection, and a client that
// sends one message and waits for the reply. Written over node:net rather than @medplum/hl7's Hl7Server (5.0.10):
// that server buffers without limit (no maximum size, so no AR for an oversize message), re-scans its whole buffer
// on every packet, writes replies in the order handlers finish rather than the order messages arrived, drops the
// rest of a packet after a frame it cannot parse, and pins @medplum/core 5.0.10 (a second copy beside ours).
//
// What this module does with the bytes:
//   - Outside a frame, every byte up to the next start block (0x0B) is skipped: a stray CR/LF between frames, a
//     port scanner's probe, an HTTP request sent to the wrong port. Skipped bytes are counted, never buffered and
//     never answered (there is no frame to answer); the count is logged at debug level, with no content.
//   - Inside a frame, 0x1C 0x0D ends it, even when the two bytes arrive in different packets. A 0x1C not followed
//     by 0x0D is content, and so is a 0x0B (the standard forbids both in content; we pass them on rather than guess).
//   - A frame larger than maxMessageBytes is discarded as it arrives (only its first 64 KiB are kept, for the
//     caller to read MSH and build an AR ACK); at its end block onOversize answers it and the connection goes on.
//   - A connection runs one message at a time: while a handler runs, the socket is paused, so the kernel's TCP
//     window holds the sender back. What a connection holds is at most the message being read (maxMessageBytes,
//     or 64 KiB while discarding an oversize one), the packet being parsed, and one unflushed reply.
//   - A partial frame at disconnect is dropped: its handler is never called.
//   - A handler that throws or rejects: the connection is closed without a reply (the sender sees the close, knows
//     the message was not taken, and resends on a new connection; replying nothing on an open connection would only
//     make it wait for its own timeout). Only the connection id and the error's name are logged, never its message,
//     which might quote the content.
import { randomUUID } from 'node:crypto';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { logger } from '../../observability';

const VT = 0x0b;
const FS = 0x1c;
const CR = 0x0d;
const LF = 0x0a;
/** Kept of an oversize message for onOversize: enough for the MSH segment, whatever comes after it. */
export const MLLP_OVERSIZE_HEAD_BYTES = 64 * 1024;
const DEFAULT_IDLE_TIMEOUT_MS = 10 * 60 * 1000;
const DEFAULT_SEND_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_REPLY_BYTES = 16 * 1024 * 1024;
const FS_BYTE = Buffer.from([FS]);

export interface MllpServerOptions {
  /** Largest message accepted (bytes between the start and end block). A larger one is not buffered beyond the limit: its bytes are discarded until its end block, then `onOversize` answers it, and the connection stays open for the next message. */
  maxMessageBytes: number;
  /** Called once per whole message (without the framing bytes), in order per connection; its answer is written back framed. Replies go out in the order messages arrived, even if a later handler finishes first (process one message per connection at a time). A string answer is sent as UTF-8. */
  onMessage(message: Buffer, connection: MllpConnection): Promise<Buffer | string>;
  /** The reply to an oversize message: given the first bytes received (up to 64 KiB, enough to read the MSH segment to build an AR ACK). */
  onOversize(head: Buffer, connection: MllpConnection): Buffer | string;
  /** Close a connection idle this long (default 10 min). A connection whose handler is still running is not idle. */
  idleTimeoutMs?: number;
  /** Bytes before a start block (garbage, a peer's stray newline) are skipped: counted, never buffered nor answered (see the top of this file). */
}

export interface MllpConnection {
  id: string;
  remoteAddress: string;
  remotePort: number;
  localPort: number;
}

export interface SendMllpOptions {
  /** The whole exchange (connect, send, reply) must finish within this (default 30 s). */
  timeoutMs?: number;
  /** A longer reply is refused (default 16 MiB). */
  maxReplyBytes?: number;
  /** Gives up (MllpError `aborted`) and closes the connection when it aborts (a sender shutting down). */
  signal?: AbortSignal;
}

/** Why sendMllp gave up, other than a socket error (ECONNREFUSED and the like reject with node's own error). */
export class MllpError extends Error {
  override readonly name = 'MllpError';
  constructor(
    readonly reason: 'timeout' | 'closed' | 'unframed' | 'oversize' | 'aborted',
    message: string
  ) {
    super(message);
  }
}

/** One message in its MLLP frame. The content must not hold the start block or the end block's 0x1C (it would end the frame early). */
export function frameMllp(message: Buffer | string): Buffer {
  const content = typeof message === 'string' ? Buffer.from(message, 'utf8') : message;
  if (content.includes(VT) || content.includes(FS)) {
    throw new RangeError('an MLLP message must not contain 0x0B or 0x1C');
  }
  const framed = Buffer.allocUnsafe(content.length + 3);
  framed[0] = VT;
  content.copy(framed, 1);
  framed[content.length + 1] = FS;
  framed[content.length + 2] = CR;
  return framed;
}

type Frame = { kind: 'message'; message: Buffer } | { kind: 'oversize'; head: Buffer; length: number };

/** Reads frames out of a byte stream, a packet at a time, holding at most one message (or an oversize one's head). */
class MllpDecoder {
  private inFrame = false;
  private oversize = false;
  /** The last byte of the frame so far was 0x1C: the next byte decides whether it was the end block. */
  private fsHeld = false;
  private chunks: Buffer[] = [];
  /** Content bytes of the current frame so far (all of them, also when oversize and discarded). */
  private length = 0;
  private head: Buffer[] = [];
  private headLength = 0;
  /** Bytes skipped outside frames since the last call to takeSkipped. */
  private skipped = 0;

  constructor(private readonly maxBytes: number) {}

  /** Content bytes of an unfinished frame (0 between frames). */
  get partialBytes(): number {
    return this.inFrame ? this.length + (this.fsHeld ? 1 : 0) : 0;
  }

  get betweenFrames(): boolean {
    return !this.inFrame;
  }

  /** The frame being read is already over the limit (its bytes are being discarded). */
  get overLimit(): boolean {
    return this.inFrame && this.oversize;
  }

  takeSkipped(): number {
    const n = this.skipped;
    this.skipped = 0;
    return n;
  }

  /** Reads data from offset until one frame ends (returned, with where it ended) or data runs out. */
  feed(data: Buffer, offset: number): { frame?: Frame; next: number } {
    let i = offset;
    while (i < data.length) {
      if (!this.inFrame) {
        const start = data.indexOf(VT, i);
        if (start < 0) {
          this.skipped += data.length - i;
          return { next: data.length };
        }
        this.skipped += start - i;
        this.begin();
        i = start + 1;
        continue;
      }
      if (this.fsHeld) {
        this.fsHeld = false;
        if (data[i] === CR) {
          return { frame: this.finish(), next: i + 1 };
        }
        this.append(FS_BYTE);
      }
      const fs = data.indexOf(FS, i);
      if (fs < 0) {
        this.append(data.subarray(i));
        return { next: data.length };
      }
      this.append(data.subarray(i, fs));
      if (fs + 1 === data.length) {
        this.fsHeld = true;
        return { next: data.length };
      }
      if (data[fs + 1] === CR) {
        return { frame: this.finish(), next: fs + 2 };
      }
      this.append(FS_BYTE);
      i = fs + 1;
    }
    return { next: i };
  }

  /** Forgets an unfinished frame (the peer went away). */
  reset(): void {
    this.inFrame = false;
    this.oversize = false;
    this.fsHeld = false;
    this.chunks = [];
    this.head = [];
    this.length = 0;
    this.headLength = 0;
  }

  private begin(): void {
    this.reset();
    this.inFrame = true;
  }

  private append(piece: Buffer): void {
    if (piece.length === 0) {
      return;
    }
    this.length += piece.length;
    if (!this.oversize && this.length > this.maxBytes) {
      // From here on the frame is only counted; what was held becomes the start of the head.
      this.oversize = true;
      const held = this.chunks;
      this.chunks = [];
      for (const c of held) {
        this.keepHead(c);
      }
    }
    if (this.oversize) {
      this.keepHead(piece);
    } else {
      this.chunks.push(piece);
    }
  }

  private keepHead(piece: Buffer): void {
    const room = MLLP_OVERSIZE_HEAD_BYTES - this.headLength;
    if (room > 0) {
      // A copy: a slice would keep the whole packet it came from alive.
      const kept = Buffer.from(piece.subarray(0, room));
      this.head.push(kept);
      this.headLength += kept.length;
    }
  }

  private finish(): Frame {
    const frame: Frame = this.oversize
      ? { kind: 'oversize', head: Buffer.concat(this.head, this.headLength), length: this.length }
      : { kind: 'message', message: Buffer.concat(this.chunks, this.length) };
    this.reset();
    return frame;
  }
}

function replyBytes(reply: Buffer | string): Buffer {
  return typeof reply === 'string' ? Buffer.from(reply, 'utf8') : reply;
}

function errorName(err: unknown): string {
  return err instanceof Error ? err.name : typeof err;
}

/** Resolves once the socket has flushed its write buffer, or is gone. */
function drained(socket: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

/** A TCP server speaking MLLP; the caller listens (`server.listen(port, host)`) and closes it. */
export function createMllpServer(opts: MllpServerOptions): Server {
  if (!Number.isSafeInteger(opts.maxMessageBytes) || opts.maxMessageBytes < 1) {
    throw new RangeError('maxMessageBytes must be a positive integer');
  }
  const idleTimeoutMs = opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  // allowHalfOpen: a sender that shuts down its side after its last message still gets the replies.
  return createServer({ allowHalfOpen: true }, (socket) => serveConnection(socket, opts, idleTimeoutMs));
}

function serveConnection(socket: Socket, opts: MllpServerOptions, idleTimeoutMs: number): void {
  const connection: MllpConnection = {
    id: randomUUID(),
    remoteAddress: socket.remoteAddress ?? '',
    remotePort: socket.remotePort ?? 0,
    localPort: socket.localPort ?? 0,
  };
  const connectionId = connection.id;
  const decoder = new MllpDecoder(opts.maxMessageBytes);
  /** The packet being parsed, and where in it; kept while a handler runs (the socket is paused meanwhile). */
  let pending: Buffer | undefined;
  let offset = 0;
  let busy = false;
  let peerEnded = false;
  let messages = 0;

  logger.debug('mllp connection opened', { connectionId, remotePort: connection.remotePort, localPort: connection.localPort });
  socket.setNoDelay(true);
  socket.setTimeout(idleTimeoutMs);

  socket.on('timeout', () => {
    // A running handler is not idleness: its reply, when written, re-arms the timer.
    if (!busy) {
      logger.info('mllp connection idle, closing', { connectionId, idleTimeoutMs });
      socket.destroy();
    }
  });
  socket.on('data', (chunk: Buffer) => {
    // The socket is paused while anything is pending, so this is the only packet held; the branch is a safeguard.
    pending = pending ? Buffer.concat([pending.subarray(offset), chunk]) : chunk;
    offset = 0;
    pump();
  });
  socket.on('end', () => {
    // Emitted only once every packet before it was read, so all whole messages are answered before we end.
    peerEnded = true;
    pump();
  });
  socket.on('error', (err: NodeJS.ErrnoException) => {
    logger.debug('mllp connection error', { connectionId, code: err.code ?? err.name });
  });
  socket.on('close', () => {
    const partialBytes = decoder.partialBytes;
    decoder.reset();
    pending = undefined;
    logger.debug('mllp connection closed', { connectionId, messages, partialBytesDropped: partialBytes, skippedBytes: decoder.takeSkipped() });
  });

  function pump(): void {
    while (!busy && pending && !socket.destroyed) {
      const { frame, next } = decoder.feed(pending, offset);
      offset = next;
      if (offset >= pending.length) {
        pending = undefined;
      }
      if (frame) {
        busy = true;
        socket.pause();
        // answer() calls pump() again once the reply is out (synchronously for onOversize): nothing more to do here.
        void answer(frame);
        return;
      }
    }
    if (busy || socket.destroyed) {
      return;
    }
    if (peerEnded) {
      if (decoder.partialBytes > 0) {
        logger.info('mllp peer ended mid-message; dropped', { connectionId, partialBytes: decoder.partialBytes });
      }
      socket.end();
      return;
    }
    socket.resume();
  }

  async function answer(frame: Frame): Promise<void> {
    messages += 1;
    const skippedBytes = decoder.takeSkipped();
    if (skippedBytes > 0) {
      logger.debug('mllp bytes outside a frame skipped', { connectionId, skippedBytes });
    }
    let framed: Buffer;
    try {
      if (frame.kind === 'message') {
        framed = frameMllp(replyBytes(await opts.onMessage(frame.message, connection)));
      } else {
        logger.warn('mllp message over the size limit, discarded', { connectionId, bytes: frame.length, maxMessageBytes: opts.maxMessageBytes });
        framed = frameMllp(replyBytes(opts.onOversize(frame.head, connection)));
      }
    } catch (err) {
      logger.error('mllp handler failed; closing the connection without a reply', { connectionId, error: errorName(err) });
      socket.destroy();
      return;
    }
    if (socket.destroyed || !socket.writable) {
      logger.debug('mllp reply dropped: connection already closed', { connectionId });
      return;
    }
    if (!socket.write(framed)) {
      await drained(socket);
    }
    busy = false;
    pump();
  }
}

/** Sends one message over a new connection and resolves with the reply message (without framing); rejects on timeout, on close before a reply, or on an unframed reply. */
export function sendMllp(host: string, port: number, message: string | Buffer, opts: SendMllpOptions = {}): Promise<Buffer> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_SEND_TIMEOUT_MS;
  const maxReplyBytes = opts.maxReplyBytes ?? DEFAULT_MAX_REPLY_BYTES;
  const decoder = new MllpDecoder(maxReplyBytes);
  let framed: Buffer;
  try {
    framed = frameMllp(message);
  } catch (err) {
    return Promise.reject(err as Error);
  }
  if (opts.signal?.aborted) return Promise.reject(new MllpError('aborted', `sending to ${host}:${port} was aborted`));
  return new Promise<Buffer>((resolve, reject) => {
    const socket = connect({ host, port, noDelay: true });
    let settled = false;
    const onAbort = (): void => settle(new MllpError('aborted', `sending to ${host}:${port} was aborted`));
    const settle = (err: Error | undefined, reply?: Buffer): void => {
      if (settled) {
        return;
      }
      settled = true;
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      socket.destroy();
      if (err) {
        reject(err);
      } else {
        resolve(reply as Buffer);
      }
    };
    const timer = setTimeout(() => settle(new MllpError('timeout', `no MLLP reply from ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
    opts.signal?.addEventListener('abort', onAbort, { once: true });

    socket.write(framed);
    socket.on('data', (chunk: Buffer) => {
      let i = 0;
      while (i < chunk.length && !settled) {
        if (decoder.betweenFrames) {
          // Only line ends may come before the reply's start block; anything else is not MLLP.
          while (i < chunk.length && (chunk[i] === CR || chunk[i] === LF)) {
            i += 1;
          }
          if (i < chunk.length && chunk[i] !== VT) {
            settle(new MllpError('unframed', `the reply from ${host}:${port} is not an MLLP frame`));
            return;
          }
        }
        const { frame, next } = decoder.feed(chunk, i);
        i = next;
        if (decoder.overLimit || frame?.kind === 'oversize') {
          settle(new MllpError('oversize', `the reply from ${host}:${port} is over ${maxReplyBytes} bytes`));
        } else if (frame) {
          settle(undefined, frame.message);
        }
      }
    });
    socket.on('error', (err) => settle(err));
    socket.on('close', () => settle(new MllpError('closed', `${host}:${port} closed the connection before replying`)));
  });
}
