import { createHash } from 'node:crypto';

/** Pieces of the canonical form of a JSON value, in order; strings longer than a slice come in slices. */
function* canonicalPieces(value: unknown): Generator<string> {
  if (Array.isArray(value)) {
    yield '[';
    for (let i = 0; i < value.length; i++) {
      if (i > 0) yield ',';
      yield* canonicalPieces(value[i]);
    }
    yield ']';
  } else if (value && typeof value === 'object') {
    yield '{';
    const keys = Object.keys(value as object).sort();
    for (let i = 0; i < keys.length; i++) {
      if (i > 0) yield ',';
      yield JSON.stringify(keys[i]);
      yield ':';
      yield* canonicalPieces((value as Record<string, unknown>)[keys[i]]);
    }
    yield '}';
  } else if (typeof value === 'string' && value.length > 256) {
    yield `"#${value.length}:`; // length-prefixed: unambiguous without escaping a large document
    for (let at = 0; at < value.length; at += HASH_SLICE) yield value.slice(at, at + HASH_SLICE);
  } else {
    yield JSON.stringify(value) ?? 'null';
  }
}

/** Characters hashed between two turns of the event loop (a 20 MB document hashes in ~20 slices). */
const HASH_SLICE = 1 << 20;

/**
 * A stable hash of a JSON value: object keys sorted, so field order does not matter. It streams into the
 * hash instead of building a canonical string, so a large inline document is not copied, and calls `pause`
 * after each HASH_SLICE characters hashed so the event loop can take a turn. Nesting is bounded before this
 * runs (the body reader refuses more than MAX_JSON_DEPTH levels).
 */
export async function canonicalHash(value: unknown, pause: () => Promise<void>): Promise<string> {
  const h = createHash('sha256');
  let since = 0;
  for (const piece of canonicalPieces(value)) {
    h.update(piece);
    since += piece.length;
    if (since >= HASH_SLICE) {
      since = 0;
      await pause();
    }
  }
  return h.digest('hex');
}
