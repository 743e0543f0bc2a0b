import type { Readable } from 'node:stream';

/** What a blob was stored as: its content address (the SHA-256 of its bytes, hex) and its size. */
export interface StoredBlob {
  sha256: string;
  bytes: number;
}

export interface PutOptions {
  /** Refuse (and keep nothing) when the bytes are more than this. */
  maxBytes: number;
  /** The digest the sender declared (hex SHA-256): a mismatch is refused and nothing is kept. */
  expectedSha256?: string;
  /** Aborts the write (the sender disconnected): nothing is kept. */
  signal?: AbortSignal;
}

/** Why a put was refused; the bytes written so far are removed before the promise rejects. */
export type BlobRefusal = 'too-large' | 'digest-mismatch' | 'aborted';

export class BlobRefused extends Error {
  constructor(
    readonly reason: BlobRefusal,
    message: string
  ) {
    super(message);
    this.name = 'BlobRefused';
  }
}

/**
 * Document bytes of any size, kept outside the referral rows and never held whole in memory: written from a stream
 * (hashed as they pass), durable when `put` resolves, content-addressed (the same bytes are stored once), read back
 * as a stream. Implementations: the file system (blobs/fs.ts) and PostgreSQL (when replicas share a database).
 */
export interface BlobStore {
  readonly kind: 'fs' | 'postgres';
  /** Streams `source` into the store; resolves once the bytes are durable. Rejects with BlobRefused, keeping nothing. */
  put(source: Readable, opts: PutOptions): Promise<StoredBlob>;
  /** The blob's bytes as a stream; undefined when there is no such blob. */
  open(sha256: string): Promise<Readable | undefined>;
  /** The blob's size, or undefined when there is none. */
  stat(sha256: string): Promise<number | undefined>;
  /** Removes a blob; false when there was none. */
  delete(sha256: string): Promise<boolean>;
  /** Every blob's address and when it was stored (for collecting the ones no referral names). */
  list(): AsyncIterable<ListedBlob>;
  /** Removes what uploads interrupted by a crash left (temporary files, chunks no blob names) begun before `before`; returns how many. */
  sweepUnfinished(before: Date): Promise<number>;
}

export interface ListedBlob {
  sha256: string;
  storedAt: Date;
}

/**
 * A store usable at once whose opening (creating its directory, clearing a crash's temporary files) is still under way:
 * every call waits for it. `ready` settles when it has opened (the owner awaits it at start-up, where a failure belongs).
 */
export function openingBlobStore(kind: BlobStore['kind'], opening: Promise<BlobStore>): BlobStore & { ready: Promise<void> } {
  const ready = opening.then(() => undefined);
  ready.catch(() => undefined); // reported by whoever awaits `ready`; calls made meanwhile reject with the same error
  return {
    kind,
    ready,
    put: async (source, opts) => (await opening).put(source, opts),
    open: async (sha256) => (await opening).open(sha256),
    stat: async (sha256) => (await opening).stat(sha256),
    delete: async (sha256) => (await opening).delete(sha256),
    async *list() {
      yield* (await opening).list();
    },
    sweepUnfinished: async (before) => (await opening).sweepUnfinished(before),
  };
}
