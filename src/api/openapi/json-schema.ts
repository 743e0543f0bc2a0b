// Zod schemas to the JSON Schemas of the OpenAPI document: one registry conversion (z.toJSONSchema, draft 2020-12,
// the dialect of OpenAPI 3.1), then a tidy pass so the document reads well and does not change with zod's key order.
import { z } from 'zod';

export type JsonSchema = Record<string, unknown>;
type Meta = z.core.JSONSchemaMeta;

/** Where the document keeps its named schemas. */
export const SCHEMA_BASE = '#/components/schemas/';

/**
 * A registry that also reads the metadata schemas carry themselves (`.meta()`, zod's global registry), so a schema
 * documents its fields where it is declared, and the generator adds ids and notes for schemas it does not own
 * without touching the global registry (the tests' own zod export must not see them).
 */
class DocRegistry extends z.core.$ZodRegistry<Meta> {
  override get<S extends z.core.$ZodType>(schema: S): Meta | undefined {
    const own = super.get(schema);
    const { id: _globalId, ...shared } = z.globalRegistry.get(schema) ?? {};
    if (!own && Object.keys(shared).length === 0) return undefined;
    return { ...shared, ...own };
  }
}

/** String formats zod also writes as a long regex: the format says it. */
const FORMATS_WITHOUT_PATTERN = new Set(['datetime', 'email']);

/**
 * Converts the named schemas (components) and the schemas used in place (inline) in one pass, so an inline schema
 * refers to a named one by $ref. `notes` adds metadata to schemas without changing them (e.g. descriptions of
 * src/model/schema.ts fields).
 */
export function convertSchemas(
  named: Record<string, z.ZodType>,
  inline: ReadonlyArray<z.ZodType>,
  notes: ReadonlyArray<readonly [z.ZodType, Meta]>
): { components: Record<string, JsonSchema>; inline: Map<z.ZodType, JsonSchema> } {
  const registry = new DocRegistry();
  for (const [schema, meta] of notes) registry.add(schema, { ...registry.get(schema), ...meta });
  for (const [id, schema] of Object.entries(named)) registry.add(schema, { ...registry.get(schema), id });
  const inlineIds = new Map<z.ZodType, string>();
  for (const schema of inline) {
    if (inlineIds.has(schema) || registry.get(schema)?.id) continue;
    const id = `__inline${inlineIds.size}`;
    inlineIds.set(schema, id);
    registry.add(schema, { ...registry.get(schema), id });
  }

  const { schemas } = z.toJSONSchema(registry, {
    target: 'draft-2020-12',
    io: 'input',
    metadata: registry,
    uri: (id) => `${SCHEMA_BASE}${id}`,
    override: ({ zodSchema, jsonSchema }) => {
      const format = (zodSchema._zod.def as { format?: string }).format;
      if (format && FORMATS_WITHOUT_PATTERN.has(format)) delete jsonSchema.pattern;
    },
  });
  const components: Record<string, JsonSchema> = {};
  for (const id of Object.keys(named)) components[id] = tidy(schemas[id] as JsonSchema);
  const out = new Map<z.ZodType, JsonSchema>();
  for (const [schema, id] of inlineIds) out.set(schema, tidy(schemas[id] as JsonSchema));
  const leaked = JSON.stringify([components, [...out.values()]]).match(/"\$ref":"[^"]*__inline\d+"/);
  if (leaked) throw new Error(`openapi: a schema used in place is also nested in another (${leaked[0]}); give it a component name`);
  return { components, inline: out };
}

/** Keywords in the order a reader wants them; others follow in zod's order. */
const KEYWORD_ORDER = [
  '$ref',
  'type',
  'const',
  'enum',
  'format',
  'contentEncoding',
  'minLength',
  'maxLength',
  'pattern',
  'minimum',
  'maximum',
  'minItems',
  'maxItems',
  'default',
  'description',
  'examples',
  'x-extension',
  'required',
  'additionalProperties',
  'properties',
  'items',
  'anyOf',
  'oneOf',
  'allOf',
  'not',
];

const isObject = (v: unknown): v is JsonSchema => typeof v === 'object' && v !== null && !Array.isArray(v);
const isEmpty = (v: unknown): boolean => isObject(v) && Object.keys(v).length === 0;

/**
 * Drops what zod adds that says nothing here ($schema, $id, the safe-integer bounds of z.int(), string property
 * names), writes `nullable` as a type list where that is exact, and orders the keywords.
 */
export function tidy(schema: JsonSchema): JsonSchema {
  let s: JsonSchema = { ...schema };
  delete s.$schema;
  delete s.$id;
  if (s.minimum === Number.MIN_SAFE_INTEGER) delete s.minimum;
  if (s.maximum === Number.MAX_SAFE_INTEGER) delete s.maximum;
  if (isObject(s.propertyNames) && s.propertyNames.type === 'string' && Object.keys(s.propertyNames).length === 1) delete s.propertyNames;
  if (isEmpty(s.additionalProperties)) s.additionalProperties = true;
  if (isEmpty(s.items)) delete s.items;

  // anyOf [X, null] as X with type [X's type, 'null'], unless X is a $ref or lists its values (null would not be one).
  const anyOf = s.anyOf;
  if (Array.isArray(anyOf) && anyOf.length === 2 && isObject(anyOf[0]) && isObject(anyOf[1])) {
    const [value, nothing] = anyOf as [JsonSchema, JsonSchema];
    if (
      nothing.type === 'null' &&
      Object.keys(nothing).length === 1 &&
      typeof value.type === 'string' &&
      !('$ref' in value) &&
      !('enum' in value) &&
      !('const' in value)
    ) {
      const { anyOf: _anyOf, ...rest } = s;
      s = { ...value, ...rest, type: [value.type, 'null'] };
    }
  }

  for (const key of ['items', 'additionalProperties', 'not']) if (isObject(s[key])) s[key] = tidy(s[key] as JsonSchema);
  if (isObject(s.properties)) s.properties = Object.fromEntries(Object.entries(s.properties).map(([k, v]) => [k, isObject(v) ? tidy(v) : v]));
  for (const key of ['anyOf', 'oneOf', 'allOf']) if (Array.isArray(s[key])) s[key] = (s[key] as unknown[]).map((v) => (isObject(v) ? tidy(v) : v));

  const rank = (k: string): number => {
    const i = KEYWORD_ORDER.indexOf(k);
    return i < 0 ? KEYWORD_ORDER.length : i;
  };
  return Object.fromEntries(Object.entries(s).sort(([a], [b]) => rank(a) - rank(b)));
}
