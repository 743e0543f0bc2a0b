// A FHIR R4 sandbox endpoint standing in for a cancer centre's FHIR server, for development,
// integration tests and benchmarks. In-memory (@medplum/fhir-router MemoryRepository); data is
// lost on restart.
//
// Mount it before any global body parser (it parses application/fhir+json itself, 50 MB limit, and
// raw Binary bodies):
//   const sandbox = createSandboxRouter({ profile: 'medplum' });
//   await sandbox.ready;                 // the presigned storage server of some profiles listens
//   app.use('/sandbox/fhir/R4', sandbox.router);
//   ...
//   await sandbox.close();
//
// Server profiles (`profile`, `traits`) make it behave like Medplum or HAPI where a gateway depends on
// it: see ./profiles.ts and docs/sandbox-profiles.md.
import type { Resource } from '@medplum/fhirtypes';
import { FhirRouter } from '@medplum/fhir-router';
import type { MemoryRepository } from '@medplum/fhir-router';
import express from 'express';
import type { NextFunction, Request, Response, Router } from 'express';
import { createServer } from 'node:http';
import type { IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { loadFhirDefinitions } from './defs';
import { SandboxEngine } from './engine';
import { SandboxFaults } from './faults';
import { resolveSandboxTraits } from './profiles';
import type { SandboxProfileName, SandboxTraits } from './profiles';
import { IndexedMemoryRepository } from './repo';
import { BinaryBlobStore, PresignedStorage, streamContent, urlHostOf } from './storage';
import type { BinaryBlobStoreOptions, BinaryContent, BinaryUploadStats, PresignedStorageOptions } from './storage';
import type { RestRequest, RestResponse, SandboxEngineOptions, SandboxStats } from './engine';
import { outcome, parseETag } from './support';

export type { SandboxStats, SandboxEngineOptions } from './engine';
export type { BinaryBlobStoreOptions, BinaryUploadStats } from './storage';
export { loadFhirDefinitions } from './defs';
export { describeTraitOverrides, SANDBOX_PROFILES, resolveSandboxTraits } from './profiles';
export type { SandboxProfileName, SandboxTraits } from './profiles';
export { SandboxFaults } from './faults';
export type { FailNextEntryOptions } from './faults';

export interface SandboxRouterOptions extends SandboxEngineOptions {
  /**
   * Absolute base URL of the endpoint as clients see it (used for Bundle.link, fullUrl, Location).
   * Default: `${req.protocol}://${req.get('host')}${req.baseUrl}` (honours 'trust proxy').
   */
  baseUrl?: (req: Request) => string;
  /**
   * Use an existing repository (e.g. to pre-seed data). Default: a new IndexedMemoryRepository
   * (a MemoryRepository whose searches — _lastUpdated ranges and sort, _tag, _id, identifier,
   * paging — are answered from an index; a plain MemoryRepository works too, every search and
   * conditional create then scans the store).
   */
  repo?: MemoryRepository;
  /**
   * With the default repository, what its search index answers (default true: every search it
   * can; 'conditional': only conditional-interaction matching, as before the index; false: nothing).
   */
  searchIndex?: boolean | 'conditional';
  /** Server profile: 'default' (the sandbox as it always was), 'medplum', 'hapi' or 'strict'. */
  profile?: string;
  /** Trait overrides on top of the profile (an object, or a string like "nonAtomic=false,-emptyMinimal"). */
  traits?: Partial<SandboxTraits> | string;
  /** Where the presigned storage server of the presignedBinaryUrls trait listens (default 127.0.0.1, any port). */
  storage?: PresignedStorageOptions;
  /** Raw Binary uploads: past what size they go to a temporary file (default 1 MiB), and where. */
  binaries?: BinaryBlobStoreOptions;
}

/** A Binary's content as the sandbox holds it: type, size and SHA-256 computed by the server from what it received. */
export interface BinaryDigest {
  id: string;
  versionId: string | undefined;
  /** Versions of the Binary (a PUT to the same id adds one). */
  versions: number;
  contentType: string;
  bytes: number;
  sha256: string;
}

export type ResolvedSandboxTraits = SandboxTraits & { profile: SandboxProfileName };

export interface SandboxRouter {
  router: Router;
  repo: MemoryRepository;
  stats: SandboxStats;
  /** The profile's traits with the overrides applied. */
  traits: ResolvedSandboxTraits;
  /** Fault injection for tests (failNextEntry). */
  faults: SandboxFaults;
  /** Resolves when the sandbox is ready to serve (the presigned storage server listens; immediate otherwise). */
  ready: Promise<void>;
  /** Base URL of the presigned storage server, once ready (presignedBinaryUrls only). */
  storageUrl(): string | undefined;
  /** The content of Binary `id` (its latest version, or `versionId`) as the server holds it; undefined when there is none. */
  binary(id: string, versionId?: string): Promise<BinaryDigest | undefined>;
  /** Raw Binary uploads being received and received so far. */
  binaryUploads(): BinaryUploadStats;
  /**
   * Closes what the router started (the presigned storage server) and removes the temporary files of raw
   * Binaries. The router itself is the caller's to unmount.
   */
  close(): Promise<void>;
}

export interface SandboxServer {
  /**
   * e.g. http://127.0.0.1:8090/fhir/R4 (the same sandbox is also served at /sandbox/fhir/R4).
   * GET /_sandbox/stats (outside the FHIR base) answers {@link SandboxStats} as JSON, plus
   * `search: { indexed, scanned }` when the repository is an IndexedMemoryRepository.
   */
  url: string;
  port: number;
  close(): Promise<void>;
  stats: SandboxStats;
  repo: MemoryRepository;
  traits: ResolvedSandboxTraits;
  faults: SandboxFaults;
  /** Base URL of the presigned storage server (presignedBinaryUrls only). */
  storageUrl?: string;
  /** As SandboxRouter.binary (also GET /_sandbox/binaries/<id>). */
  binary(id: string, versionId?: string): Promise<BinaryDigest | undefined>;
  /** As SandboxRouter.binaryUploads (also GET /_sandbox/binaries). */
  binaryUploads(): BinaryUploadStats;
}

export interface StartSandboxOptions extends SandboxRouterOptions {
  /** Interface to bind (default 127.0.0.1; use 0.0.0.0 inside containers). */
  host?: string;
}

const FHIR_JSON_TYPES = ['application/fhir+json', 'application/json', 'application/json+fhir', 'application/json-patch+json'];
const FHIR_CONTENT_TYPE = 'application/fhir+json; charset=utf-8';
/** Limit of raw (non-JSON) Binary bodies: POST Binary / PUT Binary/<id> with e.g. application/pdf. */
const RAW_BINARY_LIMIT = 4 * 1024 * 1024 * 1024;

/** A body of POST Binary / PUT Binary/<id> whose Content-Type is not FHIR JSON is the Binary's raw content. */
function isRawBinaryBody(req: IncomingMessage): boolean {
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  return !FHIR_JSON_TYPES.includes(type);
}

export function createSandboxRouter(options: SandboxRouterOptions = {}): SandboxRouter {
  const traits = resolveSandboxTraits(options.profile, options.traits);
  loadFhirDefinitions();
  const repo = options.repo ?? new IndexedMemoryRepository({ index: options.searchIndex });
  const stats: SandboxStats = { requests: 0, searches: {}, byType: {}, interactions: {} };
  const faults = new SandboxFaults();
  const blobs = new BinaryBlobStore(options.binaries);
  const storage = traits.presignedBinaryUrls
    ? new PresignedStorage(async (id, versionId) => {
        try {
          const binary = await repo.readVersion('Binary', id, versionId);
          return engine.binaryContent(binary);
        } catch {
          return undefined;
        }
      }, options.storage)
    : undefined;
  const engine: SandboxEngine = new SandboxEngine(repo, new FhirRouter(), stats, options, { traits, faults, blobs, storage });
  const baseUrl = options.baseUrl ?? ((req: Request) => `${req.protocol}://${req.get('host')}${req.baseUrl}`);
  const jsonLimit = traits.maxJsonBytes ?? '50mb';

  const router = express.Router();
  router.use((_req, _res, next) => {
    stats.requests++;
    next();
  });
  // A raw Binary body is streamed in (hashed as it arrives; past 1 MiB into a temporary file), never buffered whole.
  const raw = (req: Request, _res: Response, next: NextFunction): void => {
    if (!isRawBinaryBody(req) || !hasBody(req)) {
      next();
      return;
    }
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > RAW_BINARY_LIMIT) {
      next(Object.assign(new Error('request entity too large'), { status: 413, type: 'entity.too.large', limit: RAW_BINARY_LIMIT }));
      return;
    }
    const contentType = (req.get('content-type') ?? '').trim() || 'application/octet-stream';
    blobs.receive(req, contentType, RAW_BINARY_LIMIT).then(
      (content) => {
        req.body = content;
        next();
      },
      (err: unknown) => next(err)
    );
  };
  router.post('/Binary', raw);
  router.put('/Binary/:id', raw);
  router.use(express.json({ type: FHIR_JSON_TYPES, limit: jsonLimit, strict: true }));
  router.post('/:type/_search', express.urlencoded({ extended: false, limit: '1mb' }));
  router.use(async (req: Request, res: Response) => {
    const base = baseUrl(req).replace(/\/+$/, '');
    let rest: RestRequest;
    try {
      rest = toRestRequest(req, base);
    } catch {
      if (isReceived(req.body)) await blobs.discard(req.body);
      send(res, { status: 400, body: outcome(400, `Malformed request path: ${req.path}`) }, base);
      return;
    }
    const response = await engine.handle(rest);
    // Received content that no Binary version kept (a refused write) is not kept either.
    if (rest.raw) await blobs.discard(rest.raw);
    send(res, response, base);
  });
  router.use((err: unknown, req: Request, res: Response, next: NextFunction) => {
    if (res.headersSent) {
      next(err);
      return;
    }
    const e = err as { status?: number; statusCode?: number; type?: string; message?: string; limit?: number };
    if (e.type === 'request.aborted') {
      res.destroy(); // the client went away in the middle of its upload: nobody to answer
      return;
    }
    if (e.type === 'entity.too.large' && e.limit !== RAW_BINARY_LIMIT && traits.maxJsonBytes !== undefined) {
      // Medplum: body-parser's 413 becomes a 400 "File too large"
      send(res, { status: 400, body: outcome(400, 'File too large', 'invalid') }, baseUrl(req));
      return;
    }
    const status = e.status ?? e.statusCode ?? 500;
    const text = errorText(e);
    send(res, { status, body: outcome(status, text) }, baseUrl(req));
  });

  return {
    router,
    repo,
    stats,
    traits,
    faults,
    ready: storage ? storage.ready : Promise.resolve(),
    storageUrl: () => {
      try {
        return storage?.url;
      } catch {
        return undefined;
      }
    },
    binary: async (id, versionId) => {
      let version: Resource;
      let versions: number;
      try {
        version = versionId === undefined ? await repo.readResource('Binary', id) : await repo.readVersion('Binary', id, versionId);
        versions = (await repo.readHistory('Binary', id)).entry?.length ?? 1;
      } catch {
        return undefined;
      }
      const content = engine.binaryContent(version);
      return { id, versionId: version.meta?.versionId, versions, contentType: content.contentType, bytes: content.size, sha256: content.sha256 };
    },
    binaryUploads: () => blobs.uploads(),
    close: async () => {
      await (storage ? storage.close() : Promise.resolve());
      await blobs.close();
    },
  };
}

/** The diagnostics of an error that reached the error handler (body-parser's, or a bug). */
function errorText(e: { type?: string; message?: string; limit?: number }): string {
  switch (e.type) {
    case 'entity.parse.failed':
      return `Malformed JSON request body: ${e.message ?? ''}`.trim();
    case 'entity.too.large':
      return e.limit === RAW_BINARY_LIMIT ? 'Raw Binary body exceeds the 4 GiB limit' : 'Request body exceeds the 50 MB limit';
    default:
      return e.message ?? 'Internal error';
  }
}

/** A raw Binary body as the raw middleware received it. */
function isReceived(body: unknown): body is BinaryContent {
  const b = body as Partial<BinaryContent> | undefined;
  return typeof b === 'object' && b !== null && typeof b.open === 'function' && typeof b.sha256 === 'string' && typeof b.size === 'number';
}

function hasBody(req: Request): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

function toRestRequest(req: Request, base: string): RestRequest {
  const url = new URL(req.url, 'http://sandbox.invalid');
  const segments = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
  // body-parser turns an empty (Content-Length: 0) JSON body into {}; treat it as no body
  let body: unknown = hasBody(req) ? req.body : undefined;
  let raw: RestRequest['raw'];
  if (isReceived(body)) {
    raw = body;
    body = undefined;
  }
  return {
    method: req.method,
    segments,
    params: url.searchParams,
    headers: {
      ifMatch: parseETag(req.get('if-match')),
      ifNoneExist: req.get('if-none-exist'),
      prefer: req.get('prefer'),
      accept: req.get('accept'),
    },
    body,
    raw,
    unsupportedMediaType: body === undefined && raw === undefined && hasBody(req),
    base,
  };
}

function send(res: Response, response: RestResponse, base: string): void {
  res.status(response.status);
  if (response.location && (response.status === 201 || response.status === 200) && response.body?.resourceType !== 'Bundle') {
    res.setHeader(response.write ? 'Location' : 'Content-Location', `${base}/${response.location}`);
  }
  if (response.etag) {
    res.setHeader('ETag', response.etag);
  }
  if (response.lastModified) {
    res.setHeader('Last-Modified', new Date(response.lastModified).toUTCString());
  }
  if (response.raw) {
    res.setHeader('Content-Type', response.raw.contentType);
    res.setHeader('Content-Length', response.raw.size);
    if (res.req.method === 'HEAD') {
      res.end();
      return;
    }
    streamContent(response.raw, res).catch(() => res.destroy());
    return;
  }
  if (response.body === undefined) {
    res.end();
    return;
  }
  const payload = Buffer.from(JSON.stringify(response.body), 'utf8');
  res.setHeader('Content-Type', FHIR_CONTENT_TYPE);
  res.setHeader('Content-Length', payload.length);
  res.end(payload);
}

/**
 * Starts a standalone sandbox HTTP server serving the same sandbox at /fhir/R4 and /sandbox/fhir/R4.
 * Port 0 picks an ephemeral port.
 */
export async function startSandboxServer(port: number, options: StartSandboxOptions = {}): Promise<SandboxServer> {
  const host = options.host ?? '127.0.0.1';
  const sandbox = createSandboxRouter({ ...options, storage: { host, ...options.storage } });
  try {
    await sandbox.ready;
  } catch (err) {
    await sandbox.close().catch(() => undefined);
    throw err;
  }
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.use('/fhir/R4', sandbox.router);
  app.use('/sandbox/fhir/R4', sandbox.router);
  app.get('/_sandbox/stats', (_req: Request, res: Response) => {
    const search = sandbox.repo instanceof IndexedMemoryRepository ? { search: sandbox.repo.searchCounts } : {};
    res.json({ ...sandbox.stats, ...search, profile: sandbox.traits.profile });
  });
  app.get('/_sandbox/binaries', (_req: Request, res: Response) => {
    res.json(sandbox.binaryUploads());
  });
  app.get('/_sandbox/binaries/:id', async (req: Request, res: Response) => {
    const version = typeof req.query.version === 'string' ? req.query.version : undefined;
    const digest = await sandbox.binary(String(req.params.id), version);
    if (!digest) {
      res.status(404).json(outcome(404, `No Binary ${String(req.params.id)}`, 'not-found'));
      return;
    }
    res.json(digest);
  });
  app.get('/_sandbox/faults', (_req: Request, res: Response) => {
    res.json({ failNextEntry: sandbox.faults.pending() });
  });
  app.delete('/_sandbox/faults', (_req: Request, res: Response) => {
    sandbox.faults.clear();
    res.status(204).end();
  });
  app.post('/_sandbox/faults', express.json({ limit: '64kb' }), (req: Request, res: Response) => {
    try {
      sandbox.faults.applyJson(req.body);
    } catch (err) {
      res.status(400).json(outcome(400, `Invalid fault: ${(err as Error).message}`));
      return;
    }
    res.status(204).end();
  });
  app.use((req: Request, res: Response) => {
    res
      .status(404)
      .type(FHIR_CONTENT_TYPE)
      .send(JSON.stringify(outcome(404, `No FHIR endpoint at ${req.path}; use /fhir/R4`)));
  });

  const server = createServer(app);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (err) {
    await sandbox.close().catch(() => undefined);
    throw err;
  }
  const actualPort = (server.address() as AddressInfo).port;
  const urlHost = urlHostOf(host);

  let closing: Promise<void> | undefined;
  return {
    url: `http://${urlHost}:${actualPort}/fhir/R4`,
    port: actualPort,
    repo: sandbox.repo,
    stats: sandbox.stats,
    traits: sandbox.traits,
    faults: sandbox.faults,
    storageUrl: sandbox.storageUrl(),
    binary: (id, versionId) => sandbox.binary(id, versionId),
    binaryUploads: () => sandbox.binaryUploads(),
    close: () => {
      closing ??= Promise.all([
        new Promise<void>((resolve, reject) => {
          server.close((err) => (err ? reject(err) : resolve()));
          server.closeAllConnections();
        }),
        sandbox.close(),
      ]).then(() => undefined);
      return closing;
    },
  };
}
