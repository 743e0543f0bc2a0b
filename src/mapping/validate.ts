import { OperationOutcomeError, validateResource } from '@medplum/core';
import type { Bundle, OperationOutcomeIssue } from '@medplum/fhirtypes';
import { loadFhirDefinitions } from './definitions';

// Validating a 22-entry bundle takes about 7 ms once the R4 definitions (definitions.ts) are loaded.

export interface BundleIssue {
  /** FHIRPath-style location in the bundle, e.g. `Bundle.entry[3].resource.status`. */
  path: string;
  message: string;
}

export interface ValidateBundleOptions {
  /**
   * Also report warnings, except the "Invalid reference" warning @medplum/core gives for every
   * `urn:uuid:` reference (it cannot know the target type of a bundle-internal reference).
   */
  includeWarnings?: boolean;
}

function wanted(issue: OperationOutcomeIssue, options: ValidateBundleOptions): boolean {
  if (issue.severity === 'error' || issue.severity === 'fatal') {
    return true;
  }
  if (!options.includeWarnings || issue.severity !== 'warning') {
    return false;
  }
  return !/^Invalid reference: got "urn:uuid:/.test(issue.details?.text ?? '');
}

function issueMessage(issue: OperationOutcomeIssue): string {
  return issue.details?.text ?? issue.diagnostics ?? issue.code;
}

/** "Patient.name[0].given" at entry 2 -> "Bundle.entry[2].resource.name[0].given". */
function issuePath(entryIndex: number, resourceType: string, expression: string | undefined): string {
  const base = `Bundle.entry[${entryIndex}].resource`;
  if (!expression) {
    return base;
  }
  if (expression === resourceType) {
    return base;
  }
  return expression.startsWith(`${resourceType}.`) ? `${base}${expression.slice(resourceType.length)}` : `${base} (${expression})`;
}

/**
 * Validates a transaction/batch Bundle the gateway built: every entry resource against the FHIR R4
 * base definitions (`validateResource` from @medplum/core, which checks structure, cardinality,
 * primitive formats and invariants, not terminology), plus the transaction rules the gateway relies
 * on: a fullUrl and request on every entry, and every `urn:uuid:` reference resolving to an entry.
 * Returns errors (and, on request, meaningful warnings); empty when the bundle is fine.
 */
export function validateBundle(bundle: Bundle, options: ValidateBundleOptions = {}): BundleIssue[] {
  loadFhirDefinitions();
  const issues: BundleIssue[] = [];
  if (bundle.resourceType !== 'Bundle') {
    return [{ path: 'Bundle', message: `not a Bundle (resourceType ${String(bundle.resourceType)})` }];
  }
  if (bundle.type !== 'transaction' && bundle.type !== 'batch') {
    issues.push({ path: 'Bundle.type', message: `must be transaction or batch, got ${String(bundle.type)}` });
  }
  const entries = bundle.entry ?? [];
  const fullUrls = new Set<string>();
  entries.forEach((entry, i) => {
    const at = `Bundle.entry[${i}]`;
    if (!entry.fullUrl) {
      issues.push({ path: `${at}.fullUrl`, message: 'missing fullUrl' });
    } else if (fullUrls.has(entry.fullUrl)) {
      issues.push({ path: `${at}.fullUrl`, message: `duplicate fullUrl ${entry.fullUrl}` });
    } else {
      fullUrls.add(entry.fullUrl);
    }
    if (!entry.request?.method || !entry.request.url) {
      issues.push({ path: `${at}.request`, message: 'missing request method or url' });
    }
  });
  entries.forEach((entry, i) => {
    const resource = entry.resource;
    if (!resource) {
      if (entry.request?.method === 'POST' || entry.request?.method === 'PUT') {
        issues.push({ path: `Bundle.entry[${i}].resource`, message: `missing resource for ${entry.request.method}` });
      }
      return;
    }
    try {
      for (const issue of validateResource(resource)) {
        if (wanted(issue, options)) {
          issues.push({ path: issuePath(i, resource.resourceType, issue.expression?.[0]), message: issueMessage(issue) });
        }
      }
    } catch (err) {
      if (err instanceof OperationOutcomeError) {
        for (const issue of err.outcome.issue ?? []) {
          if (wanted(issue, options)) {
            issues.push({ path: issuePath(i, resource.resourceType, issue.expression?.[0]), message: issueMessage(issue) });
          }
        }
      } else {
        issues.push({ path: `Bundle.entry[${i}].resource`, message: `validation failed: ${(err as Error).message}` });
      }
    }
    for (const ref of collectReferences(resource)) {
      if (ref.startsWith('urn:uuid:') && !fullUrls.has(ref)) {
        issues.push({ path: `Bundle.entry[${i}].resource`, message: `reference ${ref} does not resolve to an entry of this bundle` });
      }
    }
  });
  return issues;
}

/** Every `reference` string inside a resource (Reference.reference values). */
export function collectReferences(value: unknown, out: string[] = []): string[] {
  if (Array.isArray(value)) {
    for (const v of value) {
      collectReferences(v, out);
    }
  } else if (value && typeof value === 'object') {
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
      if (k === 'reference' && typeof v === 'string') {
        out.push(v);
      } else {
        collectReferences(v, out);
      }
    }
  }
  return out;
}
