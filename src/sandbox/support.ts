// Small helpers for the FHIR sandbox: HTTP-status-carrying errors, urn:uuid placeholder
// handling, ETag parsing and an undo journal for the in-memory repository.
import { operationOutcome } from '../outcomes';
import { OperationOutcomeError, getStatus, serverError } from '@medplum/core';
import type { MemoryRepository } from '@medplum/fhir-router';
import type { OperationOutcome, OperationOutcomeIssue, Resource } from '@medplum/fhirtypes';

type IssueType = OperationOutcomeIssue['code'];
import { STATUS_CODES } from 'node:http';

/** An error that carries the HTTP status to answer with and the OperationOutcome body. */
export class SandboxError extends Error {
  constructor(
    readonly status: number,
    readonly outcome: OperationOutcome
  ) {
    super(outcome.issue?.[0]?.details?.text ?? outcome.issue?.[0]?.diagnostics ?? `HTTP ${status}`);
    this.name = 'SandboxError';
  }
}

const ISSUE_CODE_BY_STATUS: Record<number, IssueType> = {
  400: 'invalid',
  404: 'not-found',
  405: 'not-supported',
  409: 'conflict',
  410: 'deleted',
  412: 'conflict',
  413: 'too-costly',
  415: 'not-supported',
  500: 'exception',
};

/** The sandbox answers as a FHIR server does: the status is part of its behaviour, the outcome is built as the gateway's are. */
export function outcome(status: number, text: string, code?: IssueType, expression?: string): OperationOutcome {
  return operationOutcome([
    {
      severity: status >= 400 ? 'error' : 'information',
      code: code ?? ISSUE_CODE_BY_STATUS[status] ?? (status >= 400 ? 'processing' : 'informational'),
      message: text,
      expression,
    },
  ]);
}

export function fail(status: number, text: string, code?: IssueType, expression?: string): SandboxError {
  return new SandboxError(status, outcome(status, text, code, expression));
}

/** Maps anything thrown to an HTTP status + OperationOutcome. Unknown errors are 500s. */
export function toStatusAndOutcome(err: unknown): { status: number; outcome: OperationOutcome } {
  if (err instanceof SandboxError) {
    return { status: err.status, outcome: err.outcome };
  }
  if (err instanceof OperationOutcomeError) {
    return { status: getStatus(err.outcome), outcome: err.outcome };
  }
  return { status: 500, outcome: serverError(err instanceof Error ? err : new Error(String(err))) };
}

export function statusLine(status: number): string {
  return `${status} ${STATUS_CODES[status] ?? ''}`.trim();
}

/** `W/"3"` / `"3"` / `3` -> `3`. */
export function parseETag(value: string | undefined): string | undefined {
  if (value === undefined) {
    return undefined;
  }
  const quoted = /"([^"]*)"/.exec(value);
  const result = (quoted ? quoted[1] : value).trim();
  return result === '' ? undefined : result;
}

export const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;

const URN_UUID_ANYWHERE = /urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi;
const URN_PLACEHOLDER = /^urn:(uuid|oid):/i;

/** Placeholders are compared case-insensitively for urn:uuid (RFC 4122 says uuids are case-insensitive). */
export function normalizePlaceholder(fullUrl: string): string {
  const trimmed = fullUrl.trim();
  return URN_PLACEHOLDER.test(trimmed) ? trimmed.toLowerCase() : trimmed;
}

export function rewriteString(value: string, identities: ReadonlyMap<string, string>): string {
  if (identities.size === 0) {
    return value;
  }
  const direct = identities.get(normalizePlaceholder(value));
  if (direct) {
    return direct;
  }
  if (!/urn:uuid:/i.test(value)) {
    return value;
  }
  return value.replace(URN_UUID_ANYWHERE, (match) => identities.get(match.toLowerCase()) ?? match);
}

/** Deep copy of `value` with every urn:uuid / urn:oid placeholder replaced by its resolved `Type/id`. */
export function rewriteDeep<T>(value: T, identities: ReadonlyMap<string, string>): T {
  if (typeof value === 'string') {
    return rewriteString(value, identities) as T;
  }
  if (Array.isArray(value)) {
    return value.map((item: unknown) => rewriteDeep(item, identities)) as T;
  }
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value as Record<string, unknown>)) {
      out[key] = rewriteDeep(item, identities);
    }
    return out as T;
  }
  return value;
}

/** `reference` values that still point at a bundle-local placeholder after rewriting. */
export function findUnresolvedReferences(value: unknown, path: string, found: string[] = []): string[] {
  if (Array.isArray(value)) {
    value.forEach((item, i) => findUnresolvedReferences(item, `${path}[${i}]`, found));
  } else if (value !== null && typeof value === 'object') {
    for (const [key, item] of Object.entries(value as Record<string, unknown>)) {
      if (key === 'reference' && typeof item === 'string' && URN_PLACEHOLDER.test(item.trim())) {
        found.push(`${path}.reference = ${item}`);
      } else if (typeof item === 'object') {
        findUnresolvedReferences(item, `${path}.${key}`, found);
      }
    }
  }
  return found;
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

// ---------------------------------------------------------------------------------------------
// Undo journal. MemoryRepository.withTransaction() does not roll anything back, so a failing
// transaction entry would leave the earlier entries written. The journal remembers, per touched
// resource, its current version and history length before the first write, and restores them.
// It uses MemoryRepository's internal maps (fhir-router 5.2.13: `resources` and `history`, both
// Map<type, Map<id, ...>>); if those ever change shape it falls back to the public API
// (expunge created resources, re-seed previous versions of updated ones).
// ---------------------------------------------------------------------------------------------

interface MemoryInternals {
  resources: Map<string, Map<string, Resource>>;
  history: Map<string, Map<string, Resource[]>>;
}

function getInternals(repo: MemoryRepository): MemoryInternals | undefined {
  const candidate = repo as unknown as { resources?: unknown; history?: unknown };
  return candidate.resources instanceof Map && candidate.history instanceof Map ? (candidate as MemoryInternals) : undefined;
}

interface JournalRecord {
  type: string;
  id: string;
  current: Resource | undefined;
  historyLength: number;
  tombstoned: boolean;
}

export class Journal {
  private readonly records = new Map<string, JournalRecord>();
  private readonly internals: MemoryInternals | undefined;

  constructor(
    private readonly repo: MemoryRepository,
    private readonly tombstones: Set<string>
  ) {
    this.internals = getInternals(repo);
  }

  async before(type: string, id: string): Promise<void> {
    const key = `${type}/${id}`;
    if (this.records.has(key)) {
      return;
    }
    let current: Resource | undefined;
    let historyLength: number;
    if (this.internals) {
      current = this.internals.resources.get(type)?.get(id);
      historyLength = this.internals.history.get(type)?.get(id)?.length ?? 0;
    } else {
      current = await this.repo.readResource(type, id).catch(() => undefined);
      historyLength = current ? 1 : 0;
    }
    this.records.set(key, { type, id, current, historyLength, tombstoned: this.tombstones.has(key) });
  }

  async rollback(): Promise<void> {
    for (const record of [...this.records.values()].reverse()) {
      const { type, id, current, historyLength, tombstoned } = record;
      if (this.internals) {
        let byId = this.internals.resources.get(type);
        if (!byId) {
          byId = new Map();
          this.internals.resources.set(type, byId);
        }
        if (current) {
          byId.set(id, current);
        } else {
          byId.delete(id);
        }
        const historyById = this.internals.history.get(type);
        const versions = historyById?.get(id);
        if (historyById && versions) {
          if (historyLength === 0) {
            historyById.delete(id);
          } else {
            versions.length = historyLength;
          }
        }
      } else if (!current) {
        await this.repo.expungeResource(type, id);
      } else {
        const previous = current;
        await this.repo.withSeeding(() => this.repo.updateResource(previous));
      }
      const key = `${type}/${id}`;
      if (tombstoned) {
        this.tombstones.add(key);
      } else {
        this.tombstones.delete(key);
      }
    }
    this.records.clear();
  }
}
