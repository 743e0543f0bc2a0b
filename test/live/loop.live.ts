import { createHash } from 'node:crypto';
import type { DocumentReference, Patient, ServiceRequest, Task } from '@medplum/fhirtypes';
import type { Destination } from '../../src/config/destinations';
import type { Gateway } from '../../src/gateway';
import { DOCUMENT_IDENTIFIER_SYSTEM, REFERRAL_IDENTIFIER_SYSTEM } from '../../src/mapping/constants';
import { fixture, KEY_A, startGateway } from '../helpers/gateway';
import { Centre, note, relativeRef } from './centre';
import { startDropProxy } from './drop-proxy';
import { liveSettings, RUN_ID } from './env';

/**
 * The referral loop against a real FHIR R4 server (LIVE_FHIR_BASE_URL; docs/for-cancer-centres.md, "Run the
 * loop against your own test server"). The gateway runs in this process on an in-memory SQLite store with
 * the server as its single destination ("default"); the test plays the centre with a FHIR client of its own
 * on the same server. Every test submits its own referral (externalId and patient MRN unique to the run), so
 * reruns on a persistent server never collide, and deletes what it created there afterwards.
 */
const settings = liveSettings();
const live = settings ? describe : describe.skip;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/** A small, well-formed PDF with one line of text. */
function smallPdf(text: string): Buffer {
  const stream = `BT /F1 12 Tf 72 720 Td (${text.replace(/[()\\]/g, '')}) Tj ET`;
  const objects = [
    '<< /Type /Catalog /Pages 2 0 R >>',
    '<< /Type /Pages /Kids [3 0 R] /Count 1 >>',
    '<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>',
    `<< /Length ${stream.length} >>\nstream\n${stream}\nendstream`,
    '<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>',
  ];
  let out = '%PDF-1.4\n';
  const offsets: number[] = [];
  objects.forEach((o, i) => {
    offsets.push(out.length);
    out += `${i + 1} 0 obj\n${o}\nendobj\n`;
  });
  const xref = out.length;
  out += `xref\n0 ${objects.length + 1}\n0000000000 65535 f \n${offsets.map((o) => `${String(o).padStart(10, '0')} 00000 n \n`).join('')}`;
  out += `trailer\n<< /Size ${objects.length + 1} /Root 1 0 R >>\nstartxref\n${xref}\n%%EOF\n`;
  return Buffer.from(out, 'latin1');
}

/** An 8 MiB "PDF": a PDF header, pseudo-random bytes (incompressible, every byte value), an EOF marker. */
function largePdf(bytes = 8 * 1024 * 1024): Buffer {
  const b = Buffer.alloc(bytes);
  let x = 0x9e3779b9;
  for (let i = 0; i < b.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  b.write('%PDF-1.4\n%\xe2\xe3\xcf\xd3\n', 0, 'latin1');
  b.write('\n%%EOF\n', b.length - 7, 'latin1');
  return b;
}

live(`the referral loop against ${settings?.baseUrl ?? 'a live FHIR server'}`, () => {
  const s = settings!;
  const waitMs = s.waitMs;
  let gw: Gateway;
  let centre: Centre;
  /** Resources every referral reuses (referrer, centre Organization): left in place, listed once at the end. */
  const sharedAtCentre = new Set<string>();
  /** What the running test leaves to clean up: its referral ids (gateway) and refs it created itself (centre). */
  let current: { name: string; referrals: Array<{ id: string; recorded: string[] }>; created: string[] };

  const gatewayEnv = (baseUrl = s.baseUrl): Record<string, string> => ({
    ...s.fhirEnv,
    FHIR_BASE_URL: baseUrl,
    LOG_LEVEL: s.logLevel,
    DELIVERY_BASE_DELAY_MS: '200',
    DELIVERY_MAX_DELAY_MS: '5000',
  });

  async function api(g: Gateway, path: string, init: RequestInit = {}): Promise<{ status: number; body: any; res: Response }> {
    const res = await fetch(`${g.url}${path}`, {
      ...init,
      headers: { Authorization: `Bearer ${KEY_A}`, 'Content-Type': 'application/json', ...(init.headers ?? {}) },
    });
    const ct = res.headers.get('content-type') ?? '';
    const body = /json/.test(ct) ? await res.json() : Buffer.from(await res.arrayBuffer());
    return { status: res.status, body, res };
  }

  /** The sample referral with an externalId and patient MRN unique to this run and test, and no callback. */
  function referral(tag: string): Record<string, any> {
    const { callbackUrl: _none, ...body } = fixture('breast-second-opinion');
    body.externalId = `EHR-${RUN_ID}-${tag}`;
    body.patient.identifiers[0].value = `MRN-${RUN_ID}-${tag}`;
    return body;
  }

  async function submit(g: Gateway, body: Record<string, any>): Promise<string> {
    const r = await api(g, '/referrals', { method: 'POST', body: JSON.stringify(body) });
    if (r.status !== 202) throw new Error(`POST /referrals answered ${r.status}: ${JSON.stringify(r.body).slice(0, 500)}`);
    current.referrals.push({ id: r.body.id as string, recorded: [] });
    return r.body.id as string;
  }

  async function view(g: Gateway, id: string): Promise<any> {
    return (await api(g, `/referrals/${id}`)).body;
  }

  /** Waits for `status`; fails at once (with the gateway's reason) if the referral ends somewhere else. */
  async function until(g: Gateway, id: string, status: string, opts: { poll?: boolean } = {}): Promise<any> {
    const end = Date.now() + waitMs;
    let last: any;
    let error = '';
    for (;;) {
      try {
        if (opts.poll) await g.poller.pollOnce({ force: true });
        last = await view(g, id);
        const entry = current.referrals.find((r) => r.id === id);
        if (entry && last.fhir) entry.recorded = [last.fhir.task, last.fhir.serviceRequest, ...(last.fhir.documents ?? [])].filter(Boolean);
        if (last.status === status) return last;
      } catch (err) {
        error = (err as Error).message;
      }
      const final = ['delivery-failed', 'rejected', 'failed', 'cancelled', 'completed'].includes(last?.status);
      if (final || Date.now() > end) {
        const why = last
          ? `status ${last.status}${last.statusReason ? ` (${last.statusReason})` : ''}; delivery ${JSON.stringify(last.delivery)}; history ${JSON.stringify(last.history)}`
          : error;
        throw new Error(`referral ${id} did not become ${status}${final ? '' : ` within ${waitMs} ms`}: ${why}`);
      }
      await new Promise((r) => setTimeout(r, opts.poll ? 1000 : 250));
    }
  }

  async function sent(tag: string, edit: (b: Record<string, any>) => void = () => undefined): Promise<{ id: string; v: any; body: Record<string, any> }> {
    const body = referral(tag);
    edit(body);
    const id = await submit(gw, body);
    const v = await until(gw, id, 'sent');
    return { id, v, body };
  }

  beforeAll(async () => {
    // The gateway's FHIR client reads secrets (FHIR_TOKEN, FHIR_CLIENT_SECRET...) from process.env.
    Object.assign(process.env, s.fhirEnv);
    gw = await startGateway(gatewayEnv());
    centre = new Centre(gw.destinations.get('default') as Destination);
    note(`run ${RUN_ID}: gateway ${gw.url} -> ${s.baseUrl} (profile ${s.profile}, auth ${s.auth})`);
  });
  afterAll(async () => {
    if (sharedAtCentre.size) note(`left in place (shared by every referral, reused by the next run): ${[...sharedAtCentre].join(' ')}`);
    await gw?.stop();
  });

  beforeEach(() => {
    // "the referral loop against … a. submit → sent; …" -> "a"
    const name = /(?:^|\s)([a-z]\d?)\.\s/.exec(expect.getState().currentTestName ?? '')?.[1] ?? '?';
    current = { name, referrals: [], created: [] };
  });
  afterEach(async () => {
    if (!centre) return;
    const refs = new Set<string>(current.created);
    const shared = new Set<string>();
    for (const r of current.referrals) {
      const held = await centre.heldFor(r.id, r.recorded).catch(() => ({ own: r.recorded, shared: [] as string[] }));
      held.own.forEach((x) => refs.add(x));
      held.shared.forEach((x) => shared.add(x));
    }
    if (s.keep) {
      note(`${current.name}: kept at the centre (LIVE_KEEP): ${[...refs].join(' ') || 'nothing'}`);
      return;
    }
    const left = await centre.remove([...refs]);
    note(`${current.name}: deleted ${refs.size - left.length} of ${refs.size} resources at the centre${left.length ? `; left: ${left.join(' ')}` : ''}`);
    shared.forEach((x) => sharedAtCentre.add(x));
  });

  test('a. submit → sent; the centre holds the Task, ServiceRequest, Patient and the DocumentReferences with their content', async () => {
    const { id, v, body } = await sent('a');
    expect(v.fhir.task).toMatch(/^Task\/.+/);
    expect(v.fhir.serviceRequest).toMatch(/^ServiceRequest\/.+/);

    // The centre finds the Task by the gateway's referral identifier.
    const tasks = await centre.byReferralId<Task>('Task', id);
    expect(tasks.map((t) => `Task/${t.id}`)).toEqual([v.fhir.task]);
    const task = tasks[0];
    expect(task.status).toBe('requested');
    expect(task.identifier).toContainEqual(expect.objectContaining({ system: REFERRAL_IDENTIFIER_SYSTEM, value: id }));
    // focus and basedOn resolve to the ServiceRequest the gateway recorded.
    expect(relativeRef(task.focus?.reference)).toBe(v.fhir.serviceRequest);
    expect(task.basedOn?.map((r) => relativeRef(r.reference))).toEqual([v.fhir.serviceRequest]);
    const sr = await centre.read<ServiceRequest>(String(relativeRef(task.focus?.reference)));
    expect(sr.status).toBe('active');
    expect(sr.intent).toBe('order');
    expect(sr.identifier).toContainEqual(expect.objectContaining({ system: REFERRAL_IDENTIFIER_SYSTEM, value: id }));
    const srs = await centre.byReferralId<ServiceRequest>('ServiceRequest', id);
    expect(srs.map((r) => `ServiceRequest/${r.id}`)).toEqual([v.fhir.serviceRequest]);
    expect(relativeRef(task.for?.reference)).toBe(relativeRef(sr.subject?.reference));

    const patient = await centre.read<Patient>(String(sr.subject?.reference));
    expect(patient.identifier?.map((i) => i.value)).toContain(body.patient.identifiers[0].value);
    expect(patient.birthDate).toBe(body.patient.birthDate);

    // One DocumentReference per document, each with the content that was submitted.
    expect(v.fhir.documents).toHaveLength(body.documents.length);
    for (const ref of v.fhir.documents as string[]) {
      const doc = await centre.read<DocumentReference>(ref);
      const n = Number(
        doc.identifier
          ?.find((i) => i.system === DOCUMENT_IDENTIFIER_SYSTEM)
          ?.value?.split('/')
          .pop()
      );
      const submitted = body.documents[n - 1];
      expect(submitted).toBeDefined();
      expect(relativeRef(doc.subject?.reference)).toBe(relativeRef(sr.subject?.reference));
      expect(doc.context?.related?.map((r) => relativeRef(r.reference))).toContain(v.fhir.serviceRequest);
      const att = doc.content[0].attachment;
      expect(att.contentType).toBe(submitted.contentType);
      if (submitted.data) {
        expect(sha256(await centre.attachmentBytes(att))).toBe(sha256(Buffer.from(submitted.data, 'base64')));
      } else {
        expect(att.url).toBe(submitted.url);
      }
    }
  });

  test('b. the centre accepts (Task.status accepted) → poll → accepted', async () => {
    const { id, v } = await sent('b');
    const task = await centre.read<Task>(v.fhir.task);
    await centre.update<Task>({ ...task, status: 'accepted', businessStatus: { text: 'Booked for the breast tumour board' } });
    const after = await until(gw, id, 'accepted', { poll: true });
    expect(after.statusReason).toBe('Booked for the breast tumour board');
    expect(after.history.map((h: any) => h.status)).toEqual(['queued', 'sent', 'accepted']);
  });

  async function completeWith(
    tag: string,
    report: (sr: ServiceRequest, pdf: Buffer) => Promise<DocumentReference['content'][number]['attachment']>
  ): Promise<void> {
    const { id, v } = await sent(tag);
    const task = await centre.read<Task>(v.fhir.task);
    const sr = await centre.read<ServiceRequest>(v.fhir.serviceRequest);
    const pdf = smallPdf(`Second opinion ${RUN_ID}-${tag}: agree with neoadjuvant chemotherapy.`);
    const doc = await centre.create<DocumentReference>({
      resourceType: 'DocumentReference',
      status: 'current',
      docStatus: 'final',
      type: { coding: [{ system: 'http://loinc.org', code: '11488-4', display: 'Consult note' }] },
      category: [{ coding: [{ system: 'http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category', code: 'clinical-note' }] }],
      subject: { reference: String(sr.subject?.reference) },
      context: { related: [{ reference: v.fhir.serviceRequest }] },
      content: [{ attachment: await report(sr, pdf) }],
    });
    current.created.push(`DocumentReference/${doc.id}`);
    await centre.update<Task>({
      ...task,
      status: 'completed',
      businessStatus: { text: 'Opinion sent' },
      output: [{ type: { text: 'Opinion report' }, valueReference: { reference: `DocumentReference/${doc.id}`, display: 'Second opinion report' } }],
    });
    const done = await until(gw, id, 'completed', { poll: true });
    expect(done.report).toMatchObject({ reference: `DocumentReference/${doc.id}`, contentType: 'application/pdf', url: `/referrals/${id}/report/content` });
    const content = await api(gw, done.report.url);
    if (content.status !== 200) throw new Error(`GET ${done.report.url} answered ${content.status}: ${JSON.stringify(content.body).slice(0, 500)}`);
    expect(content.res.headers.get('content-type')).toMatch(/^application\/pdf/);
    const got = content.body as Buffer;
    expect(got.length).toBe(pdf.length);
    expect(sha256(got)).toBe(sha256(pdf));
  }

  test('c. the centre completes with a report (LOINC 11488-4, a small PDF inline, in Task.output) → completed; the report content is the same bytes', async () => {
    await completeWith('c', async (_sr, pdf) => ({ contentType: 'application/pdf', title: 'Second opinion', data: pdf.toString('base64') }));
  });

  test('c2. the same with the report PDF in a Binary on the centre (attachment.url Binary/<id>)', async () => {
    await completeWith('c2', async (_sr, pdf) => {
      const binary = await centre.createBinary('application/pdf', pdf);
      current.created.push(`Binary/${binary.id}`);
      return { contentType: 'application/pdf', title: 'Second opinion', url: `Binary/${binary.id}` };
    });
  });

  test('d. cancel before acceptance → Task cancelled, ServiceRequest revoked, referral cancelled', async () => {
    const { id, v } = await sent('d');
    const r = await api(gw, `/referrals/${id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'Patient chose another centre' }) });
    expect(r.status).toBe(202);
    const after = await until(gw, id, 'cancelled');
    expect(after.statusReason).toBe('Patient chose another centre');
    const task = await centre.read<Task>(v.fhir.task);
    expect(task.status).toBe('cancelled');
    expect(task.statusReason?.text).toBe('Patient chose another centre');
    expect((await centre.read<ServiceRequest>(v.fhir.serviceRequest)).status).toBe('revoked');
  });

  test('e. an 8 MB PDF → sent; its DocumentReference at the centre resolves to exactly those bytes', async () => {
    const pdf = largePdf();
    const { v } = await sent('e', (b) => {
      b.documents.push({ kind: 'pathology-report', title: 'Whole-slide pathology report', contentType: 'application/pdf', data: pdf.toString('base64') });
    });
    expect(v.fhir.documents).toHaveLength(3);
    const docs = await Promise.all((v.fhir.documents as string[]).map((ref) => centre.read<DocumentReference>(ref)));
    const doc = docs.find((d) => d.identifier?.some((i) => i.system === DOCUMENT_IDENTIFIER_SYSTEM && /\/document\/3$/.test(i.value ?? '')));
    expect(doc).toBeDefined();
    const att = doc!.content[0].attachment;
    note(`e: the 8 MB document arrived as ${att.data !== undefined ? 'inline data' : `url ${String(att.url).replace(/\?.*$/, '?…')}`}`);
    expect(att.contentType).toBe('application/pdf');
    expect(att.size).toBe(pdf.length);
    expect(att.hash).toBe(createHash('sha1').update(pdf).digest('base64'));
    const got = await centre.attachmentBytes(att);
    expect(got.length).toBe(pdf.length);
    expect(sha256(got)).toBe(sha256(pdf));
  });

  test('f. resend after a lost answer: still sent, exactly one Task and one ServiceRequest at the centre', async () => {
    const proxy = await startDropProxy(s.baseUrl);
    const lossy = await startGateway(gatewayEnv(proxy.base));
    try {
      const id = await submit(lossy, referral('f'));
      const v = await until(lossy, id, 'sent');
      // The first transaction's answer was lost; the gateway tried again (with `resolve-first` the second
      // attempt may find everything already there and send no second transaction).
      expect(proxy.dropped()).toBe(1);
      expect(v.delivery.attempts).toBeGreaterThanOrEqual(2);
      note(`f: ${v.delivery.attempts} delivery attempts, ${proxy.transactions()} transactions through the proxy, the first answer dropped`);
      const tasks = await centre.byReferralId<Task>('Task', id);
      const srs = await centre.byReferralId<ServiceRequest>('ServiceRequest', id);
      expect(tasks.map((t) => `Task/${t.id}`)).toEqual([v.fhir.task]);
      expect(srs.map((r) => `ServiceRequest/${r.id}`)).toEqual([v.fhir.serviceRequest]);
      expect(relativeRef(tasks[0].focus?.reference)).toBe(v.fhir.serviceRequest);
    } finally {
      await lossy.stop();
      await proxy.close();
    }
  });
});

if (!settings) {
  test('skipped: LIVE_FHIR_BASE_URL is not set', () => undefined);
}
