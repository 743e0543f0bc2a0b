import { defaultIntakeFormats, type IntakeRegistry } from './intake';
import { EventEmitter, once } from 'node:events';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createApp } from './app';
import { webhooksAdminRouter, createLimitedServer, isStreamedRequest, hl7ReturnAdminRouter, type MllpListener, startMllpListener } from './api';
import type { Config, Destination, DestinationDirectory } from './config';
import { DeliveryWorker } from './delivery';
import { notFound } from './outcomes';
import { DestinationAdapters, FhirClients, fhirDestination, type ReadReportOptions, type ReportContent } from './destinations';
import type { StoredReferral } from './model';
import { loadSandbox, SANDBOX_PATH, type SandboxRouter, sandboxDestination } from './sandbox';
import { MemoryBudget } from './memory';
import { logger, setLogLevel } from './observability';
import { type Backlog, clearBacklogSource, setBacklogSource } from './observability';
import { DocumentIntake, ReferralService } from './referral';
import { type BlobStore, createFsBlobStore, createPostgresBlobStore, openingBlobStore } from './blobs';
import { backlog, createStoreProbe, type Db, migrate, openDb, possiblyOrphanedUploads, type QueueName, type StoreProbeResult } from './store';
import { Poller } from './tracking';
import { RetentionJob } from './retention';
import { WebhookDispatcher, type WebhookDispatcherOptions } from './webhooks';
import { Hl7ReturnDispatcher, type Hl7ReturnOptions, reportBytesWithin } from './hl7return';
import { consoleRouter } from './console';

class Directory implements DestinationDirectory {
  private readonly map = new Map<string, Destination>();
  constructor(list: Destination[]) {
    for (const d of list) this.map.set(d.id, d);
  }
  add(d: Destination): void {
    this.map.set(d.id, d);
  }
  ids(): string[] {
    return [...this.map.keys()];
  }
  get(id: string): Destination | undefined {
    return this.map.get(id);
  }
}

export interface GatewayOptions {
  /** Overrides for tests: a FHIR client factory, shorter delays. */
  clients?: FhirClients;
  deliveryIdleMs?: number;
  pollOverlapMs?: number;
  pollPageSize?: number;
  pollSweepEveryMs?: number;
  startPoller?: boolean;
  /** Status webhook dispatcher overrides (tests: short delays); `webhookFetch` replaces its HTTP client. */
  webhooks?: Partial<WebhookDispatcherOptions>;
  webhookFetch?: typeof fetch;
  /** The intake formats POST /referrals takes (default: defaultIntakeFormats()). */
  intake?: IntakeRegistry;
  /** HL7 v2 status-back dispatcher overrides (tests: short delays, few attempts). */
  hl7Return?: Partial<Hl7ReturnOptions>;
}

/** The whole service: store, API, sandbox, delivery worker and poller, with start and stop. */
export class Gateway {
  /** The store: repositories and use cases take it (src/store). */
  readonly db: Db;
  /** Streamed documents' bytes (BLOB_STORE): the file system or the database. */
  readonly blobs: BlobStore & { ready?: Promise<void> };
  readonly destinations: Directory;
  readonly clients: FhirClients;
  /** The destination kinds delivered to, by type (only `fhir` so far). */
  readonly adapters: DestinationAdapters;
  readonly worker: DeliveryWorker;
  readonly poller: Poller;
  readonly service: ReferralService;
  /** Streamed documents: multipart parts and uploads into the blob store; the upload deadline. */
  readonly documents: DocumentIntake;
  readonly webhooks: WebhookDispatcher;
  /** Sends status changes back to the senders of HL7 v2 referrals over MLLP (HL7_RETURN_CHANNELS). */
  readonly hl7Return: Hl7ReturnDispatcher;
  readonly retention: RetentionJob;
  /** Bytes of request bodies and delivery payloads held at once (MAX_INTAKE_BYTES_IN_FLIGHT, INTAKE_CLIENT_SHARE). */
  readonly memory: MemoryBudget;
  server: Server | undefined;
  url = '';
  sandbox: SandboxRouter | undefined;
  /** The HL7 v2 MLLP listener, when HL7_MLLP_PORT is set (or defaulted in development). */
  mllp: MllpListener | undefined;
  /** A referral's status changed in this process (delivery or polling): the console's open pages are answered at once. */
  readonly statusChanges = new EventEmitter<{ change: [referralId: string] }>().setMaxListeners(0);
  private shuttingDown = false;
  private backlogSource: (() => Promise<Backlog>) | undefined;
  private readonly storeProbe: () => Promise<StoreProbeResult>;

  constructor(
    readonly config: Config,
    private readonly opts: GatewayOptions = {}
  ) {
    setLogLevel(config.logLevel);
    this.db = openDb(config.databaseUrl, { busyWaitMs: config.store.busyWaitMs });
    this.blobs =
      config.documents.blobStore === 'postgres' ? createPostgresBlobStore(this.db) : openingBlobStore('fs', createFsBlobStore(config.documents.blobDir));
    this.storeProbe = createStoreProbe(this.db, { cacheMs: config.store.probeCacheMs });
    this.destinations = new Directory(config.destinations);
    this.clients = opts.clients ?? new FhirClients();
    this.adapters = new DestinationAdapters([fhirDestination(this.clients)]);
    this.memory = new MemoryBudget({ maxBytes: config.maxIntakeBytesInFlight, holderShare: config.intake.clientShare });
    this.webhooks = new WebhookDispatcher(
      this.db,
      { secret: config.webhookSecret, allowPrivateNetworks: config.webhookAllowPrivateNetworks, ...opts.webhooks },
      opts.webhookFetch
    );
    this.worker = new DeliveryWorker(
      this.db,
      this.destinations,
      this.adapters,
      {
        maxAttempts: config.delivery.maxAttempts,
        maxAgeMs: config.delivery.maxAgeMs,
        baseDelayMs: config.delivery.baseDelayMs,
        maxDelayMs: config.delivery.maxDelayMs,
        concurrency: config.delivery.concurrency,
        idleMs: opts.deliveryIdleMs ?? 1000,
        blobs: this.blobs,
        memory: { budget: this.memory, waitMs: config.intakeWaitMs },
      },
      (e) => {
        logger.debug('status change', { ...e });
        this.statusChanges.emit('change', e.referralId);
      }
    );
    this.hl7Return = new Hl7ReturnDispatcher(
      this.db,
      { readReport: (referral, o) => this.readReport(referral, o), maxReportBytes: reportBytesWithin(config.hl7.maxMessageBytes) },
      opts.hl7Return
    );
    // Work is queued by the store in the transaction that makes it due (a status change queues its webhook and HL7 v2
    // status message, a submission its delivery): the worker of that queue looks as soon as it has committed.
    const wake: Record<QueueName, () => void> = {
      delivery: () => this.worker.wake(),
      webhook: () => this.webhooks.wake(),
      hl7: () => this.hl7Return.wake(),
    };
    this.db.signals.on('queued', (queue) => wake[queue]());
    const defaultCron = config.pollCron ?? (config.useSandbox ? '*/10 * * * * *' : '*/5 * * * *');
    this.poller = new Poller(
      this.db,
      this.destinations,
      this.adapters,
      {
        cron: defaultCron,
        overlapMs: opts.pollOverlapMs ?? 60_000,
        pageSize: opts.pollPageSize ?? 100,
        sweepEveryMs: opts.pollSweepEveryMs,
      },
      (e) => this.statusChanges.emit('change', e.referralId)
    );
    this.retention = new RetentionJob(this.db, config.retention, { collect: (now) => this.documents.collectUnreferenced(now) });
    this.documents = new DocumentIntake(this.db, this.blobs, {
      maxDocumentBytes: config.documents.maxDocumentBytes,
      maxReferralBytes: config.documents.maxReferralBytes,
      uploadDeadlineMs: config.documents.uploadDeadlineMs,
    });
    this.service = new ReferralService(this.db, this.destinations, {
      allowPrivateCallbacks: config.webhookAllowPrivateNetworks,
      clientIdentifierSystems: config.clientIdentifierSystems,
      hl7ReturnChannels: config.hl7.returnChannels,
    });
  }

  async start(): Promise<void> {
    const applied = await migrate(this.db.kysely);
    await this.blobs.ready;
    if (applied.length > 0) logger.info('database migrated', { applied });
    if (this.config.useSandbox) {
      // SANDBOX_PROFILE makes the built-in centre behave like a Medplum, HAPI or the strictest server.
      // Loaded only here: a gateway with real destinations never loads the sandbox server.
      const { createSandboxRouter } = await loadSandbox();
      this.sandbox = createSandboxRouter({ profile: this.config.sandbox.profile, traits: this.config.sandbox.traits });
      await this.sandbox.ready;
    }
    const app = createApp({
      config: this.config,
      db: this.db,
      intake: this.opts.intake ?? defaultIntakeFormats(),
      service: this.service,
      documents: this.documents,
      reports: {
        read: (referral, o) => {
          const destination = this.destinations.get(referral.destination);
          if (!referral.report || !destination) throw notFound('no report');
          return this.adapters.for(destination).readReport(referral, destination, o);
        },
      },
      sandbox: this.sandbox?.router,
      isReady: () => this.readiness(),
      isShuttingDown: () => this.shuttingDown,
      memory: this.memory,
      webhooksAdmin: webhooksAdminRouter(this.db),
      hl7ReturnAdmin: hl7ReturnAdminRouter(this.db),
      runRetention: () => this.retention.run(),
      console: this.config.console.enabled ? this.consoleRouter() : undefined,
      doctor: {
        destinations: this.destinations,
        orphanedBinaries: async (destinationId) =>
          (await possiblyOrphanedUploads(this.db, destinationId)).map((u) => ({ referralId: u.referralId, document: u.document, since: u.since })),
      },
    });
    // Headers and request deadlines, and the cap on connections per address (src/api/server-limits.ts).
    const server = createLimitedServer(app, { ...this.config.intake, keepAliveTimeoutMs: 65_000, streamed: isStreamedRequest });
    server.listen(this.config.port, this.config.host);
    this.server = server;
    await once(server, 'listening');
    const port = (server.address() as AddressInfo).port;
    const local = `http://${this.config.host === '0.0.0.0' || this.config.host === '::' ? '127.0.0.1' : this.config.host}:${port}`;
    this.url = local;
    if (this.config.useSandbox) {
      this.destinations.add(sandboxDestination(`${local}${SANDBOX_PATH}`, this.config.sandbox.profile));
    }
    await this.startMllp();
    this.worker.start();
    this.webhooks.start();
    this.hl7Return.start();
    if (this.opts.startPoller !== false) this.poller.start();
    this.retention.start();
    this.startUploadDeadline();
    this.backlogSource = async () => ({
      ...(await backlog(this.db)),
      circuits: this.worker.circuitStates(),
    });
    setBacklogSource(this.backlogSource);
  }

  /** The browser console's router: the store, the report reader, destinations, circuits, poll status, the centres' FHIR clients. */
  private consoleRouter(): ReturnType<typeof consoleRouter> {
    return consoleRouter({
      config: this.config,
      db: this.db,
      reports: { read: (referral, o) => this.readReport(referral, o) },
      destinations: this.destinations,
      circuits: () => this.worker.circuitStates(),
      pollStatus: (id) => this.poller.status(id),
      centre: (id) => {
        const d = this.destinations.get(id);
        return d ? this.clients.get(d) : undefined;
      },
      statusChanges: this.statusChanges,
      isShuttingDown: () => this.shuttingDown,
      pollNow: (id) => {
        const d = this.destinations.get(id);
        if (d && !this.shuttingDown) void this.poller.pollDestination(d, { force: true });
      },
    });
  }

  /** The MLLP listener on HL7_MLLP_PORT; in development on 2575 unless that port is taken (then a warning, not a failure). */
  private async startMllp(): Promise<void> {
    const hl7 = this.config.hl7;
    if (hl7.mllpPort === undefined) return;
    try {
      this.mllp = await startMllpListener(this.service, this.db, {
        port: hl7.mllpPort,
        host: this.config.host,
        senders: hl7.senders,
        listenerClient: hl7.listenerClient,
        maxMessageBytes: hl7.maxMessageBytes,
      });
      logger.info('HL7 v2 MLLP listener ready', {
        port: this.mllp.port,
        senders: hl7.senders.size,
        ...(hl7.listenerClient ? { listenerClient: hl7.listenerClient } : {}),
      });
    } catch (err) {
      if (!hl7.mllpPortDefaulted) throw err;
      logger.warn('HL7 v2 MLLP listener not started: its development port is taken (set HL7_MLLP_PORT)', { port: hl7.mllpPort, error: (err as Error).message });
    }
  }

  /** A referral's opinion report as a stream, read at its destination through the destination's adapter (for the HL7 v2 status back). */
  private readReport(referral: StoredReferral, opts: ReadReportOptions): Promise<ReportContent> {
    const destination = this.destinations.get(referral.destination);
    if (!referral.report || !destination) return Promise.reject(new Error('no report, or its destination is no longer configured'));
    return this.adapters.for(destination).readReport(referral, destination, opts);
  }

  /** Ready while the store takes a real write (a probe row rewritten at most every STORE_PROBE_CACHE_MS). */
  private async readiness(): Promise<{ ready: boolean; checks: Record<string, string> }> {
    const store = await this.storeProbe();
    return { ready: store.ok, checks: { store: store.ok ? 'ok' : `error: ${store.detail}` } };
  }

  /** Stops taking requests, finishes the work in flight, closes the store. */
  private uploadTimer: NodeJS.Timeout | undefined;

  /** Referrals whose uploads are overdue become `expired`: looked for every minute (more often with a short deadline). */
  private startUploadDeadline(): void {
    const every = Math.max(250, Math.min(60_000, Math.floor(this.config.documents.uploadDeadlineMs / 4)));
    let running = false;
    this.uploadTimer = setInterval(() => {
      if (running || this.shuttingDown) return;
      running = true;
      this.documents
        .expireOverdue()
        .catch((err: unknown) => logger.warn('the upload deadline sweep failed; it runs again shortly', { error: (err as Error).message }))
        .finally(() => {
          running = false;
        });
    }, every);
    this.uploadTimer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.uploadTimer);
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    if (this.backlogSource) clearBacklogSource(this.backlogSource);
    const server = this.server;
    const closed = server ? new Promise<void>((resolve) => server.close(() => resolve())) : Promise.resolve();
    server?.closeIdleConnections();
    const force = setTimeout(() => server?.closeAllConnections(), this.config.shutdownTimeoutMs);
    force.unref();
    await this.mllp?.close();
    await Promise.all([this.poller.stop(), this.worker.stop(), this.webhooks.stop(), this.hl7Return.stop(), this.retention.stop()]);
    await closed;
    clearTimeout(force);
    await this.sandbox?.close();
    await this.db.close();
  }
}
