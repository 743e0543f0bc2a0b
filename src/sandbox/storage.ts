// Binary content for the FHIR sandbox: the bytes of Binaries uploaded raw (kept beside the resource,
// by id and version, instead of as base64 in Binary.data), and the presigned-URL storage server of the
// `presignedBinaryUrls` trait — a second loopback HTTP server standing in for Medplum's storage (S3 /
// CloudFront in production) that serves those bytes to whoever holds a signed, unexpired URL.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface BinaryContent {
  contentType: string;
  bytes: Buffer;
}

/** Raw Binary bytes by `<id>/<versionId>`. */
export class BinaryBlobStore {
  private readonly blobs = new Map<string, BinaryContent>();

  put(id: string, versionId: string, content: BinaryContent): void {
    this.blobs.set(`${id}/${versionId}`, content);
  }

  get(id: string, versionId: string | undefined): BinaryContent | undefined {
    return versionId === undefined ? undefined : this.blobs.get(`${id}/${versionId}`);
  }

  /** Total bytes held (for stats). */
  get bytes(): number {
    let total = 0;
    for (const blob of this.blobs.values()) {
      total += blob.bytes.length;
    }
    return total;
  }

  get size(): number {
    return this.blobs.size;
  }
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
    res.setHeader('Content-Length', content.bytes.length);
    res.setHeader('Cache-Control', 'private, max-age=3600');
    res.end(req.method === 'HEAD' ? undefined : content.bytes);
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
