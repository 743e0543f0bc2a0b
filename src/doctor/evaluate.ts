// Judges the probes' Facts against a destination's EFFECTIVE settings (destinationSettings): a server
// trait is only a failure when the configured settings would break on it. Also computes the settings
// that would make every line pass.
import { type Destination, type DestinationSettings, destinationSettings } from '../config';
import { formatBytes, is2xx } from './http';
import { type Facts, type NotRun, STRICT_ISOLATION_ENTRIES, ran } from './probes';
import type { DoctorCheck, DoctorStatus } from './types';

/** The destination settings a profile fills in, as a destination file would give them. */
export type SettingsInput = Partial<Pick<Destination, keyof DestinationSettings>>;

export const SETTINGS_KEYS: Array<keyof DestinationSettings> = [
  'profile',
  'binaryMode',
  'clientIds',
  'maxJsonBytes',
  'preferMinimal',
  'transactionMode',
  'verifyDelivery',
  'presignedUrls',
  'attachmentOrigins',
];

/** A line plus, for settings-dependent problems, the settings that fix it. */
export interface Line extends DoctorCheck {
  fix?: SettingsInput;
}

const MEDPLUM = ' (or profile medplum)';

export function explicitSettings(dest: Destination): SettingsInput {
  const out: Record<string, unknown> = {};
  for (const k of SETTINGS_KEYS) {
    if (dest[k] !== undefined) out[k] = dest[k];
  }
  return out as SettingsInput;
}

function line(id: string, label: string, status: DoctorStatus, detail: string, advice?: string, fix?: SettingsInput): Line {
  const l: Line = { id, label, status, detail };
  if (advice) l.advice = advice;
  if (fix) l.fix = fix;
  return l;
}

function notRunLine(id: string, label: string, f: NotRun | undefined): Line {
  if (!f) return line(id, label, 'skip', 'not run');
  return line(
    id,
    label,
    f.error ? 'warn' : 'skip',
    f.notRun,
    f.error ? 'run the doctor again; if it persists, check the server logs for this request' : undefined
  );
}

function seconds(ms: number): string {
  return `${Math.round(Math.abs(ms) / 1000)} s`;
}

/** Every line that follows from the probes, for the destination with `input` as its settings. */
export function evaluate(facts: Facts, dest: Destination, input: SettingsInput = explicitSettings(dest)): Line[] {
  const s = destinationSettings(input);
  const lines: Line[] = [];
  const add = (l: Line): void => {
    lines.push(l);
  };
  const host = new URL(facts.baseUrl).host;

  // reachable
  if (facts.unreachable) {
    add(
      line(
        'reachable',
        'Server reachable',
        'fail',
        `GET metadata got no answer: ${facts.unreachable.message}`,
        facts.unreachable.tlsCode
          ? 'see the TLS line'
          : `check baseUrl (${facts.baseUrl}), DNS, firewall and that the server is running; timeoutMs is ${dest.timeoutMs} ms`
      )
    );
  } else if (ran(facts.metadata)) {
    add(line('reachable', 'Server reachable', 'ok', `GET metadata answered HTTP ${facts.metadata.status} in ${Math.round(facts.metadata.durationMs)} ms`));
  } else {
    add(notRunLine('reachable', 'Server reachable', facts.metadata));
  }

  // TLS
  if (facts.unreachable?.tlsCode) {
    add(
      line(
        'tls',
        'TLS',
        'fail',
        `certificate of ${host} not accepted (${facts.unreachable.tlsCode})`,
        'the centre must serve a certificate from a trusted CA for this host name, or start the gateway with NODE_EXTRA_CA_CERTS=<the centre CA file>'
      )
    );
  } else if (facts.https) {
    add(
      line(
        'tls',
        'TLS',
        facts.unreachable ? 'skip' : 'ok',
        facts.unreachable ? 'not checked: no answer' : `https; the certificate of ${host} is valid and trusted`
      )
    );
  } else if (facts.loopback) {
    add(line('tls', 'TLS', 'ok', `plain http to a loopback address (${host}): development only`));
  } else {
    add(line('tls', 'TLS', 'warn', `plain http to ${host}: referrals would cross the network unencrypted`, "use the centre's https base URL"));
  }

  // auth
  add(authLine(facts, dest));

  // metadata, FHIR version, clock
  const md = facts.metadata;
  if (!ran(md)) {
    add(notRunLine('metadata', 'CapabilityStatement', md));
    add(notRunLine('fhir-version', 'FHIR version', md));
  } else {
    if (md.isCapabilityStatement) {
      const parts = [`CapabilityStatement${md.software ? ` from ${md.software}` : ''}`];
      if (md.withAuth) parts.push('(only with credentials)');
      if (md.declaresTransaction === false) parts.push('; does not declare the transaction interaction');
      add(line('metadata', 'CapabilityStatement', 'ok', parts.join(' ')));
    } else if (md.status === 401 || md.status === 403) {
      add(
        line(
          'metadata',
          'CapabilityStatement',
          'warn',
          `GET metadata answered HTTP ${md.status}: it needs credentials`,
          'FHIR servers should answer metadata; the gateway does not need it'
        )
      );
    } else {
      add(
        line(
          'metadata',
          'CapabilityStatement',
          'fail',
          `GET metadata answered HTTP ${md.status} without a CapabilityStatement`,
          `check baseUrl: it must be the FHIR R4 base (e.g. https://host/fhir/R4), not ${facts.baseUrl}`
        )
      );
    }
    if (!md.isCapabilityStatement) {
      add(line('fhir-version', 'FHIR version', 'skip', 'not checked: no CapabilityStatement'));
    } else if (md.fhirVersion && /^4\.0(\.\d+)?$/.test(md.fhirVersion)) {
      add(line('fhir-version', 'FHIR version', 'ok', `${md.fhirVersion} (R4)`));
    } else if (!md.fhirVersion) {
      add(line('fhir-version', 'FHIR version', 'warn', 'the CapabilityStatement names no fhirVersion', 'the gateway needs FHIR 4.0.x (R4)'));
    } else {
      add(
        line(
          'fhir-version',
          'FHIR version',
          'fail',
          `the server speaks FHIR ${md.fhirVersion}; the gateway needs 4.0.x (R4)`,
          "use the centre's R4 endpoint as baseUrl"
        )
      );
    }
  }
  const clock = facts.clock;
  if (!ran(clock)) {
    add(notRunLine('clock', 'Clock skew', clock));
  } else if ('noDate' in clock) {
    add(line('clock', 'Clock skew', 'warn', 'the server sent no Date header: skew unknown'));
  } else {
    const skew = clock.skewMs;
    const dir = skew > 0 ? 'ahead of' : 'behind';
    if (Math.abs(skew) <= 60_000) {
      add(line('clock', 'Clock skew', 'ok', `server clock within ${Math.abs(skew) < 1000 ? '1 s' : seconds(skew)} of ours (Date header)`));
    } else {
      const advice = 'synchronise both clocks (NTP): polling windows (60 s overlap) and token lifetimes depend on them';
      add(line('clock', 'Clock skew', Math.abs(skew) > 300_000 ? 'fail' : 'warn', `server clock ${seconds(skew)} ${dir} ours (Date header)`, advice));
    }
  }

  // transaction with urn:uuid references
  const tx = facts.transaction;
  if (!ran(tx)) {
    add(notRunLine('transaction', 'Transaction (urn:uuid refs)', tx));
  } else if (!is2xx(tx.status)) {
    add(
      line(
        'transaction',
        'Transaction (urn:uuid refs)',
        'fail',
        `a 2-entry transaction (Patient, Task) was refused: ${tx.answer}`,
        'the centre must enable FHIR transactions (POST of a transaction Bundle to the base)'
      )
    );
  } else if (!tx.isResponseBundle) {
    add(
      line(
        'transaction',
        'Transaction (urn:uuid refs)',
        'fail',
        `${tx.answer} without a transaction-response Bundle`,
        'the server must answer transactions with a transaction-response Bundle'
      )
    );
  } else if (tx.entryStatuses.some((st) => !is2xx(st))) {
    add(
      line(
        'transaction',
        'Transaction (urn:uuid refs)',
        'fail',
        `${tx.answer}, but entries answered ${tx.entryStatuses.join(', ')}: plain creates failed inside a 200`,
        'the centre must allow the gateway to create Patient and Task'
      )
    );
  } else if (tx.referencesResolved === false) {
    add(
      line(
        'transaction',
        'Transaction (urn:uuid refs)',
        'fail',
        'Task.for still names the urn:uuid placeholder after the transaction',
        'the server must resolve urn:uuid references inside transactions'
      )
    );
  } else {
    add(
      line(
        'transaction',
        'Transaction (urn:uuid refs)',
        'ok',
        `${tx.answer}; entries ${tx.entryStatuses.join(', ')}${tx.referencesResolved ? '; the urn:uuid reference resolved to Patient/<id>' : ''}`
      )
    );
  }

  // atomicity
  const at = facts.atomicity;
  const label = 'Transaction atomicity';
  if (!ran(at)) {
    add(notRunLine('atomicity', label, at));
  } else if (at.kind === 'atomic') {
    add(line('atomicity', label, 'ok', `an entry with a stale If-Match failed the whole transaction (${at.answer}); nothing was kept`));
  } else if (at.kind === 'not-provoked') {
    add(line('atomicity', label, 'warn', `an entry with a stale If-Match was accepted (${at.answer}): atomicity not tested`));
  } else {
    const what =
      at.kind === 'non-atomic'
        ? `a failed entry inside a 200 (${at.answer}); the other entries were kept: not atomic`
        : `the transaction failed (${at.answer}) but its other entry was written: not atomic`;
    if (s.transactionMode === 'resolve-first') {
      if (s.verifyDelivery) add(line('atomicity', label, 'ok', `${what}; transactionMode resolve-first reuses what was written, verifyDelivery repairs`));
      else add(line('atomicity', label, 'warn', `${what}; verifyDelivery is off`, 'set verifyDelivery true', { verifyDelivery: true }));
    } else {
      add(
        line('atomicity', label, 'fail', what, `set transactionMode resolve-first${MEDPLUM}`, {
          transactionMode: 'resolve-first',
          ...(s.verifyDelivery ? {} : { verifyDelivery: true }),
        })
      );
    }
  }

  // Prefer: return=minimal
  const mn = facts.minimal;
  const pm = 'Prefer: return=minimal';
  if (!ran(mn)) {
    add(notRunLine('prefer-minimal', pm, mn));
  } else if (!is2xx(mn.status)) {
    if (s.preferMinimal) {
      add(
        line('prefer-minimal', pm, 'fail', `a transaction with Prefer: return=minimal was refused (${mn.answer})`, `set preferMinimal false${MEDPLUM}`, {
          preferMinimal: false,
        })
      );
    } else add(line('prefer-minimal', pm, 'ok', `refused (${mn.answer}); preferMinimal is off`));
  } else if (mn.body === 'empty') {
    if (s.preferMinimal) {
      add(
        line('prefer-minimal', pm, 'fail', `answered ${mn.answer} with an EMPTY body (no transaction-response)`, `set preferMinimal false${MEDPLUM}`, {
          preferMinimal: false,
        })
      );
    } else add(line('prefer-minimal', pm, 'ok', 'server answers minimal with an empty body; preferMinimal is off'));
  } else if (mn.body === 'bundle') {
    add(
      line(
        'prefer-minimal',
        pm,
        'ok',
        `answered ${mn.answer} with a transaction-response (status and location per entry)${s.preferMinimal ? '' : '; preferMinimal is off (it could be on)'}`
      )
    );
  } else {
    if (s.preferMinimal) {
      add(line('prefer-minimal', pm, 'warn', `answered ${mn.answer} with something other than a Bundle`, 'set preferMinimal false', { preferMinimal: false }));
    } else add(line('prefer-minimal', pm, 'ok', `answered ${mn.answer} with something other than a Bundle; preferMinimal is off`));
  }

  // conditional create
  const cc = facts.conditional;
  const ccl = 'Conditional create (ifNoneExist)';
  const conditional = s.transactionMode === 'conditional';
  if (!ran(cc)) {
    add(notRunLine('conditional-create', ccl, cc));
  } else if (!cc.firstOk) {
    if (conditional) {
      add(
        line(
          'conditional-create',
          ccl,
          'fail',
          `a one-entry conditional transaction was refused (${cc.firstAnswer})`,
          `set transactionMode resolve-first${MEDPLUM}`,
          { transactionMode: 'resolve-first' }
        )
      );
    } else add(line('conditional-create', ccl, 'ok', `a conditional transaction was refused (${cc.firstAnswer}); transactionMode resolve-first sends none`));
  } else if (cc.matches === 0) {
    add(
      line(
        'conditional-create',
        ccl,
        'warn',
        'the created Patient was not found by an identifier search',
        'the gateway finds its resources by identifier: the centre must support identifier search'
      )
    );
  } else if (cc.matches > 1) {
    const what = `the resend created a duplicate (${cc.matches} Patients with one identifier)`;
    if (conditional) add(line('conditional-create', ccl, 'fail', what, `set transactionMode resolve-first${MEDPLUM}`, { transactionMode: 'resolve-first' }));
    else add(line('conditional-create', ccl, 'ok', `${what}; transactionMode resolve-first does not rely on ifNoneExist`));
  } else if (!cc.secondOk) {
    add(line('conditional-create', ccl, 'warn', `the resend was refused (${cc.secondAnswer}); no duplicate was made`));
  } else {
    add(line('conditional-create', ccl, 'ok', `the resend matched the existing Patient (${cc.secondAnswer}); no duplicate`));
  }

  // strict isolation
  const si = facts.strictIsolation;
  const sil = `Conditional transaction of ${STRICT_ISOLATION_ENTRIES}`;
  if (!ran(si)) {
    add(notRunLine('strict-isolation', sil, si));
  } else if (si.refused) {
    const what = `a conditional transaction of ${si.entries} entries was refused (${si.answer}): the server limits conditional transactions (strict isolation)`;
    if (conditional) add(line('strict-isolation', sil, 'fail', what, `set transactionMode resolve-first${MEDPLUM}`, { transactionMode: 'resolve-first' }));
    else add(line('strict-isolation', sil, 'ok', `${what}; transactionMode resolve-first sends no conditional entries`));
  } else {
    add(line('strict-isolation', sil, 'ok', `a conditional transaction of ${si.entries} entries was accepted (${si.answer})`));
  }

  // concurrency
  const cu = facts.concurrency;
  const cul = 'Concurrent transactions';
  if (!ran(cu)) {
    add(notRunLine('concurrency', cul, cu));
  } else if (cu.conflict) {
    const what = `one of two simultaneous transactions got 409 Conflict (${cu.answers.join('; ')}): parallel deliveries to this centre can fail and be retried`;
    if (s.verifyDelivery) add(line('concurrency', cul, 'warn', what, 'keep verifyDelivery on (it is); lower DELIVERY_CONCURRENCY if conflicts are frequent'));
    else add(line('concurrency', cul, 'fail', `${what}; verifyDelivery is off`, 'set verifyDelivery true', { verifyDelivery: true }));
  } else {
    add(line('concurrency', cul, 'ok', `two simultaneous transactions both succeeded (${cu.answers.join('; ')})`));
  }

  // _lastUpdated search
  const lu = facts.lastUpdated;
  const lul = '_lastUpdated search + _sort';
  if (!ran(lu)) {
    add(notRunLine('search-lastupdated', lul, lu));
  } else if (lu.withSort === 401 || lu.withSort === 403) {
    add(line('search-lastupdated', lul, 'skip', `not checked: HTTP ${lu.withSort}`));
  } else if (is2xx(lu.withSort)) {
    add(line('search-lastupdated', lul, 'ok', `Task?_lastUpdated=gt…&_sort=_lastUpdated answered HTTP ${lu.withSort}`));
  } else {
    const fallback = 'nothing to set: the poller falls back to reading open Tasks by id (more requests per cycle)';
    if (lu.withoutSort !== undefined && is2xx(lu.withoutSort)) {
      add(
        line(
          'search-lastupdated',
          lul,
          'warn',
          `_sort=_lastUpdated refused (HTTP ${lu.withSort}); _lastUpdated alone answered HTTP ${lu.withoutSort}`,
          fallback
        )
      );
    } else {
      add(
        line(
          'search-lastupdated',
          lul,
          'warn',
          `_lastUpdated search refused (HTTP ${lu.withSort}${lu.withoutSort !== undefined ? `, without _sort HTTP ${lu.withoutSort}` : ''})`,
          fallback
        )
      );
    }
  }

  // _tag search on Binary
  const bt = facts.binaryTagSearch;
  const btl = '_tag search on Binary';
  if (!ran(bt)) {
    add(notRunLine('binary-tag-search', btl, bt));
  } else if (is2xx(bt.status)) {
    add(line('binary-tag-search', btl, 'ok', `Binary?_tag=… answered ${bt.answer}`));
  } else if (s.binaryMode === 'conditional-create') {
    add(
      line('binary-tag-search', btl, 'fail', `Binary?_tag=… refused (${bt.answer}): binaryMode conditional-create needs it`, `set binaryMode raw${MEDPLUM}`, {
        binaryMode: 'raw',
      })
    );
  } else {
    add(line('binary-tag-search', btl, 'ok', `Binary?_tag=… refused (${bt.answer}); binaryMode ${s.binaryMode} does not search Binary`));
  }

  // client-assigned ids
  const rawWorks = ran(facts.rawBinary) && facts.rawBinary.tried.length > 0 && facts.rawBinary.tried[0].accepted;
  const noClientIds: SettingsInput = {
    clientIds: false,
    binaryMode: rawWorks || !ran(facts.binaryTagSearch) || !is2xx(facts.binaryTagSearch.status) ? 'raw' : 'conditional-create',
  };
  const usesClientIds = s.binaryMode === 'put' || (s.binaryMode === 'raw' && s.clientIds);
  const ua = facts.updateAsCreate;
  const ual = 'PUT creates (client ids)';
  const uaRefused = ran(ua) && !is2xx(ua.status);
  if (!ran(ua)) {
    add(notRunLine('update-as-create', ual, ua));
  } else if (is2xx(ua.status)) {
    add(line('update-as-create', ual, 'ok', `PUT Binary/<new uuid> created it (${ua.answer})`));
  } else if (usesClientIds) {
    add(
      line(
        'update-as-create',
        ual,
        'fail',
        `PUT Binary/<new uuid> was refused (${ua.answer}): the server does not create resources at client-assigned ids; binaryMode ${s.binaryMode}${s.binaryMode === 'raw' ? ' with clientIds' : ''} needs it`,
        `set clientIds false and binaryMode ${noClientIds.binaryMode}${MEDPLUM}`,
        noClientIds
      )
    );
  } else {
    add(
      line(
        'update-as-create',
        ual,
        'ok',
        `PUT Binary/<new uuid> refused (${ua.answer}); binaryMode ${s.binaryMode}${s.binaryMode === 'raw' ? ' with clientIds false' : ''} does not need it`
      )
    );
  }

  const cf = facts.clientIdForm;
  const cfl = 'Client id form rg-<uuid>';
  if (!ran(cf)) {
    add(notRunLine('client-id-form', cfl, cf));
  } else {
    const numeric = is2xx(cf.numeric.status) ? '' : `; purely numeric ids are refused (${cf.numeric.answer}): the gateway never uses them`;
    let relevant: { how: string; status: number; answer: string } | undefined;
    if (s.binaryMode === 'put') relevant = { how: 'FHIR JSON', ...cf.json };
    else if (s.binaryMode === 'raw' && s.clientIds) relevant = { how: 'raw', ...cf.raw };
    if (!relevant) {
      add(
        line(
          'client-id-form',
          cfl,
          'ok',
          `not used (binaryMode ${s.binaryMode}${s.binaryMode === 'raw' ? ', clientIds false' : ''}); PUT Binary/rg-<uuid> answered ${cf.json.answer} (JSON), ${cf.raw.answer} (raw)${numeric}`
        )
      );
    } else if (is2xx(relevant.status)) {
      add(line('client-id-form', cfl, 'ok', `PUT Binary/rg-<uuid> (${relevant.how}, the gateway's id form) accepted (${relevant.answer})${numeric}`));
    } else if (uaRefused && ran(ua) && relevant.status === ua.status) {
      add(line('client-id-form', cfl, 'ok', `PUT Binary/rg-<uuid> refused like any new id (${relevant.answer}): see "${ual}"${numeric}`));
    } else {
      add(
        line(
          'client-id-form',
          cfl,
          'fail',
          `PUT Binary/rg-<uuid> (${relevant.how}, the gateway's id form) refused (${relevant.answer}): the server only takes ids of another form${numeric}`,
          `set clientIds false and binaryMode ${noClientIds.binaryMode}${MEDPLUM}`,
          noClientIds
        )
      );
    }
  }

  // largest JSON body
  add(jsonLine(facts, dest, s));

  // raw Binary size
  const rb = facts.rawBinary;
  const rbl = 'Largest raw Binary';
  if (!ran(rb)) {
    add(notRunLine('raw-binary-size', rbl, rb));
  } else if (rb.tried.length === 0) {
    add(line('raw-binary-size', rbl, 'skip', 'no size tried'));
  } else if (!rb.tried[0].accepted) {
    const what = `a raw Binary upload (POST Binary, Content-Type ${rb.contentType}, ${formatBytes(rb.tried[0].size)}) was refused (${rb.tried[0].answer})`;
    if (s.binaryMode === 'raw') {
      const putOk = ran(ua) && is2xx(ua.status) && ran(cf) && is2xx(cf.json.status);
      const tagOk = ran(bt) && is2xx(bt.status);
      let fix: SettingsInput | undefined;
      if (putOk) fix = { binaryMode: 'put', clientIds: true };
      else if (tagOk) fix = { binaryMode: 'conditional-create' };
      add(
        line(
          'raw-binary-size',
          rbl,
          'fail',
          `${what}: binaryMode raw needs it`,
          fix ? `set binaryMode ${fix.binaryMode}` : 'the centre must accept raw Binary uploads (the document bytes with their own Content-Type)',
          fix
        )
      );
    } else if (s.maxJsonBytes !== undefined) {
      add(
        line(
          'raw-binary-size',
          rbl,
          'warn',
          `${what}: documents that do not fit maxJsonBytes cannot be uploaded raw`,
          'the centre should accept raw Binary uploads'
        )
      );
    } else {
      add(line('raw-binary-size', rbl, 'ok', `${what}; binaryMode ${s.binaryMode} does not use raw uploads`));
    }
  } else if (rb.smallestRefused === undefined) {
    add(line('raw-binary-size', rbl, 'ok', `accepted raw Binary uploads up to ${formatBytes(rb.largestAccepted ?? 0)} (the largest tried)`));
  } else {
    const refused = rb.tried.find((t) => !t.accepted);
    add(
      line(
        'raw-binary-size',
        rbl,
        'warn',
        `accepted ${formatBytes(rb.largestAccepted ?? 0)}, refused ${formatBytes(rb.smallestRefused)} (${refused?.answer ?? ''}): larger documents cannot be delivered`,
        'ask the centre to raise its upload limit if documents can be larger'
      )
    );
  }

  // raw Binary read back
  const rd = facts.readBack;
  const rdl = 'Raw Binary read back';
  if (!ran(rd)) {
    add(notRunLine('raw-binary', rdl, rd));
  } else {
    const anyDesc = readBackDesc(rd.anyAccept, `raw ${rd.anyAccept.contentType}`);
    const jsonDesc = readBackDesc(rd.jsonAccept, 'raw bytes');
    const how = `GET Binary/<id>: Accept */* → ${anyDesc}${rd.anyAccept.identical ? ' (identical)' : ' (differs)'}; Accept application/fhir+json → ${jsonDesc}${rd.jsonAccept.identical ? ' (identical)' : ' (differs)'}`;
    if (rd.anyAccept.identical || rd.jsonAccept.identical) add(line('raw-binary', rdl, 'ok', `bytes identical; ${how}`));
    else {
      add(
        line(
          'raw-binary',
          rdl,
          'fail',
          `the uploaded bytes did not come back; ${how}`,
          'the centre must return a Binary as uploaded (raw for Accept */*, or base64 data in JSON)'
        )
      );
    }
  }

  // attachment URLs
  add(attachmentLine(facts, s));

  // If-Match
  const im = facts.ifMatch;
  const iml = 'If-Match updates';
  if (!ran(im)) {
    add(notRunLine('if-match', iml, im));
  } else if (im.staleStatus === 412) {
    add(line('if-match', iml, 'ok', 'a stale If-Match was refused with 412 Precondition Failed'));
  } else if (im.staleStatus === 409) {
    add(line('if-match', iml, 'ok', 'a stale If-Match was refused with 409 Conflict (as HAPI does); the gateway treats 409 and 412 alike'));
  } else if (is2xx(im.staleStatus)) {
    add(
      line(
        'if-match',
        iml,
        'warn',
        `a stale If-Match was accepted (${im.answer}): the server ignores versions, so an update could overwrite a change made at the centre`,
        'ask the centre to enforce If-Match on updates'
      )
    );
  } else {
    add(line('if-match', iml, 'warn', `a stale If-Match answered ${im.answer} (expected 412 or 409)`));
  }

  // Task
  const tk = facts.task;
  const tkl = 'Task read/update';
  if (!ran(tk)) {
    const noTask = tk?.notRun === 'not run: no Task could be created' && ran(facts.transaction);
    add(
      noTask
        ? line(
            'task',
            tkl,
            'fail',
            'no Task could be created (transaction and POST Task failed)',
            'the centre must allow the gateway to create, read and update Task'
          )
        : notRunLine('task', tkl, tk)
    );
  } else if (!is2xx(tk.readStatus)) {
    add(line('task', tkl, 'fail', `reading the created Task was refused (${tk.readAnswer})`, 'the centre must allow the gateway to read and update its Tasks'));
  } else if (tk.updateStatus === undefined || !is2xx(tk.updateStatus)) {
    add(
      line(
        'task',
        tkl,
        'fail',
        `updating the Task was refused (${tk.updateAnswer ?? 'not sent'})`,
        'the centre must allow the gateway to update its Tasks (cancel)'
      )
    );
  } else {
    add(
      line(
        'task',
        tkl,
        'ok',
        `created, read and updated a Task (status → cancelled${tk.versionId ? ', with If-Match' : ', no version to match'}; ${tk.updateAnswer})`
      )
    );
  }

  // paging
  add(pagingLine(facts, dest));

  return lines;
}

function authLine(facts: Facts, dest: Destination): Line {
  const l = 'Authentication';
  const type = dest.auth.type;
  if (facts.unreachable) return line('auth', l, 'skip', 'not checked: no answer');
  const tk = facts.token;
  if (ran(tk) && !tk.ok) {
    return line(
      'auth',
      l,
      'fail',
      `token request failed: ${tk.message}`,
      'check tokenUrl and the client id / secret or key registered at the centre (the variables named in auth)'
    );
  }
  const st = facts.authStatus;
  if (st === 401 || st === 403) {
    return type === 'none'
      ? line(
          'auth',
          l,
          'fail',
          `the server wants credentials (HTTP ${st}); auth is none`,
          'configure auth (basic, bearer, client-credentials or smart-backend) as the centre requires'
        )
      : line(
          'auth',
          l,
          'fail',
          `the server refused the gateway's credentials (HTTP ${st})`,
          st === 403 ? 'ask the centre to grant the gateway access (scopes/roles for Patient, Task, DocumentReference, Binary)' : 'check the credentials'
        );
  }
  if (!ran(st)) return notRunLine('auth', l, st);
  if (ran(tk) && tk.ok) {
    const expires = tk.expiresInS !== undefined ? ` (expires in ${tk.expiresInS} s)` : '';
    const scopes = tk.scopes ? `granted scopes: ${tk.scopes.join(' ')}` : 'the token answer listed no scopes';
    const requested = tk.requested?.split(/\s+/).filter(Boolean) ?? [];
    const missing = tk.scopes ? requested.filter((r) => !tk.scopes?.includes(r)) : [];
    if (missing.length > 0) {
      return line('auth', l, 'warn', `token obtained${expires}; ${scopes}; not granted: ${missing.join(' ')}`, 'ask the centre to grant the missing scopes');
    }
    return line('auth', l, 'ok', `token obtained${expires}; ${scopes}; the server accepted it (HTTP ${st})`);
  }
  if (type === 'none') return line('auth', l, 'ok', `no authentication configured; the server answered without credentials (HTTP ${st})`);
  return line('auth', l, 'ok', `${type} credentials accepted (HTTP ${st})`);
}

function jsonLine(facts: Facts, dest: Destination, s: DestinationSettings): Line {
  const id = 'json-body';
  const l = 'Largest JSON body';
  const jb = facts.jsonBody;
  if (!ran(jb)) return notRunLine(id, l, jb);
  const m = s.maxJsonBytes;
  const A = jb.largestAccepted;
  const R = jb.smallestRefused;
  const refused = R !== undefined ? jb.tried.find((t) => t.size === R) : undefined;
  if (R === undefined) {
    return line(id, l, 'ok', `accepted every JSON transaction tried, up to ${formatBytes(A ?? 0)}${m !== undefined ? `; maxJsonBytes ${m}` : ''}`);
  }
  const seen = `refused ${formatBytes(R)} (${refused?.answer ?? ''})${A !== undefined ? `, accepted ${formatBytes(A)}` : ''}`;
  if (A === undefined) {
    return line(
      id,
      l,
      'fail',
      `even the smallest JSON transaction tried was refused: ${seen}`,
      'the centre must accept JSON transactions of a few hundred KiB'
    );
  }
  const advise = (value: number): string => `set maxJsonBytes ${value}${MEDPLUM}`;
  if (m !== undefined) {
    if (m <= A) return line(id, l, 'ok', `${seen}; maxJsonBytes ${m} fits`);
    return line(id, l, 'fail', `${seen}; maxJsonBytes ${m} is more than the server takes`, advise(A), { maxJsonBytes: A });
  }
  const inlineJson = Math.ceil(dest.maxInlineBytes / 3) * 4 + 64 * 1024;
  if (s.binaryMode === 'raw' && R > inlineJson) {
    return line(
      id,
      l,
      'warn',
      `${seen}; maxJsonBytes is not set: one inline document (maxInlineBytes ${dest.maxInlineBytes}) fits, but a referral with several could exceed it`,
      advise(A),
      { maxJsonBytes: A }
    );
  }
  return line(
    id,
    l,
    'fail',
    `${seen}; maxJsonBytes is not set, so the gateway would send larger transactions (${s.binaryMode === 'raw' ? `inline documents up to maxInlineBytes ${dest.maxInlineBytes}` : `binaryMode ${s.binaryMode} puts documents inside the transaction`})`,
    `${advise(A)}: the gateway then uploads documents raw until the transaction fits`,
    { maxJsonBytes: A }
  );
}

/** What a read back of the Binary answered: `raw` when the bytes came raw, the FHIR JSON Binary, else the HTTP status. */
function readBackDesc(answer: { status: number; kind: 'raw' | 'json' | 'other' }, raw: string): string {
  switch (answer.kind) {
    case 'raw':
      return raw;
    case 'json':
      return 'FHIR JSON Binary';
    default:
      return `HTTP ${answer.status}`;
  }
}

/** What fetching the attachment URL without credentials gave. */
function attachmentFetchText(f: { status?: number; identical?: boolean; error?: string } | undefined): string {
  if (f?.error) return `fetching it without credentials failed: ${f.error}`;
  if (f?.status === undefined) return 'not fetched';
  let bytes = '';
  if (is2xx(f.status)) bytes = f.identical ? ', bytes identical' : ', bytes differ';
  return `fetched without credentials: HTTP ${f.status}${bytes}`;
}

function attachmentLine(facts: Facts, s: DestinationSettings): Line {
  const id = 'presigned-urls';
  const l = 'Attachment URLs';
  const a = facts.attachment;
  if (!ran(a)) return notRunLine(id, l, a);
  if (a.where === 'missing') return line(id, l, 'warn', `a DocumentReference pointing at Binary/<id> could not be created or read back (${a.created})`);
  if (a.where !== 'outside-base') {
    return line(id, l, 'ok', `attachment url read back as ${a.where === 'relative' ? 'Binary/<id> (relative)' : `${a.url} (under the base)`}: not rewritten`);
  }
  const base = new URL(facts.baseUrl);
  const origin = a.origin ?? '';
  const origins = new Set(s.attachmentOrigins.map((o) => new URL(o).origin));
  const allowed = origins.has(origin) || (s.presignedUrls && a.sameHost === true && (base.protocol === 'http:' || origin.startsWith('https:')));
  const f = a.fetch;
  const fetched = f?.status !== undefined && is2xx(f.status) && f.identical === true;
  const what = `attachment url read back rewritten to ${a.url} (outside the base, presigned)`;
  const fetchText = attachmentFetchText(f);
  if (!fetched) {
    return line(id, l, 'fail', `${what}; ${fetchText}`, "the centre's attachment URLs must be fetchable (the presigned URL without the FHIR credentials)");
  }
  if (allowed) {
    return line(id, l, 'ok', `${what}; ${fetchText}; allowed by ${origins.has(origin) ? 'attachmentOrigins' : 'presignedUrls'}`);
  }
  const fix: SettingsInput = a.sameHost ? { presignedUrls: true } : { attachmentOrigins: [...s.attachmentOrigins, origin] };
  return line(
    id,
    l,
    'fail',
    `${what}; ${fetchText}; but the gateway refuses URLs outside the base unless allowed`,
    a.sameHost ? `set presignedUrls true${MEDPLUM}` : `add "${origin}" to attachmentOrigins`,
    fix
  );
}

/** A next link's shape in the report; a link without a shape counts as outside the base. */
const LINK_SHAPES = { relative: 'relative', absolute: 'absolute under the base', 'outside-base': 'outside the base' } as const;

function pagingLine(facts: Facts, dest: Destination): Line {
  const id = 'paging';
  const l = 'Paging links';
  const p = facts.paging;
  if (!ran(p)) return notRunLine(id, l, p);
  if (!p.next) {
    if (p.follow && !is2xx(p.follow.status)) return line(id, l, 'warn', `the probe search answered ${p.follow.answer}`);
    if ((p.total ?? 0) < 2 && p.firstCount < 2) {
      if (p.total === undefined) {
        return line(id, l, 'warn', 'no next link with _count=1 (the search gave no total)', 'the poller follows Bundle.link next: the centre must send it');
      }
      return line(id, l, 'skip', `not checked: only ${p.total} probe Patient(s) to page over`);
    }
    return line(
      id,
      l,
      'warn',
      `no next link with _count=1 over ${p.total} Patients: the poller would read only the first page`,
      'the centre must send Bundle.link next'
    );
  }
  const shape = LINK_SHAPES[p.shape ?? 'outside-base'];
  const opaque = p.opaque ? ', opaque (a server-side search id, e.g. HAPI _getpages)' : '';
  if (p.shape === 'outside-base') {
    return line(
      id,
      l,
      'fail',
      `next link ${p.next} points outside the base (${dest.baseUrl}): the gateway does not follow it`,
      'set baseUrl to the base URL the server uses in its own links'
    );
  }
  if (!p.follow) return line(id, l, 'warn', `next link ${shape}${opaque}; not followed`);
  if (!is2xx(p.follow.status)) {
    return line(id, l, 'fail', `next link ${shape}${opaque}; following it answered ${p.follow.answer}`, 'the centre must serve its next links');
  }
  if (!p.follow.distinct) {
    return line(
      id,
      l,
      'warn',
      `next link ${shape}${opaque}; page 2 repeated page 1 (${p.follow.count} entries)`,
      'the poller could loop or miss Tasks: ask the centre about stable paging'
    );
  }
  return line(id, l, 'ok', `next link ${shape}${opaque}; page 2 held another Patient`);
}

/**
 * Settings (relative to what the destination sets) that make every settings-dependent line pass: either a
 * profile (plus what it does not cover) or individual settings, whichever is shorter.
 */
export function suggestSettings(facts: Facts, dest: Destination): Record<string, unknown> {
  const explicit = explicitSettings(dest);
  const fixable = (x: SettingsInput): Line[] =>
    evaluate(facts, dest, { ...explicit, ...x }).filter((l) => l.fix && (l.status === 'fail' || l.status === 'warn'));
  const complete = (start: SettingsInput): SettingsInput | undefined => {
    let x: SettingsInput = { ...start };
    for (let round = 0; round < 5; round++) {
      const open = fixable(x);
      if (open.length === 0) return x;
      for (const l of open) {
        const fix = l.fix ?? {};
        const origins = fix.attachmentOrigins
          ? [...new Set([...(x.attachmentOrigins ?? explicit.attachmentOrigins ?? []), ...fix.attachmentOrigins])]
          : undefined;
        x = { ...x, ...fix, ...(origins ? { attachmentOrigins: origins } : {}) };
      }
    }
    return fixable(x).length === 0 ? x : undefined;
  };
  const individual = complete({});
  if (individual && Object.keys(individual).length === 0) return {};
  const current = destinationSettings(explicit).profile;
  let best = individual;
  for (const profile of ['medplum', 'hapi', 'generic'] as const) {
    if (profile === current) continue;
    const c = complete({ profile });
    if (c && (!best || Object.keys(c).length < Object.keys(best).length)) best = c;
  }
  return (best ?? individual ?? {}) as Record<string, unknown>;
}
