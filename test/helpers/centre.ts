import type { DocumentReference, Task } from '@medplum/fhirtypes';
import type { Gateway } from '../../src/gateway';
import { getReferral } from '../../src/store';
import { eventually } from './gateway';

/**
 * Plays the cancer centre on the gateway's sandbox with plain FHIR REST: waits until the referral is delivered,
 * accepts its Task, then completes it with `reportText` as a DocumentReference in Task.output, polling after each
 * step. Returns the centre's Task id.
 */
export async function acceptAndComplete(gw: Gateway, referralId: string, reportText: string): Promise<string> {
  const fhirBase = `${gw.url}/sandbox/fhir/R4`;
  const fhir = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
    const res = await fetch(`${fhirBase}/${path}`, { ...init, headers: { 'Content-Type': 'application/fhir+json', ...(init.headers ?? {}) } });
    if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as T;
  };
  const sent = await eventually(async () => {
    const r = await getReferral(gw.db, referralId, { payload: false });
    return r?.status === 'sent' && r.fhir?.task ? r : undefined;
  }, 20_000);
  const task = await fhir<Task>(sent.fhir?.task as string);
  const accepted = await fhir<Task>(`Task/${task.id}`, {
    method: 'PUT',
    body: JSON.stringify({ ...task, status: 'accepted', businessStatus: { text: 'Accepted by the board' } }),
  });
  await gw.poller.pollOnce({ force: true });
  const report = await fhir<DocumentReference>('DocumentReference', {
    method: 'POST',
    body: JSON.stringify({
      resourceType: 'DocumentReference',
      status: 'current',
      type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
      content: [{ attachment: { contentType: 'text/plain', title: 'Second opinion', data: Buffer.from(reportText).toString('base64') } }],
    }),
  });
  await fhir<Task>(`Task/${task.id}`, {
    method: 'PUT',
    body: JSON.stringify({
      ...accepted,
      status: 'completed',
      businessStatus: undefined,
      output: [{ type: { text: 'opinion report' }, valueReference: { reference: `DocumentReference/${report.id}` } }],
    }),
  });
  await gw.poller.pollOnce({ force: true });
  return task.id as string;
}
