// Binary content for the FHIR sandbox: the bytes of Binaries uploaded raw (kept beside the resource,
// by id and version, instead of as base64 in Binary.data), and the presigned-URL storage server of the
// `presignedBinaryUrls` trait — a second loopback HTTP server standing in for Medplum's storage (S3 /
// CloudFront in production) that serves those bytes to whoever holds a signed, unexpired URL.
//
// A raw upload is received as a stream and hashed (SHA-256) as it arrives; past a small size it goes to a file in
// the sandbox's own temporary directory (removed when the sandbox closes), never into the heap: the sandbox runs
// inside the gateway's process by default, and a centre's Binary may be gigabytes. Reads stream it back.
import { createHash, createHmac, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream, createWriteStream, type WriteStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

/** A Binary version's content: its type, size and SHA-256 (as the server computed them), and its bytes on demand. */
export interface BinaryContent {
  contentType: string;
  /** Size in bytes. */
  readonly size: number;
  /** SHA-256 of the bytes, hex. */
  readonly sha256: string;
  /** The bytes as a stream (a fresh one each call). */
  open(): Readable;
  /** The bytes whole (for a JSON read, which carries them as base64). */
  read(): Promise<Buffer>;
}

/** Content held in memory (a Binary's decoded `data`, a small raw upload). */
export function memoryContent(contentType: string, bytes: Buffer): BinaryContent {
  let digest: string | undefined;
  return {
    contentType,
    size: bytes.length,
    get sha256() {
      digest ??= createHash('sha256').update(bytes).digest('hex');
      return digest;
    },
    open: () => Readable.from([bytes]),
    read: async () => bytes,
  };
}

/** Content in a file of the store's temporary directory. */
class FileContent implements BinaryContent {
  constructor(
    readonly contentType: string,
    readonly size: number,
    readonly sha256: string,
    readonly path: string
  ) {}
  open(): Readable {
    return createReadStream(this.path);
  }
  read(): Promise<Buffer> {
    return readFile(this.path);
  }
}

/** An upload refused as it arrived: too large (413, as body-parser answers) or cut off by the client. */
export class RawBodyError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly type: string,
    readonly limit?: number
  ) {
    super(message);
    this.name = 'RawBodyError';
  }
}

export interface BinaryBlobStoreOptions {
  /** Uploads larger than this go to a temporary file instead of memory (default 1 MiB). */
  spillBytes?: number;
  /** Where the store makes its temporary directory (default the OS's temporary directory). */
  tempDir?: string;
}

/** Raw uploads arriving now and received so far (for tests watching an upload in flight). */
export interface BinaryUploadStats {
  /** Uploads being received now, and the bytes they have brought so far. */
  receiving: number;
  receivingBytes: number;
  /** Uploads received whole since the sandbox started (kept or not), and their bytes. */
  received: number;
  receivedBytes: number;
  /** Uploads cut off or refused while they arrived. */
  aborted: number;
  /** Binary versions whose content is held, and how many of them are in files. */
  stored: number;
  inFiles: number;
}

/** Raw Binary bytes by `<id>/<versionId>`. */
export class BinaryBlobStore {
  private readonly blobs = new Map<string, BinaryContent>();
  private readonly spillBytes: number;
  private readonly parent: string;
  private dir: Promise<string> | undefined;
  private readonly inFlight = new Map<symbol, number>();
  private readonly counts = { received: 0, receivedBytes: 0, aborted: 0 };

  constructor(options: BinaryBlobStoreOptions = {}) {
    this.spillBytes = options.spillBytes ?? 1024 * 1024;
    this.parent = options.tempDir ?? tmpdir();
  }

  /**
   * Receives a raw upload: streamed, hashed as it arrives, in memory up to `spillBytes` and in a temporary file
   * beyond. Not kept until `put`; `discard` removes what was never kept. Rejects (and keeps nothing) when the body
   * is over `maxBytes` or the client goes away before its end.
   */
  async receive(source: Readable, contentType: string, maxBytes: number): Promise<BinaryContent> {
    const key = Symbol('upload');
    this.inFlight.set(key, 0);
    const hash = createHash('sha256');
    let size = 0;
    let memory: Buffer[] = [];
    let file: { path: string; out: WriteStream } | undefined;
    try {
      for await (const piece of source) {
        const chunk = piece as Buffer;
        size += chunk.length;
        if (size > maxBytes) throw new RawBodyError('request entity too large', 413, 'entity.too.large', maxBytes);
        hash.update(chunk);
        this.inFlight.set(key, size);
        if (!file && size > this.spillBytes) {
          const path = join(await this.tempDir(), randomUUID());
          file = { path, out: createWriteStream(path, { flags: 'wx' }) };
          for (const held of memory) file.out.write(held);
          memory = [];
        }
        if (!file) memory.push(chunk);
        else if (!file.out.write(chunk)) await drained(file.out);
      }
      if (source.readableAborted || (source as IncomingMessage).complete === false) {
        throw new RawBodyError('request aborted', 400, 'request.aborted');
      }
      if (file) {
        file.out.end();
        await once(file.out, 'finish');
      }
      this.counts.received++;
      this.counts.receivedBytes += size;
      const sha256 = hash.digest('hex');
      return file ? new FileContent(contentType, size, sha256, file.path) : withDigest(memoryContent(contentType, Buffer.concat(memory, size)), sha256);
    } catch (err) {
      this.counts.aborted++;
      if (file) {
        file.out.destroy();
        await rm(file.path, { force: true });
      }
      throw err instanceof RawBodyError ? err : new RawBodyError('request aborted', 400, 'request.aborted');
    } finally {
      this.inFlight.delete(key);
    }
  }

  /** Keeps received content as the content of Binary `<id>` version `<versionId>`. */
  put(id: string, versionId: string, content: BinaryContent): void {
    this.blobs.set(`${id}/${versionId}`, content);
  }

  /** Removes received content that no Binary version kept (its write was refused). */
  async discard(content: BinaryContent): Promise<void> {
    if (!(content instanceof FileContent)) return;
    for (const kept of this.blobs.values()) if (kept === content) return;
    await rm(content.path, { force: true });
  }

  get(id: string, versionId: string | undefined): BinaryContent | undefined {
    return versionId === undefined ? undefined : this.blobs.get(`${id}/${versionId}`);
  }

  /** Total bytes held (for stats). */
  get bytes(): number {
    let total = 0;
    for (const blob of this.blobs.values()) {
      total += blob.size;
    }
    return total;
  }

  get size(): number {
    return this.blobs.size;
  }

  uploads(): BinaryUploadStats {
    let inFiles = 0;
    for (const blob of this.blobs.values()) if (blob instanceof FileContent) inFiles++;
    return {
      receiving: this.inFlight.size,
      receivingBytes: [...this.inFlight.values()].reduce((a, b) => a + b, 0),
      ...this.counts,
      stored: this.blobs.size,
      inFiles,
    };
  }

  /** Removes the temporary directory and everything in it. */
  async close(): Promise<void> {
    const dir = this.dir;
    this.dir = undefined;
    this.blobs.clear();
    if (dir) await rm(await dir, { recursive: true, force: true });
  }

  private tempDir(): Promise<string> {
    this.dir ??= mkdtemp(join(this.parent, 'rg-sandbox-binaries-'));
    return this.dir;
  }
}

function withDigest(content: BinaryContent, sha256: string): BinaryContent {
  return { contentType: content.contentType, size: content.size, sha256, open: () => content.open(), read: () => content.read() };
}

/** Until the file takes more (events.once rejects if the stream fails meanwhile). */
async function drained(out: WriteStream): Promise<void> {
  await once(out, 'drain');
}

/** Writes a content to an HTTP answer as a stream (headers set by the caller). */
export async function streamContent(content: BinaryContent, res: ServerResponse): Promise<void> {
  await pipeline(content.open(), res);
}

export interface PresignedStorageOptions {
  /** Interface to bind (default 127.0.0.1). */
  host?: string;
  /** Port (default 0: an ephemeral port). */
  port?: number;
  /** Base URL clients see, e.g. http://storage.example:9000 (default http://<host>:<port>). */
  publicUrl?: string;
  /** Lifetime of a presigned URL in seconds (default 3600, Medplum's one hour). */
  expiresInSeconds?: number;
}

/** Looks up the content of Binary `<id>` version `<versionId>`; undefined when there is none. */
export type BinaryLookup = (id: string, versionId: string) => Promise<BinaryContent | undefined>;

const STORAGE_PATH = /^\/storage\/([A-Za-z0-9\-.]{1,64})\/([A-Za-z0-9\-.]{1,64})$/;

/**
 * The storage server of the presignedBinaryUrls trait. It starts listening at construction;
 * `ready` resolves when it does (and rejects if it cannot).
 */
export class PresignedStorage {
  readonly ready: Promise<void>;
  private readonly server: Server;
  private readonly key = randomBytes(32);
  private readonly expiresIn: number;
  private base: string | undefined;
  private closing: Promise<void> | undefined;

  constructor(
    private readonly lookup: BinaryLookup,
    options: PresignedStorageOptions = {}
  ) {
    this.expiresIn = options.expiresInSeconds ?? 3600;
    this.server = createServer((req, res) => {
      this.serve(req, res).catch(() => {
        if (!res.headersSent) {
          text(res, 500, 'InternalError');
        } else {
          res.destroy();
        }
      });
    });
    const host = options.host ?? '127.0.0.1';
    this.ready = new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(options.port ?? 0, host, () => {
        this.server.off('error', reject);
        // The storage server alone never keeps a process alive (the FHIR server it belongs to does).
        this.server.unref();
        const port = (this.server.address() as AddressInfo).port;
        const urlHost = urlHostOf(host);
        this.base = (options.publicUrl ?? `http://${urlHost}:${port}`).replace(/\/+$/, '');
        resolve();
      });
    });
    // An unobserved failure to listen must not crash the process; callers see it through `ready`.
    this.ready.catch(() => undefined);
  }

  /** Base URL of the storage server (after `ready`). */
  get url(): string {
    if (!this.base) {
      throw new Error('presigned storage is not listening yet (await ready)');
    }
    return this.base;
  }

  /** `<base>/storage/<id>/<vid>?Expires=<unix>&Signature=<hmac>`, valid for an hour. */
  async presign(id: string, versionId: string): Promise<string> {
    await this.ready;
    const expires = Math.floor(Date.now() / 1000) + this.expiresIn;
    return `${this.url}/storage/${encodeURIComponent(id)}/${encodeURIComponent(versionId)}?Expires=${expires}&Signature=${this.sign(id, versionId, expires)}`;
  }

  /** The Binary id a presigned URL of this server points at, if `value` is one (whatever its signature). */
  binaryIdOf(value: string): string | undefined {
    if (!this.base || !value.startsWith(this.base + '/storage/')) {
      return undefined;
    }
    const path = value.slice(this.base.length).split('?')[0];
    const match = STORAGE_PATH.exec(path);
    return match ? decodeURIComponent(match[1]) : undefined;
  }

  close(): Promise<void> {
    this.closing ??= this.ready.then(
      () =>
        new Promise<void>((resolve, reject) => {
          this.server.close((err) => (err ? reject(err) : resolve()));
          this.server.closeAllConnections();
        }),
      () => undefined
    );
    return this.closing;
  }

  private sign(id: string, versionId: string, expires: number): string {
    return createHmac('sha256', this.key).update(`GET\n/storage/${id}/${versionId}\n${expires}`).digest('base64url');
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://storage.invalid');
    const match = STORAGE_PATH.exec(url.pathname);
    if (!match) {
      text(res, 404, 'NoSuchKey');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('Allow', 'GET, HEAD');
      text(res, 405, 'MethodNotAllowed');
      return;
    }
    if (req.headers.authorization !== undefined) {
      // S3 refuses a presigned URL sent with credentials as well.
      text(
        res,
        400,
        'InvalidArgument: Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified'
      );
      return;
    }
    const [id, versionId] = [decodeURIComponent(match[1]), decodeURIComponent(match[2])];
    const expires = Number(url.searchParams.get('Expires'));
    const signature = url.searchParams.get('Signature') ?? '';
    const expected = Buffer.from(this.sign(id, versionId, expires));
    const given = Buffer.from(signature);
    if (!Number.isSafeInteger(expires) || given.length !== expected.length || !timingSafeEqual(given, expected)) {
      text(res, 403, 'SignatureDoesNotMatch');
      return;
    }
    if (Math.floor(Date.now() / 1000) > expires) {
      text(res, 403, 'AccessDenied: Request has expired');
      return;
    }
    const content = await this.lookup(id, versionId);
    if (!content) {
      text(res, 404, 'NoSuchKey');
      return;
    }
    res.statusCode = 200;
    res.setHeader('Content-Type', content.contentType);
    res.setHeader('Content-Length', content.size);
    res.setHeader('Cache-Control', 'private, max-age=3600');
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    await streamContent(content, res);
  }
}

function text(res: ServerResponse, status: number, body: string): void {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/plain; charset=utf-8');
  res.end(body);
}

/** The host of a URL to a server listening on `host`: loopback for a wildcard address, an IPv6 address in brackets. */
export function urlHostOf(host: string): string {
  if (host === '0.0.0.0' || host === '::') return '127.0.0.1';
  return host.includes(':') ? `[${host}]` : host;
}
