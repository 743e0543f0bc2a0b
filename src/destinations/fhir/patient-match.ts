// Patient safety at the centre: before a referral's ServiceRequest is linked to a Patient the centre already
// holds (matched by the referral's identifier), that Patient's demographics are compared with the referral's.
// A different birth date, sex or family name means the identifier names someone else (another hospital's
// patient, a typing error, a reused number): the referral is held, or sent with a Patient of its own, as the
// destination's `patientMismatch` says. Never silently attached.
//
// No patient data leaves this module in a message: reasons, notes and log fields name the fields that
// differ, never their values, the identifier or the name.
import type { Bundle, BundleEntry, Identifier, Patient, Resource } from '@medplum/fhirtypes';
import { destinationSettings } from '../../config';
import type { Destination } from '../../config';
import { FhirRequestError, oldestFirst } from './client';
import type { FhirClient } from './client';
import { identifierQuery, GATEWAY_IDENTIFIER_BASE } from '../../mapping';
import { logger } from '../../observability';

/** A demographic field the check compares. */
export type DemographicField = 'birthDate' | 'gender' | 'family';

const FIELD_LABELS: Record<DemographicField, string> = { birthDate: 'birth date', gender: 'sex', family: 'family name' };
const FIELD_ORDER: DemographicField[] = ['birthDate', 'gender', 'family'];

/** The elements the check reads; asked for with `_elements` so the search does not bring the whole Patient. */
const PATIENT_ELEMENTS = 'identifier,name,gender,birthDate';
/** Patients read per search: more than one already means duplicates at the centre; each one is checked. */
const SEARCH_COUNT = '10';

// ------------------------------------------------------------------------------------------------
// The comparison (pure)

/**
 * The fields in which the centre's Patient contradicts the referral's. A value missing on either side is
 * never a difference (the centre may hold less than the referral, and the other way round). Rules:
 * - birth date: compared at the precision both have (`1970` at the centre agrees with `1970-01-01`;
 *   `1970-02` does not);
 * - sex (`gender`, administrative gender): equal codes; `unknown` on either side counts as missing;
 * - family name: the referral's family name equals one of the family names of ANY of the centre's names
 *   (official, maiden, old...), compared without regard to case, diacritics, spaces and punctuation
 *   (`Müller` = `MULLER`, `O'Brien` = `OBrien`, `Smith-Jones` = `Smith Jones`, `Straße` = `STRASSE`).
 *   Given names are not compared (nicknames, initials and order vary too much between systems).
 */
export function demographicDifferences(centre: Patient, referral: Patient): DemographicField[] {
  const out: DemographicField[] = [];
  if (birthDatesDiffer(centre.birthDate, referral.birthDate)) out.push('birthDate');
  const g1 = knownGender(centre.gender);
  const g2 = knownGender(referral.gender);
  if (g1 && g2 && g1 !== g2) out.push('gender');
  const theirs = familyNames(centre);
  const ours = familyNames(referral);
  if (theirs.length > 0 && ours.length > 0 && !ours.some((f) => theirs.includes(f))) out.push('family');
  return out;
}

function birthDatesDiffer(a: string | undefined, b: string | undefined): boolean {
  if (!a || !b) return false;
  const n = Math.min(a.length, b.length, 10);
  return a.slice(0, n) !== b.slice(0, n);
}

function knownGender(g: string | undefined): string | undefined {
  return g && g !== 'unknown' ? g : undefined;
}

/** Every family name of the Patient, normalised (see demographicDifferences); empty ones left out. */
function familyNames(p: Patient): string[] {
  return (p.name ?? []).flatMap((n) => {
    const f = typeof n.family === 'string' ? normaliseName(n.family) : '';
    return f ? [f] : [];
  });
}

/** Case, diacritics, spaces and punctuation removed: NFKD, combining marks dropped, upper case (ß -> SS), letters and digits kept. */
export function normaliseName(s: string): string {
  const strip = (t: string): string => t.normalize('NFKD').replace(/\p{M}/gu, '');
  return strip(strip(s).toUpperCase()).replace(/[^\p{L}\p{N}]/gu, '');
}

/** `birth date`, `birth date and sex`, `birth date, sex and family name`. */
export function describeFields(fields: ReadonlyArray<DemographicField>): string {
  const labels = FIELD_ORDER.filter((f) => fields.includes(f)).map((f) => FIELD_LABELS[f]);
  return labels.length <= 1 ? (labels[0] ?? '') : `${labels.slice(0, -1).join(', ')} and ${labels[labels.length - 1]}`;
}

// ------------------------------------------------------------------------------------------------
// The referral's Patient entry

/** Index of the conditional Patient entry of a referral's transaction (none in a documents-only bundle). */
export function patientEntryIndex(entries: ReadonlyArray<BundleEntry>): number | undefined {
  const i = entries.findIndex((e) => e.resource?.resourceType === 'Patient' && e.request?.method === 'POST' && !!e.request.ifNoneExist);
  return i >= 0 ? i : undefined;
}

/** System of the identifier a Patient created under `patientMismatch: new-patient` is matched on, per sending client. */
export function senderPatientSystem(clientId: string): string {
  return `${GATEWAY_IDENTIFIER_BASE}client/${encodeURIComponent(clientId)}/patient`;
}

/**
 * The sender-scoped identifier that stands in for the colliding one on a new Patient: the sender's own
 * system and value, space-separated (a URI holds no space, so it is unambiguous), under a system of the
 * gateway's for that client. The centre can still read the sender's identifier; searching the original
 * `system|value` no longer finds this Patient, so the centre's own Patient keeps its identifier to itself.
 */
export function senderScopedIdentifier(clientId: string, original: { system?: string; value?: string }): Identifier {
  return {
    system: senderPatientSystem(clientId),
    value: `${original.system ?? ''} ${original.value ?? ''}`,
    type: { text: "Sender's patient identifier (held by a different Patient at this centre)" },
  };
}

const identifierKey = (i: Identifier): string => `${i.system ?? ''}|${i.value ?? ''}`;

/**
 * The Patient entry made into a new Patient: the identifiers the contradicting Patients hold are replaced by
 * the sender-scoped identifier of the first one (the one the entry was matched on), the others kept; the
 * entry is matched on the sender-scoped identifier instead, so a resend, and the same sender's next referral
 * for this patient, find the Patient created here rather than creating another.
 */
export function asNewPatientEntry(entry: BundleEntry, clientId: string, contradicting: ReadonlyArray<Patient>): BundleEntry {
  const patient = entry.resource as Patient;
  const held = new Set(contradicting.flatMap((p) => (p.identifier ?? []).map(identifierKey)));
  const scoped = senderScopedIdentifier(clientId, patient.identifier?.[0] ?? {});
  const kept = (patient.identifier ?? []).slice(1).filter((i) => !held.has(identifierKey(i)));
  return {
    ...entry,
    resource: { ...patient, identifier: [scoped, ...kept] },
    request: {
      ...entry.request,
      method: 'POST',
      url: entry.request?.url ?? 'Patient',
      ifNoneExist: identifierQuery(scoped.system as string, scoped.value as string),
    },
  };
}

// ------------------------------------------------------------------------------------------------
// The check at delivery

export interface PatientCheckInput {
  client: FhirClient;
  destination: Destination;
  referralId: string;
  /** The sending EHR client (scopes the identifier of a new Patient). */
  clientId: string;
  bundle: Bundle;
  /** Index of the Patient entry (patientEntryIndex). */
  index: number;
  /**
   * What searching the entry's criteria already found (resolve-first's batch search); undefined: the check
   * searches (`Patient?<criteria>&_elements=...`).
   */
  found?: ReadonlyArray<Resource>;
  signal: AbortSignal;
}

export type PatientCheck =
  | {
      kind: 'ok';
      /** The bundle to write: as given, or with the Patient entry made a new Patient (`newPatient`). */
      bundle: Bundle;
      /** What the (possibly new) Patient entry's criteria match at the centre, oldest first. */
      found: Patient[];
      /** Set when the entry was made a new Patient: the fields that differed, and the note for the history. */
      newPatient?: { fields: DemographicField[]; note: string };
    }
  /** A permanent failure: the reason says which fields differ and what to do. */
  | { kind: 'hold'; fields: DemographicField[]; reason: string };

/**
 * Compares the Patients the referral's Patient entry would be linked to with the referral's demographics.
 * None contradicting: `ok`, bundle unchanged. One or more contradicting: `hold`, or with `patientMismatch:
 * new-patient` the entry is made a new Patient (asNewPatientEntry) whose own criteria are searched and
 * checked too (one more request, only on this path). A failed search throws FhirRequestError (the caller's
 * retry policy applies).
 */
export async function checkPatient(input: PatientCheckInput): Promise<PatientCheck> {
  const entries = input.bundle.entry ?? [];
  const entry = entries[input.index];
  const ours = entry.resource as Patient;
  const found = input.found ? patientsIn(input.found) : await searchPatients(input, entry.request?.ifNoneExist ?? '');
  const contradicting = found.filter((p) => demographicDifferences(p, ours).length > 0);
  if (contradicting.length === 0) return { kind: 'ok', bundle: input.bundle, found };
  const fields = union(contradicting.map((p) => demographicDifferences(p, ours)));
  const which =
    found.length > 1
      ? `${contradicting.length === found.length ? 'the' : `${contradicting.length} of the`} centre's ${found.length} Patients with this identifier ${contradicting.length === 1 ? 'has' : 'have'}`
      : "the centre's Patient with this identifier has";
  const meta = { referralId: input.referralId, destination: input.destination.id, fields, patientsAtCentre: found.length, contradicting: contradicting.length };
  // A Patient entry already made a new Patient (the check before raw uploads) is not made one again.
  const alreadyNew = ours.identifier?.[0]?.system === senderPatientSystem(input.clientId);
  if (destinationSettings(input.destination).patientMismatch !== 'new-patient' || alreadyNew) {
    logger.warn('patient mismatch at the centre: the Patient matched by the identifier has other demographics; referral held', meta);
    const reason = alreadyNew
      ? `the Patient the gateway created for this sender's identifier (patientMismatch: new-patient) has a different ${describeFields(fields)}; check the identifier`
      : `${which} a different ${describeFields(fields)}; check the identifier (or set patientMismatch: new-patient)`;
    return { kind: 'hold', fields, reason };
  }
  const replaced = asNewPatientEntry(entry, input.clientId, contradicting);
  const own = await searchPatients(input, replaced.request?.ifNoneExist ?? '');
  const ownContradicting = own.filter((p) => demographicDifferences(p, ours).length > 0);
  if (ownContradicting.length > 0) {
    const ownFields = union(ownContradicting.map((p) => demographicDifferences(p, ours)));
    logger.warn('patient mismatch at the centre, also with the Patient created earlier for this sender; referral held', { ...meta, ownFields });
    return {
      kind: 'hold',
      fields: union([fields, ownFields]),
      reason: `${which} a different ${describeFields(fields)}, and the Patient the gateway created for this sender's identifier (patientMismatch: new-patient) has a different ${describeFields(ownFields)}; check the identifier`,
    };
  }
  logger.warn(
    'patient mismatch at the centre: the Patient matched by the identifier has other demographics; the referral gets a Patient of its own (patientMismatch: new-patient)',
    {
      ...meta,
      reused: own.length > 0,
    }
  );
  const bundle = { ...input.bundle, entry: entries.map((e, i) => (i === input.index ? replaced : e)) };
  const note = `${which} a different ${describeFields(fields)}; the referral was linked to ${own.length > 0 ? 'the Patient created earlier' : 'a new Patient'} for this sender's identifier instead (patientMismatch: new-patient)`;
  return { kind: 'ok', bundle, found: own, newPatient: { fields, note } };
}

function union(lists: ReadonlyArray<ReadonlyArray<DemographicField>>): DemographicField[] {
  const all = new Set(lists.flat());
  return FIELD_ORDER.filter((f) => all.has(f));
}

function patientsIn(resources: ReadonlyArray<Resource>): Patient[] {
  return resources.filter((r): r is Patient => r.resourceType === 'Patient' && !!r.id);
}

/** Destinations whose server refused `_elements` (400) once: searched without it from then on (this process). */
const withoutElements = new Set<string>();

/** `Patient?<criteria>&_elements=...&_count=10`; a 400 to `_elements` is retried once without it. Oldest first. */
async function searchPatients(input: PatientCheckInput, criteria: string): Promise<Patient[]> {
  const params: Record<string, string | string[]> = {};
  for (const [k, v] of new URLSearchParams(criteria.replace(/^\?/, ''))) {
    const prev = params[k];
    params[k] = prev === undefined ? v : [...(Array.isArray(prev) ? prev : [prev]), v];
  }
  const elements = !withoutElements.has(input.destination.id);
  try {
    const bundle = await input.client.search<Patient>(
      'Patient',
      { ...params, ...(elements ? { _elements: PATIENT_ELEMENTS } : {}), _count: SEARCH_COUNT },
      { signal: input.signal }
    );
    const found = (bundle.entry ?? []).flatMap((e) =>
      e.resource?.resourceType === 'Patient' && e.search?.mode !== 'include' && e.resource.id ? [e.resource] : []
    );
    return oldestFirst(found);
  } catch (err) {
    if (elements && err instanceof FhirRequestError && err.kind === 'http' && err.status === 400) {
      withoutElements.add(input.destination.id);
      logger.info('the centre refused _elements on a Patient search; searching without it', { destination: input.destination.id });
      return searchPatients(input, criteria);
    }
    throw err;
  }
}
