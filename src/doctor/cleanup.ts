// Deletes the doctor's probe resources: everything it tracked, plus anything tagged with this run found
// by a last search (writes whose answer named no id). One transaction of DELETEs first (referential
// integrity is checked at its end), then single DELETEs for whatever that left.
import { type ProbeHttp, type ResourceRef, bundleEntries, describeError, is2xx } from './http';
import { DOCTOR_RUN_SYSTEM } from './probes';

/** Dependents first: a DocumentReference before its Binary, a Task before its Patient. */
const ORDER = ['DocumentReference', 'Task', 'Patient', 'Binary'];
const SWEEP_TYPES = ['DocumentReference', 'Task', 'Patient'];

function rank(type: string): number {
  const i = ORDER.indexOf(type);
  return i < 0 ? ORDER.length - 2 : i;
}

function gone(status: number): boolean {
  return is2xx(status) || status === 404 || status === 410;
}

export async function cleanupProbes(http: ProbeHttp, runId: string, maxRequests = 40): Promise<{ deleted: number; left: string[] }> {
  let budget = maxRequests;
  const send = async (method: string, url: string, body?: unknown): Promise<Awaited<ReturnType<ProbeHttp['send']>> | undefined> => {
    if (budget <= 0) return undefined;
    budget--;
    const res = await http.client.raw(method, url, {
      headers: { Accept: 'application/fhir+json', ...(body !== undefined ? { 'Content-Type': 'application/fhir+json' } : {}) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    http.requests++;
    let json: Record<string, unknown> | undefined;
    try {
      json = res.body.length > 0 ? (JSON.parse(res.body.toString('utf8')) as Record<string, unknown>) : undefined;
    } catch {
      json = undefined;
    }
    return { ...res, json };
  };

  if (http.wrote) {
    const tag = encodeURIComponent(`${DOCTOR_RUN_SYSTEM}|${runId}`);
    for (const type of SWEEP_TYPES) {
      try {
        const res = await send('GET', `${type}?_tag=${tag}&_count=100`);
        const entries =
          res && is2xx(res.status) && Array.isArray(res.json?.entry) ? (res.json.entry as Array<{ resource?: { resourceType?: unknown; id?: unknown } }>) : [];
        for (const e of entries) {
          if (e.resource?.resourceType === type && typeof e.resource.id === 'string') http.track({ type, id: e.resource.id });
        }
      } catch {
        // the sweep is best effort; tracked resources are deleted anyway
      }
    }
  }

  const todo: ResourceRef[] = [...http.created].sort((a, b) => rank(a.type) - rank(b.type));
  if (todo.length === 0) return { deleted: 0, left: [...http.untracked] };
  const remaining = new Map<string, { ref: ResourceRef; reason: string }>(todo.map((r) => [`${r.type}/${r.id}`, { ref: r, reason: 'not deleted' }]));
  let deleted = 0;

  try {
    const res = await send('POST', http.baseUrl, {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: todo.map((r) => ({ request: { method: 'DELETE', url: `${r.type}/${r.id}` } })),
    });
    const entries = res && is2xx(res.status) ? bundleEntries(res.json) : undefined;
    if (entries && entries.length === todo.length) {
      entries.forEach((e, i) => {
        if (gone(e.status)) {
          remaining.delete(`${todo[i].type}/${todo[i].id}`);
          if (is2xx(e.status)) deleted++;
        }
      });
    }
  } catch {
    // fall back to single DELETEs
  }

  for (const [key, item] of remaining) {
    try {
      const res = await send('DELETE', key);
      if (!res) {
        item.reason = 'cleanup request budget reached';
        continue;
      }
      if (gone(res.status)) {
        remaining.delete(key);
        if (is2xx(res.status)) deleted++;
      } else {
        item.reason = `HTTP ${res.status}`;
      }
    } catch (err) {
      item.reason = describeError(err);
    }
  }
  return { deleted, left: [...[...remaining.entries()].map(([key, item]) => `${key} (${item.reason})`), ...http.untracked] };
}
