// Which patient identifier systems each EHR client may use (CLIENT_IDENTIFIER_SYSTEMS), issue 10 point 11.
import { identifierPolicyIssues } from '../../src/referral/identifier-policy';

const A_MRN = 'http://a.org/mrn';
const A_OID = 'urn:oid:1.2';
const B_MRN = 'http://b.org/mrn';
const NATIONAL = 'urn:oid:2.16.840.1.113883.4.1';
/** As config.ts parses CLIENT_IDENTIFIER_SYSTEMS="a=http://a.org/mrn urn:oid:1.2;b=http://b.org/mrn". */
const SYSTEMS = new Map([
  ['a', [A_MRN, A_OID]],
  ['b', [B_MRN]],
]);
const id = (system: string, value = 'MRN-SECRET-1'): { system: string; value: string } => ({ system, value });

describe('identifierPolicyIssues', () => {
  test('a client may use its own systems', () => {
    expect(identifierPolicyIssues('a', [id(A_MRN), id(A_OID)], SYSTEMS)).toEqual([]);
    expect(identifierPolicyIssues('b', [id(B_MRN)], SYSTEMS)).toEqual([]);
  });

  test('a system configured for another client is refused, naming the field and saying it belongs to another sender', () => {
    const issues = identifierPolicyIssues('b', [id(B_MRN), id(A_MRN)], SYSTEMS);
    expect(issues).toEqual([
      {
        code: 'business-rule',
        expression: 'patient.identifiers[1].system',
        message:
          'patient.identifiers[1].system: the identifier system "http://a.org/mrn" belongs to another sender (CLIENT_IDENTIFIER_SYSTEMS); send your own patient identifiers',
        detail: 'the identifier system "http://a.org/mrn" belongs to another sender (CLIENT_IDENTIFIER_SYSTEMS); send your own patient identifiers',
      },
    ]);
  });

  test('the message names neither the other client nor the identifier value', () => {
    const [issue] = identifierPolicyIssues('b', [id(A_OID, 'MRN-SECRET-1')], SYSTEMS);
    expect(issue.message).not.toMatch(/\ba\b|MRN-SECRET-1/);
  });

  test('a client with configured systems may use only those: an unclaimed system is refused too', () => {
    const issues = identifierPolicyIssues('a', [id(A_MRN), id(NATIONAL)], SYSTEMS);
    expect(issues.map((i) => i.expression)).toEqual(['patient.identifiers[1].system']);
    expect(issues[0].detail).toBe(
      'the identifier system "urn:oid:2.16.840.1.113883.4.1" is not one of the systems configured for this sender (CLIENT_IDENTIFIER_SYSTEMS: "http://a.org/mrn", "urn:oid:1.2")'
    );
  });

  test('a client without configured systems may use any system no other client claims, but not a claimed one', () => {
    expect(identifierPolicyIssues('c', [id(NATIONAL), id('https://c.example/ids')], SYSTEMS)).toEqual([]);
    const issues = identifierPolicyIssues('c', [id(NATIONAL), id(B_MRN), id(A_OID)], SYSTEMS);
    expect(issues.map((i) => i.expression)).toEqual(['patient.identifiers[1].system', 'patient.identifiers[2].system']);
    expect(issues.every((i) => i.detail.includes('belongs to another sender'))).toBe(true);
  });

  test('systems are compared exactly (as the centre compares them), and nothing is refused without configuration', () => {
    // A variant spelling is not a's system here, nor at the centre (identifier=system|value is exact), so it cannot reach a's Patients.
    expect(identifierPolicyIssues('c', [id(`${A_MRN}/`)], SYSTEMS)).toEqual([]);
    expect(identifierPolicyIssues('b', [id(A_MRN)], new Map())).toEqual([]);
  });

  test('a system listed for several clients is theirs, each', () => {
    const shared = new Map([
      ['a', [A_MRN, NATIONAL]],
      ['b', [B_MRN, NATIONAL]],
    ]);
    expect(identifierPolicyIssues('b', [id(B_MRN), id(NATIONAL)], shared)).toEqual([]);
    expect(identifierPolicyIssues('c', [id(NATIONAL)], shared)).toHaveLength(1);
  });
});
