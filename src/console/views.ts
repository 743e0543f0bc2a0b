import type { ReferralStatus, StoredReferral } from '../model';
import { referralStatuses } from '../model';
import type { ConsoleRole, HistoryEntry, OutboxEntry, WebhookEntry, Hl7ReturnEntry } from '../store';
import { type Html, html, raw } from './html';

// The console's pages: pure functions from what was read to HTML (escaped by `html`). No patient identity is ever
// rendered here except by `identityFragment`, which the router serves only after writing the audit row.

export interface Page {
  title: string;
  who?: ConsoleRole;
  csrf?: string;
  desk?: boolean;
  /** Which navigation entry is current. */
  current?: 'referrals' | 'dead-letters' | 'destinations' | 'desk';
}

/** htmx keeps no page snapshots in browser storage (they would hold referral data), evaluates nothing, talks only to this origin. */
const HTMX_CONFIG = JSON.stringify({
  historyEnabled: false,
  historyCacheSize: 0,
  allowEval: false,
  allowScriptTags: false,
  selfRequestsOnly: true,
  includeIndicatorStyles: false,
});

export function layout(p: Page, body: Html): Html {
  const nav = p.who
    ? html`<nav aria-label="Console">
        <ul>
          ${navItem('/console/referrals', 'Referrals', p.current === 'referrals')}
          ${p.who.role === 'admin' ? navItem('/console/dead-letters', 'Dead letters', p.current === 'dead-letters') : ''}
          ${p.who.role === 'admin' ? navItem('/console/destinations', 'Destinations', p.current === 'destinations') : ''}
          ${p.who.role === 'admin' && p.desk ? navItem('/console/desk', 'Centre desk', p.current === 'desk') : ''}
        </ul>
        <form method="post" action="/console/sign-out" class="sign-out">
          <input type="hidden" name="_csrf" value="${p.csrf ?? ''}" />
          <span class="who">Signed in as ${p.who.role === 'admin' ? 'admin' : p.who.clientId}</span>
          <button type="submit">Sign out</button>
        </form>
      </nav>`
    : '';
  const headers = p.csrf ? JSON.stringify({ 'X-CSRF-Token': p.csrf }) : undefined;
  return html`<!doctype html>
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <meta name="referrer" content="same-origin" />
        <meta name="htmx-config" content="${HTMX_CONFIG}" />
        <title>${p.title} · referral-gateway console</title>
        <link rel="stylesheet" href="/console/assets/console.css" />
        <script src="/console/assets/htmx.min.js" defer></script>
      </head>
      <body ${headers ? html`hx-headers="${headers}"` : ''}>
        <header>
          <a class="brand" href="/console/referrals">referral-gateway</a>
          ${nav}
        </header>
        <main id="main">${body}</main>
      </body>
    </html>`;
}

function navItem(href: string, label: string, current: boolean): Html {
  return html`<li><a href="${href}" ${current ? raw('aria-current="page"') : ''}>${label}</a></li>`;
}

export function signInPage(error?: string): Html {
  return layout(
    { title: 'Sign in' },
    html`<h1>Sign in</h1>
      <form method="post" action="/console/sign-in" class="card narrow">
        ${error ? html`<p class="error" role="alert">${error}</p>` : ''}
        <label for="key">API key or admin key</label>
        <input id="key" name="key" type="password" autocomplete="off" required maxlength="200" />
        <p class="hint">
          A client key shows that client's referrals; the admin key shows all and can re-queue. The key is sent once, never kept in the browser.
        </p>
        <button type="submit">Sign in</button>
      </form>`
  );
}

export function errorPage(p: Page, status: number, message: string): Html {
  return layout(
    p,
    html`<h1>${status === 404 ? 'Not found' : 'Refused'}</h1>
      <p class="error" role="alert">${message}</p>`
  );
}

const STATUS_TONE: Record<ReferralStatus, string> = {
  'awaiting-documents': 'wait',
  queued: 'wait',
  sent: 'info',
  received: 'info',
  accepted: 'info',
  'on-hold': 'wait',
  'in-progress': 'info',
  completed: 'ok',
  rejected: 'bad',
  cancelled: 'bad',
  failed: 'bad',
  'delivery-failed': 'bad',
  expired: 'bad',
};

export function statusBadge(s: ReferralStatus): Html {
  return html`<span class="badge ${STATUS_TONE[s] ?? 'info'}" data-status="${s}">${s}</span>`;
}

/** "3 min", "2 h", "5 d": how long ago. */
export function age(iso: string, now = Date.now()): string {
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export interface ListQuery {
  status?: string;
  destination?: string;
  externalId?: string;
  from?: string;
  to?: string;
  after?: string;
}

export function queryString(q: ListQuery, extra: Record<string, string> = {}): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries({ ...q, ...extra })) if (v) p.set(k, v);
  const s = p.toString();
  return s ? `?${s}` : '';
}

export function listRows(items: StoredReferral[], q: ListQuery, refreshMs: number, showClient: boolean): Html {
  return html`<tbody id="rows" hx-get="/console/referrals/rows${queryString(q)}" hx-trigger="every ${String(refreshMs)}ms" hx-swap="outerHTML">
    ${
      items.length === 0
        ? html`<tr>
            <td colspan="${showClient ? '6' : '5'}">No referrals match.</td>
          </tr>`
        : ''
    }
    ${items.map(
      (r) =>
        html`<tr data-referral="${r.id}">
          <td><a href="/console/referrals/${r.id}">${r.externalId}</a></td>
          <td>${statusBadge(r.status)}</td>
          <td>${r.destination}</td>
          ${showClient ? html`<td>${r.clientId}</td>` : ''}
          <td><time datetime="${r.createdAt}" title="${r.createdAt}">${age(r.createdAt)}</time></td>
          <td><time datetime="${r.updatedAt}" title="${r.updatedAt}">${age(r.updatedAt)}</time></td>
        </tr>`
    )}
  </tbody>`;
}

export function listPage(
  p: Page,
  args: { items: StoredReferral[]; q: ListQuery; next?: string; destinations: string[]; refreshMs: number; showClient: boolean }
): Html {
  const { q } = args;
  const option = (value: string, selected: boolean): Html => html`<option value="${value}" ${selected ? raw('selected') : ''}>${value}</option>`;
  return layout(
    p,
    html`<h1>Referrals</h1>
      <form method="get" action="/console/referrals" class="filters" aria-label="Filter referrals">
        <div>
          <label for="f-status">Status</label>
          <select id="f-status" name="status">
            <option value="">any</option>
            ${referralStatuses.map((s) => option(s, q.status === s))}
          </select>
        </div>
        <div>
          <label for="f-destination">Destination</label>
          <select id="f-destination" name="destination">
            <option value="">any</option>
            ${args.destinations.map((d) => option(d, q.destination === d))}
          </select>
        </div>
        <div><label for="f-from">Created from</label><input id="f-from" name="from" type="date" value="${q.from ?? ''}" /></div>
        <div><label for="f-to">Created to</label><input id="f-to" name="to" type="date" value="${q.to ?? ''}" /></div>
        <div><label for="f-ext">External id</label><input id="f-ext" name="externalId" value="${q.externalId ?? ''}" maxlength="128" /></div>
        <div><button type="submit">Filter</button></div>
      </form>
      <table class="list">
        <caption>
          Newest first; statuses refresh every ${String(args.refreshMs / 1000)} s
        </caption>
        <thead>
          <tr>
            <th scope="col">External id</th>
            <th scope="col">Status</th>
            <th scope="col">Destination</th>
            ${args.showClient ? html`<th scope="col">Client</th>` : ''}
            <th scope="col">Age</th>
            <th scope="col">Updated</th>
          </tr>
        </thead>
        ${listRows(args.items, q, args.refreshMs, args.showClient)}
      </table>
      <p class="paging">
        ${q.after ? html`<a href="/console/referrals${queryString({ ...q, after: undefined })}">First page</a>` : ''}
        ${args.next ? html`<a rel="next" href="/console/referrals${queryString({ ...q, after: args.next })}">Next page</a>` : ''}
      </p>`
  );
}

export interface DocumentRow {
  n: number;
  kind: string;
  title: string;
  contentType: string;
  bytes?: number;
  sha256?: string;
  source: string;
  removed: boolean;
}

export interface DetailArgs {
  referral: StoredReferral;
  history: HistoryEntry[];
  deliveries: OutboxEntry[];
  webhooks: WebhookEntry[];
  hl7: Hl7ReturnEntry[];
  documents: DocumentRow[];
  refreshMs: number;
  showClient: boolean;
}

function fhirLink(baseUrl: string, ref: string | undefined): Html {
  if (!ref) return html`<span class="muted">none</span>`;
  return html`<a href="${baseUrl.replace(/\/$/, '')}/${ref}" rel="noreferrer">${ref}</a>`;
}

/** The part of the detail page that changes as the referral moves: polled every refresh period. */
export function liveSection(a: DetailArgs): Html {
  const r = a.referral;
  // Long-polled: the request waits on the server until the referral changes; each answer asks again. If a request
  // fails, the slow timer asks again later.
  const since = encodeURIComponent(r.updatedAt);
  return html`<section
    id="live"
    hx-get="/console/referrals/${r.id}/live?since=${since}"
    hx-trigger="load delay:10ms, every ${String(Math.max(a.refreshMs * 15, 15_000))}ms"
    hx-sync="this:drop"
    hx-swap="outerHTML"
    aria-live="polite"
  >
    <h2>Status</h2>
    <p class="status-line">${statusBadge(r.status)} ${r.statusReason ? html`<span class="reason">${r.statusReason}</span>` : ''}</p>
    ${
      r.report
        ? html`<p>
            Opinion report: <a href="/console/referrals/${r.id}/report" download>Download ${r.report.title ?? 'report'}</a>
            <span class="muted">(${r.report.reference})</span>
          </p>`
        : ''
    }
    <h3>Timeline</h3>
    <ol class="timeline">
      ${a.history.map(
        (h) =>
          html`<li>
            <time datetime="${h.at}">${h.at.replace('T', ' ').slice(0, 19)}</time> ${statusBadge(h.status)} ${h.reason ? html`<span>${h.reason}</span>` : ''}
          </li>`
      )}
    </ol>
    <h3>At the centre</h3>
    ${
      r.fhir
        ? html`<dl class="pairs">
            <dt>Server</dt>
            <dd>${r.fhir.baseUrl}</dd>
            <dt>Task</dt>
            <dd>${fhirLink(r.fhir.baseUrl, r.fhir.task)}</dd>
            <dt>ServiceRequest</dt>
            <dd>${fhirLink(r.fhir.baseUrl, r.fhir.serviceRequest)}</dd>
            <dt>Documents</dt>
            <dd>
              ${r.fhir.documents.length ? r.fhir.documents.map((d) => html`${fhirLink(r.fhir?.baseUrl ?? '', d)} `) : html`<span class="muted">none</span>`}
            </dd>
          </dl>`
        : html`<p class="muted">Not delivered yet.</p>`
    }
    <h3>Delivery attempts</h3>
    ${queueTable(
      'Deliveries',
      a.deliveries.map((d) => ({ id: d.id, what: d.kind, state: d.state, attempts: d.attempts, error: d.lastError, at: d.nextAttemptAt }))
    )}
    <h3>Status webhooks</h3>
    ${queueTable(
      'Webhooks',
      a.webhooks.map((w) => ({
        id: w.id,
        what: `#${w.seq} to ${hostOf(w.url)}`,
        state: w.state,
        attempts: w.attempts,
        error: w.lastError,
        at: w.nextAttemptAt,
      }))
    )}
    ${
      a.hl7.length
        ? html`<h3>HL7 v2 status messages</h3>
            ${queueTable(
              'HL7 v2 status messages',
              a.hl7.map((m) => ({ id: m.id, what: `${m.message} ${m.status}`, state: m.state, attempts: m.attempts, error: m.lastError, at: m.nextAttemptAt }))
            )}`
        : ''
    }
  </section>`;
}

function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return 'an invalid URL';
  }
}

interface QueueRow {
  id: string;
  what: string;
  state: string;
  attempts: number;
  error: string | null;
  at: string;
}

function queueTable(caption: string, rows: QueueRow[]): Html {
  if (rows.length === 0) return html`<p class="muted">None.</p>`;
  return html`<table class="compact">
    <caption class="visually-hidden">
      ${caption}
    </caption>
    <thead>
      <tr>
        <th scope="col">What</th>
        <th scope="col">State</th>
        <th scope="col">Attempts</th>
        <th scope="col">Next attempt</th>
        <th scope="col">Last error</th>
      </tr>
    </thead>
    <tbody>
      ${rows.map(
        (r) =>
          html`<tr>
            <td>${r.what}</td>
            <td>${r.state}</td>
            <td>${String(r.attempts)}</td>
            <td>${r.state === 'pending' ? r.at : ''}</td>
            <td class="error-text">${r.error ?? ''}</td>
          </tr>`
      )}
    </tbody>
  </table>`;
}

export function detailPage(p: Page, a: DetailArgs): Html {
  const r = a.referral;
  return layout(
    p,
    html`<p><a href="/console/referrals">← Referrals</a></p>
      <h1>Referral ${r.externalId}</h1>
      <dl class="pairs">
        <dt>Gateway id</dt>
        <dd><code>${r.id}</code></dd>
        <dt>Destination</dt>
        <dd>${r.destination}</dd>
        ${
          a.showClient
            ? html`<dt>Client</dt>
                <dd>${r.clientId}</dd>`
            : ''
        }
        <dt>Created</dt>
        <dd>${r.createdAt}</dd>
      </dl>
      <section id="identity" aria-labelledby="identity-h">
        <h2 id="identity-h">Patient</h2>
        <p><span class="masked" aria-hidden="true">•••• ••••, born ••••-••-••</span><span class="visually-hidden">Name and birth date hidden.</span></p>
        <button type="button" hx-post="/console/referrals/${r.id}/identity" hx-target="#identity" hx-swap="outerHTML">Show patient identity</button>
        <p class="hint">Showing it is written to the audit log (who, when, which referral).</p>
      </section>
      ${liveSection(a)}
      <section aria-labelledby="docs-h">
        <h2 id="docs-h">Documents</h2>
        ${r.documentsRemovedAt ? html`<p>Document bytes removed by retention at ${r.documentsRemovedAt}.</p>` : ''}
        ${
          a.documents.length === 0
            ? html`<p class="muted">None.</p>`
            : html`<table class="compact">
                <caption class="visually-hidden">
                  Documents
                </caption>
                <thead>
                  <tr>
                    <th scope="col">#</th>
                    <th scope="col">Kind</th>
                    <th scope="col">Title</th>
                    <th scope="col">Type</th>
                    <th scope="col">Size</th>
                    <th scope="col">SHA-256</th>
                    <th scope="col">Bytes</th>
                  </tr>
                </thead>
                <tbody>
                  ${a.documents.map(
                    (d) =>
                      html`<tr>
                        <td>${String(d.n)}</td>
                        <td>${d.kind}</td>
                        <td>${d.title}</td>
                        <td>${d.contentType}</td>
                        <td>${d.bytes === undefined ? '' : formatBytes(d.bytes)}</td>
                        <td><code class="hash" title="${d.sha256 ?? ''}">${d.sha256 ? `${d.sha256.slice(0, 16)}…` : ''}</code></td>
                        <td>${d.removed ? 'removed' : d.source}</td>
                      </tr>`
                  )}
                </tbody>
              </table>`
        }
      </section>`
  );
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

export interface Identity {
  name: string;
  birthDate: string;
  gender: string;
  identifiers: string[];
}

export function identityFragment(id: Identity): Html {
  return html`<section id="identity" aria-labelledby="identity-h">
    <h2 id="identity-h">Patient</h2>
    <dl class="pairs">
      <dt>Name</dt>
      <dd>${id.name}</dd>
      <dt>Birth date</dt>
      <dd>${id.birthDate}</dd>
      <dt>Gender</dt>
      <dd>${id.gender}</dd>
      <dt>Identifiers</dt>
      <dd>${id.identifiers.join(', ')}</dd>
    </dl>
    <p class="hint">Shown on request; recorded in the audit log.</p>
  </section>`;
}

export interface DeadLetter {
  queue: 'delivery' | 'webhook' | 'hl7';
  id: string;
  referralId: string;
  what: string;
  attempts: number;
  error: string | null;
  at: string;
}

export function deadLettersPage(p: Page, rows: DeadLetter[], notice?: string): Html {
  const label = { delivery: 'Delivery', webhook: 'Status webhook', hl7: 'HL7 v2 status message' } as const;
  return layout(
    p,
    html`<h1>Dead letters</h1>
      ${notice ? html`<p class="notice" role="status">${notice}</p>` : ''}
      ${
        rows.length === 0
          ? html`<p>Nothing is dead-lettered.</p>`
          : html`<table class="list">
              <caption>
                Deliveries, status webhooks and HL7 v2 status messages that gave up; re-queue starts their attempts again
              </caption>
              <thead>
                <tr>
                  <th scope="col">Queue</th>
                  <th scope="col">Referral</th>
                  <th scope="col">What</th>
                  <th scope="col">Attempts</th>
                  <th scope="col">Last error</th>
                  <th scope="col">Action</th>
                </tr>
              </thead>
              <tbody>
                ${rows.map(
                  (d) =>
                    html`<tr data-dead-letter="${d.id}">
                      <td>${label[d.queue]}</td>
                      <td><a href="/console/referrals/${d.referralId}">${d.referralId}</a></td>
                      <td>${d.what}</td>
                      <td>${String(d.attempts)}</td>
                      <td class="error-text">${d.error ?? ''}</td>
                      <td>
                        <form method="post" action="/console/dead-letters/${d.queue}/${d.id}/requeue">
                          <input type="hidden" name="_csrf" value="${p.csrf ?? ''}" />
                          <button type="submit" aria-label="Re-queue ${label[d.queue]} ${d.id}">Re-queue</button>
                        </form>
                      </td>
                    </tr>`
                )}
              </tbody>
            </table>`
      }`
  );
}

export interface DestinationRow {
  id: string;
  name: string;
  baseUrl: string;
  circuit: 'closed' | 'half-open' | 'open' | 'unused';
  watermark: string | null;
  lastPollAt?: string;
  lagSeconds?: number;
  failures: number;
  lastError?: string;
  nextAttemptAt?: string;
  openReferrals: number;
}

export function destinationsPage(p: Page, rows: DestinationRow[], refreshMs: number): Html {
  return layout(
    p,
    html`<h1>Destinations</h1>
      <div hx-get="/console/destinations/rows" hx-trigger="every ${String(refreshMs)}ms" hx-swap="innerHTML">${destinationsTable(rows)}</div>`
  );
}

export function destinationsTable(rows: DestinationRow[]): Html {
  return html`<table class="list">
    <caption>
      Circuit state (deliveries), the poller's last cycle, how far behind its watermark is (poll lag) and its errors
    </caption>
    <thead>
      <tr>
        <th scope="col">Destination</th>
        <th scope="col">FHIR base</th>
        <th scope="col">Circuit</th>
        <th scope="col">Last poll</th>
        <th scope="col">Poll lag</th>
        <th scope="col">Open referrals</th>
        <th scope="col">Errors</th>
      </tr>
    </thead>
    <tbody>
      ${rows.map(
        (d) =>
          html`<tr data-destination="${d.id}">
            <th scope="row">${d.name} <span class="muted">(${d.id})</span></th>
            <td>${d.baseUrl}</td>
            <td><span class="badge ${d.circuit === 'open' ? 'bad' : 'ok'}">${d.circuit}</span></td>
            <td>${d.lastPollAt ?? html`<span class="muted">not yet</span>`}</td>
            <td>${d.lagSeconds === undefined ? html`<span class="muted">no watermark</span>` : `${String(d.lagSeconds)} s`}</td>
            <td>${String(d.openReferrals)}</td>
            <td class="error-text">
              ${d.lastError ? `${String(d.failures)} in a row: ${d.lastError}${d.nextAttemptAt ? ` (next try ${d.nextAttemptAt})` : ''}` : ''}
            </td>
          </tr>`
      )}
    </tbody>
  </table>`;
}
