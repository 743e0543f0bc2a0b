// Which patient identifier systems each EHR client may use (CLIENT_IDENTIFIER_SYSTEMS). Pure: no I/O.
//
// The centre links a referral to the Patient that holds the referral's identifier (system and value), so an
// identifier system is, in effect, a key into one hospital's patients. A second hospital that sends the first
// one's system (by mistake or otherwise) would have its referral attached to the first hospital's patient.
import type { CheckIssue } from './check';

/** An identifier as the referral carries it (`patient.identifiers[i]`, see ./schema.ts). */
export interface PatientIdentifier {
  system: string;
  value: string;
}

/**
 * The identifier systems `clientId` may not use, as 422 issues (`business-rule`, expression
 * `patient.identifiers[i].system`); empty when every identifier is allowed.
 *
 * Rules, with `systems` = CLIENT_IDENTIFIER_SYSTEMS (client id -> the systems configured for it):
 * 1. A system configured for another client is refused, whatever this client's own configuration.
 * 2. A client with systems configured may use only those systems: an unclaimed system is refused too (a
 *    hospital that declared its systems has declared all of them; anything else is a mistake to surface at
 *    intake, not at the centre).
 * 3. A client without configured systems may use any system no other client claims (the behaviour before
 *    CLIENT_IDENTIFIER_SYSTEMS existed, so configuring one client does not break the others).
 * A system listed for several clients (config.ts refuses that at start-up) counts as theirs, each.
 * Systems are compared exactly, as a FHIR server compares them in `identifier=system|value`; a variant
 * spelling (a trailing slash) is a different system here and at the centre alike, so it cannot reach the
 * other client's Patients. The messages name the system, never the other client, nor the value.
 */
export function identifierPolicyIssues(
  clientId: string,
  identifiers: ReadonlyArray<PatientIdentifier>,
  systems: ReadonlyMap<string, ReadonlyArray<string>>
): CheckIssue[] {
  if (systems.size === 0) return [];
  const own = new Set(systems.get(clientId) ?? []);
  const claimedByOthers = new Set<string>();
  for (const [client, list] of systems) {
    if (client === clientId) continue;
    for (const s of list) if (!own.has(s)) claimedByOthers.add(s);
  }
  const issues: CheckIssue[] = [];
  identifiers.forEach((identifier, i) => {
    const system = identifier.system;
    let detail: string | undefined;
    if (claimedByOthers.has(system)) {
      detail = `the identifier system ${quote(system)} belongs to another sender (CLIENT_IDENTIFIER_SYSTEMS); send your own patient identifiers`;
    } else if (own.size > 0 && !own.has(system)) {
      detail = `the identifier system ${quote(system)} is not one of the systems configured for this sender (CLIENT_IDENTIFIER_SYSTEMS: ${[...own].map(quote).join(', ')})`;
    }
    if (detail) {
      const expression = `patient.identifiers[${i}].system`;
      issues.push({ code: 'business-rule', expression, message: `${expression}: ${detail}`, detail });
    }
  });
  return issues;
}

/** A system as shown in a message: JSON-quoted and cut to 200 characters (it passed the schema as a URI). */
function quote(system: string): string {
  return JSON.stringify(system.length > 200 ? `${system.slice(0, 200)}…` : system);
}
