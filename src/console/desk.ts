import { createHash } from 'node:crypto';
import type { Attachment, DocumentReference, Patient, ServiceRequest, Task, Condition } from '@medplum/fhirtypes';
import type { FhirClient } from '../destinations';
import { GATEWAY_TAG, GATEWAY_TAG_SEARCH, REFERRAL_IDENTIFIER_SYSTEM } from '../mapping';
import { type Html, html } from './html';
import { layout, type Page } from './views';

// The centre desk: what a cancer centre's own system does with a referral's Task, as plain FHIR REST on the centre's
// server through the gateway's FHIR client (its credentials for that destination). Nothing here touches the
// gateway's store: the gateway learns of each change the way it learns of a real centre's, by polling the Task.

export const OPEN_TASK_STATUSES = ['requested', 'received', 'accepted', 'ready', 'on-hold', 'in-progress'] as const;

export type DeskAction = 'accept' | 'reject' | 'hold' | 'start' | 'complete';

/** The FHIR Task state machine (domain.md §4): which Task statuses each button leaves from, and where it goes. */
export const DESK_ACTIONS: Record<DeskAction, { from: readonly string[]; to: Task['status']; label: string }> = {
  accept: { from: ['requested', 'received'], to: 'accepted', label: 'Accept' },
  reject: { from: ['requested', 'received'], to: 'rejected', label: 'Reject' },
  start: { from: ['accepted', 'ready', 'on-hold'], to: 'in-progress', label: 'Start' },
  hold: { from: ['in-progress'], to: 'on-hold', label: 'Put on hold' },
  complete: { from: ['in-progress'], to: 'completed', label: 'Complete' },
};

export const isDeskAction = (s: string): s is DeskAction => Object.hasOwn(DESK_ACTIONS, s);

/** A desk action the Task's status does not allow (a 409 page naming both). */
export class DeskConflict extends Error {}

/** A Task (or document) the gateway did not place at the centre: the desk answers as for an unknown id (404). */
export class DeskNotFound extends Error {}

/**
 * Whether a Task at the centre is one the gateway placed there. The desk shows and moves only those: the centre's
 * server holds other systems' Tasks too, and the gateway's credentials must not be a way to act on them.
 */
export type TaskOwner = (task: Task) => Promise<boolean>;

/** The gateway referral id a Task carries (Task.identifier under REFERRAL_IDENTIFIER_SYSTEM), if any. */
export const referralIdOfTask = (task: Task): string | undefined => task.identifier?.find((i) => i.system === REFERRAL_IDENTIFIER_SYSTEM)?.value;

const hasGatewayTag = (r: { meta?: { tag?: Array<{ system?: string; code?: string }> } }): boolean =>
  (r.meta?.tag ?? []).some((t) => t.system === GATEWAY_TAG.system && t.code === GATEWAY_TAG.code);

export interface WaitingTask {
  destination: string;
  task: Task;
}

/** Tasks still open at a destination, most recently changed first. */
export async function waitingTasks(client: FhirClient, destination: string, owned: TaskOwner, max = 50): Promise<WaitingTask[]> {
  // Only the gateway's Tasks (its tag, as the poller searches them; then each checked against the store).
  // A centre that does not answer within 5 s is shown as an error on the desk, not a page that hangs.
  const bundle = await client.search<Task>(
    'Task',
    { _tag: GATEWAY_TAG_SEARCH, status: OPEN_TASK_STATUSES.join(','), _sort: '-_lastUpdated', _count: String(max) },
    { signal: AbortSignal.timeout(5_000) }
  );
  const open = (bundle.entry ?? [])
    .map((e) => e.resource)
    .filter((t): t is Task => t?.resourceType === 'Task' && (OPEN_TASK_STATUSES as readonly string[]).includes(t.status));
  const mine = await Promise.all(open.map(async (task) => ((await owned(task)) ? task : undefined)));
  return mine.filter((t): t is Task => t !== undefined).map((task) => ({ destination, task }));
}

/** The Task, read at the centre, only if the gateway placed it (else DeskNotFound). */
async function ownTask(client: FhirClient, taskId: string, owned: TaskOwner): Promise<Task> {
  const task = await client.read<Task>('Task', taskId);
  if (!(await owned(task))) throw new DeskNotFound('no such Task');
  return task;
}

export interface CentreReferral {
  task: Task;
  request?: ServiceRequest;
  patient?: Patient;
  conditions: Condition[];
  documents: DocumentReference[];
}

const idOf = (ref: string | undefined, type: string): string | undefined => {
  const m = ref ? new RegExp(`(?:^|/)${type}/([A-Za-z0-9\\-.]{1,64})(?:/_history/.*)?$`).exec(ref) : null;
  return m?.[1];
};

async function readOptional<T extends Task | ServiceRequest | Patient | Condition | DocumentReference>(
  client: FhirClient,
  type: T['resourceType'],
  ref: string | undefined
): Promise<T | undefined> {
  const id = idOf(ref, type);
  if (!id) return undefined;
  try {
    return await client.read<T>(type, id);
  } catch {
    return undefined;
  }
}

/** The referral as the centre's server holds it: the Task, its ServiceRequest, patient, diagnosis and documents. */
export async function centreReferral(client: FhirClient, taskId: string, owned: TaskOwner): Promise<CentreReferral> {
  const task = await ownTask(client, taskId, owned);
  const request = await readOptional<ServiceRequest>(client, 'ServiceRequest', task.focus?.reference);
  const patient = await readOptional<Patient>(client, 'Patient', task.for?.reference ?? request?.subject?.reference);
  const conditions = (await Promise.all((request?.reasonReference ?? []).map((r) => readOptional<Condition>(client, 'Condition', r.reference)))).filter(
    (c): c is Condition => c !== undefined
  );
  const refs = new Set<string>();
  for (const i of task.input ?? []) if (i.valueReference?.reference?.includes('DocumentReference/')) refs.add(i.valueReference.reference);
  for (const s of request?.supportingInfo ?? []) if (s.reference?.includes('DocumentReference/')) refs.add(s.reference);
  const documents = (await Promise.all([...refs].map((r) => readOptional<DocumentReference>(client, 'DocumentReference', r)))).filter(
    (d): d is DocumentReference => d !== undefined
  );
  return { task, request, patient, conditions, documents };
}

/** A refusal of the Task update because the Task changed since it was read (If-Match): 412, or 409 on some servers. */
const changedMeanwhile = (err: unknown): boolean => {
  const status = (err as { status?: number }).status;
  return status === 412 || status === 409;
};

const CHANGED = 'the Task changed at the centre since this page read it: reload the page and try again';

/** PUTs the Task with If-Match on the version read; a Task changed meanwhile is a DeskConflict. */
async function updateTask(client: FhirClient, next: Task, version: string | undefined): Promise<Task> {
  try {
    return await client.update(next, version);
  } catch (err) {
    if (changedMeanwhile(err)) throw new DeskConflict(CHANGED);
    throw err;
  }
}

/** Moves the Task (If-Match on the version read): accept, reject with a reason, start, hold. */
export async function moveTask(client: FhirClient, taskId: string, owned: TaskOwner, action: Exclude<DeskAction, 'complete'>, reason?: string): Promise<Task> {
  const task = await ownTask(client, taskId, owned);
  const rule = DESK_ACTIONS[action];
  if (!rule.from.includes(task.status)) throw new DeskConflict(`the Task is ${task.status}: ${rule.label.toLowerCase()} needs ${rule.from.join(' or ')}`);
  const next: Task = { ...task, status: rule.to, lastModified: new Date().toISOString() };
  // Stale reasons are cleared on a change of status (AU eRequesting's rule, domain.md §4).
  delete next.statusReason;
  delete next.businessStatus;
  if (action === 'reject') next.statusReason = { text: reason };
  if (action === 'hold' && reason) next.statusReason = { text: reason };
  return updateTask(client, next, task.meta?.versionId);
}

export interface Opinion {
  title: string;
  contentType: string;
  bytes: Buffer;
}

/**
 * Completes the Task with the opinion: the PDF as a raw Binary (servers cap JSON bodies: Medplum at about 1 MB, so
 * no base64 inside a resource), a DocumentReference (LOINC 11488-4, consult note; its attachment's url, size and
 * SHA-1 name the Binary; context.related the Task's focus) in Task.output. If the Task update is then refused (it
 * changed meanwhile: DeskConflict), the document and the Binary are deleted again: no orphan opinion is left.
 */
export async function completeTask(client: FhirClient, taskId: string, owned: TaskOwner, opinion: Opinion): Promise<Task> {
  const task = await ownTask(client, taskId, owned);
  const rule = DESK_ACTIONS.complete;
  if (!rule.from.includes(task.status)) throw new DeskConflict(`the Task is ${task.status}: complete needs ${rule.from.join(' or ')}`);
  const binary = await client.uploadBinary(opinion.contentType, opinion.bytes);
  let doc: DocumentReference | undefined;
  try {
    const attachment: Attachment = {
      contentType: opinion.contentType,
      title: opinion.title,
      size: opinion.bytes.length,
      hash: createHash('sha1').update(opinion.bytes).digest('base64'),
      creation: new Date().toISOString(),
      url: `Binary/${binary.id}`,
    };
    doc = await client.medplum.createResource<DocumentReference>({
      resourceType: 'DocumentReference',
      status: 'current',
      type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
      category: [{ coding: [{ system: 'http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category', code: 'clinical-note' }] }],
      ...(task.for?.reference ? { subject: { reference: task.for.reference } } : {}),
      date: new Date().toISOString(),
      description: opinion.title,
      content: [{ attachment }],
      ...(task.focus?.reference ? { context: { related: [{ reference: task.focus.reference }] } } : {}),
    });
    const next: Task = {
      ...task,
      status: 'completed',
      lastModified: new Date().toISOString(),
      output: [
        ...(task.output ?? []),
        {
          type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }], text: 'opinion report' },
          valueReference: { reference: `DocumentReference/${doc.id}` },
        },
      ],
    };
    delete next.statusReason;
    delete next.businessStatus;
    return await updateTask(client, next, task.meta?.versionId);
  } catch (err) {
    // Best effort: a failure to delete leaves an unreferenced document, never a wrong answer.
    if (doc?.id) await client.medplum.deleteResource('DocumentReference', doc.id).catch(() => undefined);
    await client.medplum.deleteResource('Binary', binary.id).catch(() => undefined);
    throw err;
  }
}

/** A centre document's bytes (only a document the gateway placed): inline data, or its URL read through the client (under the destination's base only). */
export async function documentBytes(client: FhirClient, id: string): Promise<{ contentType: string; title: string; body: Buffer }> {
  const doc = await client.read<DocumentReference>('DocumentReference', id);
  if (!hasGatewayTag(doc)) throw new DeskNotFound('no such document');
  const a = doc.content?.[0]?.attachment;
  if (!a) throw new DeskConflict('the DocumentReference has no attachment');
  const title = a.title ?? doc.description ?? `document-${id}`;
  if (a.data) return { contentType: a.contentType ?? 'application/octet-stream', title, body: Buffer.from(a.data, 'base64') };
  if (a.url) {
    const r = await client.readUrl(a.url);
    return { contentType: a.contentType ?? r.contentType, title, body: r.body };
  }
  throw new DeskConflict('the attachment has neither data nor a URL');
}

// ---- views ----

const nameOf = (p: Patient | undefined): string => {
  const n = p?.name?.[0];
  if (!n) return 'unknown';
  return n.text ?? [...(n.given ?? []), n.family].filter(Boolean).join(' ');
};

export function deskListPage(p: Page, groups: Array<{ destination: string; name: string; tasks?: Task[]; error?: string }>): Html {
  return layout(
    p,
    html`<h1>Centre desk</h1>
      <p class="hint">What a centre's own system does: plain FHIR REST on the centre's server, with the gateway's credentials for it.</p>
      ${groups.map(
        (g) =>
          html`<section aria-labelledby="desk-${g.destination}">
            <h2 id="desk-${g.destination}">${g.name} <span class="muted">(${g.destination})</span></h2>
            ${g.error ? html`<p class="error" role="alert">Could not read the Tasks: ${g.error}</p>` : ''}
            ${g.tasks && g.tasks.length === 0 ? html`<p class="muted">No Task is waiting.</p>` : ''}
            ${
              g.tasks && g.tasks.length > 0
                ? html`<table class="list">
                    <caption>
                      Open Tasks, most recently changed first
                    </caption>
                    <thead>
                      <tr>
                        <th scope="col">Task</th>
                        <th scope="col">Status</th>
                        <th scope="col">Priority</th>
                        <th scope="col">Last changed</th>
                      </tr>
                    </thead>
                    <tbody>
                      ${g.tasks.map(
                        (t) =>
                          html`<tr data-task="${t.id ?? ''}">
                            <td><a href="/console/desk/${g.destination}/tasks/${t.id ?? ''}">Task/${t.id ?? ''}</a></td>
                            <td><span class="badge info" data-task-status="${t.status}">${t.status}</span></td>
                            <td>${t.priority ?? 'routine'}</td>
                            <td>${t.meta?.lastUpdated ?? ''}</td>
                          </tr>`
                      )}
                    </tbody>
                  </table>`
                : ''
            }
          </section>`
      )}`
  );
}

export function deskTaskPage(p: Page, destination: string, c: CentreReferral, notice?: string): Html {
  const t = c.task;
  const base = `/console/desk/${destination}/tasks/${t.id ?? ''}`;
  const allowed = (a: DeskAction): boolean => DESK_ACTIONS[a].from.includes(t.status);
  const csrf = html`<input type="hidden" name="_csrf" value="${p.csrf ?? ''}" />`;
  const simple = (a: 'accept' | 'start'): Html =>
    allowed(a) ? html`<form method="post" action="${base}/${a}">${csrf}<button type="submit">${DESK_ACTIONS[a].label}</button></form>` : html``;
  return layout(
    p,
    html`<p><a href="/console/desk">← Centre desk</a></p>
      <h1>Task/${t.id ?? ''} <span class="badge info" data-task-status="${t.status}">${t.status}</span></h1>
      ${notice ? html`<p class="notice" role="status">${notice}</p>` : ''} ${t.statusReason?.text ? html`<p>Reason: ${t.statusReason.text}</p>` : ''}
      <section aria-labelledby="ref-h">
        <h2 id="ref-h">The referral as the centre sees it</h2>
        <dl class="pairs">
          <dt>Patient</dt>
          <dd>${nameOf(c.patient)}${c.patient?.birthDate ? `, born ${c.patient.birthDate}` : ''}${c.patient?.gender ? `, ${c.patient.gender}` : ''}</dd>
          <dt>Request</dt>
          <dd>${c.request?.code?.coding?.[0]?.display ?? c.request?.code?.text ?? 'referral'} (${t.priority ?? c.request?.priority ?? 'routine'})</dd>
          <dt>Diagnosis</dt>
          <dd>${c.conditions.map((d) => d.code?.coding?.[0]?.display ?? d.code?.text ?? d.code?.coding?.[0]?.code ?? '').join('; ') || 'none given'}</dd>
          <dt>Reasons</dt>
          <dd>${(c.request?.reasonCode ?? []).map((r) => r.text ?? r.coding?.[0]?.display ?? r.coding?.[0]?.code ?? '').join('; ') || 'none given'}</dd>
          <dt>Questions</dt>
          <dd>
            ${
              (c.request?.note ?? []).length
                ? html`<ul>
                    ${(c.request?.note ?? []).map((n) => html`<li>${n.text}</li>`)}
                  </ul>`
                : 'none'
            }
          </dd>
        </dl>
        <h3>Documents</h3>
        ${
          c.documents.length === 0
            ? html`<p class="muted">None.</p>`
            : html`<ul>
                ${c.documents.map((d) => {
                  const a = d.content?.[0]?.attachment;
                  return html`<li>
                    <a href="/console/desk/${destination}/documents/${d.id ?? ''}" download
                      >${a?.title ?? d.description ?? `DocumentReference/${d.id ?? ''}`}</a
                    >
                    <span class="muted">${a?.contentType ?? ''}${a?.size ? `, ${String(a.size)} bytes` : ''}</span>
                  </li>`;
                })}
              </ul>`
        }
      </section>
      <section aria-labelledby="act-h" class="actions">
        <h2 id="act-h">Answer</h2>
        ${!OPEN_TASK_STATUSES.includes(t.status as (typeof OPEN_TASK_STATUSES)[number]) ? html`<p>The Task is ${t.status}: nothing more to do.</p>` : ''}
        ${simple('accept')} ${simple('start')}
        ${
          allowed('reject')
            ? html`<form method="post" action="${base}/reject" class="card">
                ${csrf}
                <label for="reject-reason">Reason for rejecting</label>
                <input id="reject-reason" name="reason" required maxlength="500" />
                <button type="submit">Reject</button>
              </form>`
            : ''
        }
        ${
          allowed('hold')
            ? html`<form method="post" action="${base}/hold" class="card">
                ${csrf}
                <label for="hold-reason">Why on hold (optional)</label>
                <input id="hold-reason" name="reason" maxlength="500" />
                <button type="submit">Put on hold</button>
              </form>`
            : ''
        }
        ${
          allowed('complete')
            ? html`<form method="post" action="${base}/complete" enctype="multipart/form-data" class="card">
                ${csrf}
                <label for="opinion-title">Report title</label>
                <input id="opinion-title" name="title" value="Second opinion" maxlength="300" />
                <label for="opinion-file">Opinion (PDF)</label>
                <input id="opinion-file" name="file" type="file" accept="application/pdf" required />
                <button type="submit">Complete with this opinion</button>
              </form>`
            : ''
        }
      </section>`
  );
}
