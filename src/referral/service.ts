import { createHash } from 'node:crypto';
import type { z } from 'zod';
import { HttpError, type IssueInput, pathToExpression } from '../api/outcome';
import type { Destination } from '../config/destinations';
import { mapReferralToBundle } from '../mapping/bundle';
import { checkCodes } from '../mapping/codes';
import { routeReferral } from '../mapping/routing';
import { validateBundle } from '../mapping/validate';
import { logger } from '../observability/logger';
import { newReferralId, nowIso } from '../store/ids';
import type { ReferralStore } from '../store/referral-store';
import { type Referral, referralSchema } from './schema';
import type { StoredReferral } from './types';
import { type ReferralView, toView } from './view';

export interface DestinationDirectory {
  ids(): string[];
  get(id: string): Destination | undefined;
}

export function zodIssues(error: z.ZodError, prefix: ReadonlyArray<PropertyKey> = []): IssueInput[] {
  return error.issues.slice(0, 50).map((i) => ({
    code: i.code === 'unrecognized_keys' ? 'structure' : 'invalid',
    message: `${pathToExpression([...prefix, ...i.path])}: ${i.message}${i.code === 'unrecognized_keys' ? ` (${(i as { keys: string[] }).keys.join(', ')})` : ''}`,
    expression: pathToExpression([...prefix, ...i.path]),
  }));
}

/** A stable hash of a JSON value: object keys sorted, so field order does not matter. */
export function canonicalHash(value: unknown): string {
  const canon = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(canon);
    if (v && typeof v === 'object') {
      return Object.fromEntries(Object.keys(v as object).sort().map((k) => [k, canon((v as Record<string, unknown>)[k])]));
    }
    return v;
  };
  return createHash('sha256').update(JSON.stringify(canon(value))).digest('hex');
}

export interface SubmitResult {
  created: boolean;
  view: ReferralView;
}

export class ReferralService {
  constructor(
    private readonly store: ReferralStore,
    private readonly destinations: DestinationDirectory,
    private readonly onQueued: () => void = () => undefined
  ) {}

  /** Checks a submission completely: schema, codes, routing and the FHIR content it maps to. */
  check(body: unknown): { referral: Referral; destination: Destination } {
    const parsed = referralSchema.safeParse(body);
    if (!parsed.success) {
      throw new HttpError(422, zodIssues(parsed.error));
    }
    const referral = parsed.data;
    const codeIssues = checkCodes(referral);
    if (codeIssues.length > 0) {
      throw new HttpError(422, codeIssues.map((i) => ({ code: 'code-invalid', message: `${i.path}: ${i.message}`, expression: i.path })));
    }
    const route = routeReferral(referral, this.destinations.ids());
    if (!route) {
      throw new HttpError(422, {
        code: 'not-found',
        expression: 'destination',
        message: referral.destination
          ? `destination: unknown destination "${referral.destination}" (known: ${this.destinations.ids().join(', ')})`
          : 'destination: no routing rule matches this diagnosis; name a destination',
      });
    }
    const destination = this.destinations.get(route.destination) as Destination;
    const bundle = mapReferralToBundle({ referralId: 'ref_validation', clientId: 'validation', referral, destination, createdAt: nowIso() });
    const fhirIssues = validateBundle(bundle);
    if (fhirIssues.length > 0) {
      throw new HttpError(
        422,
        fhirIssues.slice(0, 50).map((i) => ({ code: 'invariant', message: `FHIR content: ${i.path}: ${i.message}`, expression: i.path }))
      );
    }
    return { referral: { ...referral, destination: route.destination }, destination };
  }

  async submit(clientId: string, body: unknown, idempotencyKey: string | null): Promise<SubmitResult> {
    const requestHash = canonicalHash(body);
    const externalId = typeof (body as { externalId?: unknown })?.externalId === 'string' ? (body as { externalId: string }).externalId : null;

    // A replay is answered before validation work, so it is cheap and stable.
    if (externalId || idempotencyKey) {
      const replay = await this.replay(clientId, externalId ?? '', idempotencyKey, requestHash);
      if (replay) return replay;
    }
    const { referral, destination } = this.check(body);
    const id = newReferralId();
    const created = await this.store.createReferral({
      id,
      clientId,
      externalId: referral.externalId,
      idempotencyKey,
      requestHash,
      destination: destination.id,
      payload: referral,
      at: nowIso(),
    });
    if (!created) {
      // Lost a race with an identical submission: answer as a replay.
      const replay = await this.replay(clientId, referral.externalId, idempotencyKey, requestHash);
      if (replay) return replay;
      throw new HttpError(409, { code: 'conflict', message: 'a concurrent submission with this externalId is in progress', expression: 'externalId' });
    }
    logger.info('referral queued', { referralId: id, clientId, destination: destination.id, documents: referral.documents.length });
    this.onQueued();
    return { created: true, view: await this.view(created) };
  }

  private async replay(clientId: string, externalId: string, key: string | null, hash: string): Promise<SubmitResult | null> {
    const existing = await this.store.findForIdempotency(clientId, externalId, key);
    if (!existing) return null;
    if (existing.requestHash !== hash) {
      const byKey = key !== null;
      throw new HttpError(409, {
        code: 'conflict',
        expression: byKey ? 'Idempotency-Key' : 'externalId',
        message: byKey
          ? `Idempotency-Key was already used for referral ${existing.id} with a different body`
          : `externalId ${externalId} was already submitted as referral ${existing.id} with a different body`,
      });
    }
    return { created: false, view: await this.view(existing) };
  }

  async view(r: StoredReferral): Promise<ReferralView> {
    const [history, outbox] = await Promise.all([this.store.history(r.id), this.store.outboxFor(r.id)]);
    return toView(r, history, outbox);
  }

  async get(clientId: string, id: string): Promise<StoredReferral> {
    const r = await this.store.get(clientId, id);
    if (!r) throw new HttpError(404, { code: 'not-found', message: `Referral ${id} not found` });
    return r;
  }
}
