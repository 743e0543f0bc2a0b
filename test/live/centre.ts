import type { Attachment, Binary, Bundle, DocumentReference, PractitionerRole, Reference, Resource, ServiceRequest, Task } from '@medplum/fhirtypes';
import type { Destination } from '../../src/config/destinations';
import { createFhirClient, type FhirClient } from '../../src/destinations/fhir/client';
import { REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';

/** `Type/id` of a reference (relative, absolute, with or without `_history`), else the reference as it is. */
export function relativeRef(ref: string | undefined): string | undefined {
  if (!ref) return ref;
  const m = /([A-Z][A-Za-z]+)\/([A-Za-z0-9\-.]{1,64})(?:\/_history\/[A-Za-z0-9\-.]{1,64})?\/?$/.exec(ref);
  return m ? `${m[1]}/${m[2]}` : ref;
}

function split(ref: string): [string, string] {
  const [type, id] = relativeRef(ref)!.split('/');
  return [type, id];
}

/** Line-oriented log for the lane (jest's console adds a stack to every line). */
export function note(line: string): void {
  process.stderr.write(`[live] ${line}\n`);
}

/**
 * The cancer centre's side of the loop: a FHIR client of its own on the same server (the gateway's
 * destination, so the same base, auth and attachment rules), reading and answering as a centre would.
 */
export class Centre {
  readonly client: FhirClient;

  constructor(readonly dest: Destination) {
    this.client = createFhirClient(dest, { env: process.env });
  }

  async read<T extends Resource>(ref: string): Promise<T> {
    const [type, id] = split(ref);
    return this.client.read<T>(type as T['resourceType'], id);
  }

  /** The resources of `type` carrying the gateway's referral identifier `referralId`. */
  async byReferralId<T extends Task | ServiceRequest>(type: T['resourceType'], referralId: string): Promise<T[]> {
    const found = await this.client.searchAll<T>(type, { identifier: `${REFERRAL_IDENTIFIER_SYSTEM}|${referralId}` });
    return found.resources;
  }

  async create<T extends Resource>(resource: T): Promise<T> {
    return (await this.client.medplum.createResource(resource as never)) as unknown as T;
  }

  /**
   * A Binary holding `bytes`, as a centre would store a report: a raw upload (`POST Binary` with the
   * document's own Content-Type, what Medplum and HAPI take), or, where the server refuses raw bodies,
   * a FHIR JSON Binary with base64 data.
   */
  async createBinary(contentType: string, bytes: Buffer): Promise<{ id: string }> {
    try {
      return await this.client.uploadBinary(contentType, bytes);
    } catch (err) {
      const status = (err as { status?: number }).status;
      if (status === undefined || status < 400 || status >= 500) throw err;
      const created = await this.create<Binary>({ resourceType: 'Binary', contentType, data: bytes.toString('base64') });
      return { id: String(created.id) };
    }
  }

  /** PUT with If-Match on the version read, as the centre docs ask. */
  async update<T extends Resource>(resource: T): Promise<T> {
    return this.client.update(resource, resource.meta?.versionId);
  }

  /** The bytes an attachment stands for: its inline data, or what its URL (Binary/<id>, presigned) answers. */
  async attachmentBytes(att: Attachment): Promise<Buffer> {
    if (att.data !== undefined) return Buffer.from(att.data, 'base64');
    if (!att.url) throw new Error('attachment has neither data nor url');
    const got = await this.client.readUrl(att.url, { accept: '*/*' });
    const binary = got.json as { resourceType?: string; data?: string } | undefined;
    if (binary?.resourceType === 'Binary') return Buffer.from(binary.data ?? '', 'base64');
    return got.body;
  }

  /**
   * What the centre holds for a delivered referral, found from the centre's side: the Task and
   * ServiceRequest by identifier (and the ids the gateway recorded), the ServiceRequest's subject, reason
   * and supporting information, the DocumentReferences linked to it, and the Binaries their attachments name.
   * Shared resources (the referrer's Practitioner, Organization and PractitionerRole, the centre's
   * Organization) are listed separately: they are reused by every referral and are left in place.
   */
  async heldFor(referralId: string, recorded: string[] = []): Promise<{ own: string[]; shared: string[] }> {
    const own = new Set<string>();
    const shared = new Set<string>();
    const add = (set: Set<string>, r: Reference | undefined): void => {
      const ref = relativeRef(r?.reference);
      if (ref && /^[A-Z][A-Za-z]+\/[A-Za-z0-9\-.]+$/.test(ref)) set.add(ref);
    };
    for (const ref of recorded) add(own, { reference: ref });
    const tasks = await this.byReferralId<Task>('Task', referralId).catch(() => [] as Task[]);
    const srs = await this.byReferralId<ServiceRequest>('ServiceRequest', referralId).catch(() => [] as ServiceRequest[]);
    for (const t of tasks) own.add(`Task/${t.id}`);
    for (const sr of srs) {
      own.add(`ServiceRequest/${sr.id}`);
      add(own, sr.subject);
      for (const r of sr.reasonReference ?? []) add(own, r);
      for (const r of sr.supportingInfo ?? []) add(own, r);
      add(shared, sr.requester);
      for (const p of sr.performer ?? []) add(shared, p);
      const docs = await this.client
        .searchAll<DocumentReference>('DocumentReference', { related: `ServiceRequest/${sr.id}` })
        .catch(() => ({ resources: [] as DocumentReference[] }));
      for (const d of docs.resources) own.add(`DocumentReference/${d.id}`);
    }
    for (const ref of [...shared].filter((r) => r.startsWith('PractitionerRole/'))) {
      const role = await this.read<PractitionerRole>(ref).catch(() => undefined);
      add(shared, role?.practitioner);
      add(shared, role?.organization);
    }
    for (const ref of [...own].filter((r) => r.startsWith('DocumentReference/'))) {
      const doc = await this.read<DocumentReference>(ref).catch(() => undefined);
      add(shared, doc?.custodian);
      for (const a of doc?.author ?? []) add(shared, a);
      for (const c of doc?.content ?? []) {
        const url = c.attachment?.url;
        if (!url) continue;
        // Binary/<id> under the base, or a presigned storage URL naming the Binary's id (Medplum: /<id>/<version>?...).
        const id =
          /(?:^|\/)Binary\/([A-Za-z0-9\-.]{1,64})/.exec(url)?.[1] ??
          /\/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:\/|\?|$)/i.exec(url)?.[1];
        if (id) own.add(`Binary/${id}`);
      }
    }
    return { own: [...own], shared: [...shared].filter((r) => !own.has(r)) };
  }

  /**
   * Deletes `refs` (ignoring failures): first in one transaction, which servers that check references on
   * delete (HAPI) need for resources pointing at each other (Condition <-> stage Observation); then, for
   * what is left, one by one in dependency order, twice. Answers what is still readable afterwards.
   */
  async remove(refs: string[]): Promise<string[]> {
    const order = [
      'Task',
      'ServiceRequest',
      'DocumentReference',
      'Consent',
      'Observation',
      'Procedure',
      'MedicationStatement',
      'Condition',
      'Binary',
      'Patient',
    ];
    const rank = (r: string): number => {
      const i = order.indexOf(r.split('/')[0]);
      return i < 0 ? order.length : i;
    };
    const sorted = [...new Set(refs)].sort((a, b) => rank(a) - rank(b));
    if (sorted.length === 0) return [];
    const bundle: Bundle = { resourceType: 'Bundle', type: 'transaction', entry: sorted.map((r) => ({ request: { method: 'DELETE', url: r } })) };
    await this.client.transaction(bundle).catch(() => undefined);
    for (let pass = 0; pass < 2; pass++) {
      for (const ref of sorted) {
        if (!(await this.exists(ref))) continue;
        const [type, id] = split(ref);
        await this.client.medplum.deleteResource(type as never, id).catch(() => undefined);
      }
    }
    const left: string[] = [];
    for (const ref of sorted) if (await this.exists(ref)) left.push(ref);
    return left;
  }

  private async exists(ref: string): Promise<boolean> {
    const res = await this.client.raw('GET', ref, { headers: { Accept: 'application/fhir+json' } }).catch(() => undefined);
    return res !== undefined && res.status >= 200 && res.status < 300;
  }
}
