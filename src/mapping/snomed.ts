/**
 * SNOMED CT identifier checks that need no terminology server.
 *
 * An SCTID is 6-18 digits: item id, a two-digit partition id (second and third digits from the right)
 * and a Verhoeff check digit (last digit). Concept ids use partition 00 (core) or 10 (extension).
 * This catches typos and description/relationship ids sent as codes; it cannot tell whether a concept
 * is active or what it means.
 */

// Verhoeff tables (dihedral group D5 multiplication, permutation, inverse).
const D = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
  [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
  [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
  [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
  [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
  [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
  [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
  [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
  [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
  [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];
const P = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
  [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
  [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
  [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
  [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
  [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
  [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
  [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/** True when the digit string (check digit included) passes the Verhoeff check. */
export function verhoeffValid(digits: string): boolean {
  if (!/^\d+$/.test(digits)) {
    return false;
  }
  let c = 0;
  const reversed = digits.split('').reverse();
  for (let i = 0; i < reversed.length; i++) {
    c = D[c][P[i % 8][Number(reversed[i])]];
  }
  return c === 0;
}

/** True when `code` is a well-formed SNOMED CT concept id (format, partition, check digit). */
export function isSnomedConceptId(code: string): boolean {
  if (!/^[1-9]\d{5,17}$/.test(code)) {
    return false;
  }
  const partition = code.slice(-3, -1);
  if (partition !== '00' && partition !== '10') {
    return false;
  }
  return verhoeffValid(code);
}
