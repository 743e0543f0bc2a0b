import type { OperationOutcome, OperationOutcomeIssue } from '@medplum/fhirtypes';

export type IssueCode = OperationOutcomeIssue['code'];

export interface IssueInput {
  code: IssueCode;
  message: string;
  expression?: string;
  severity?: OperationOutcomeIssue['severity'];
}

export function outcome(issues: IssueInput[]): OperationOutcome {
  return {
    resourceType: 'OperationOutcome',
    issue: issues.map((i) => ({
      severity: i.severity ?? 'error',
      code: i.code,
      details: { text: i.message },
      ...(i.expression ? { expression: [i.expression] } : {}),
    })),
  };
}

/** An error a user can cause; the error handler answers it with its status and OperationOutcome. */
export class HttpError extends Error {
  readonly status: number;
  readonly outcome: OperationOutcome;
  readonly headers: Record<string, string>;

  constructor(status: number, issues: IssueInput[] | IssueInput, headers: Record<string, string> = {}) {
    const list = Array.isArray(issues) ? issues : [issues];
    super(list[0]?.message ?? 'error');
    this.status = status;
    this.outcome = outcome(list);
    this.headers = headers;
  }
}

export const notFound = (what = 'Referral'): HttpError =>
  new HttpError(404, { code: 'not-found', message: `${what} not found` });

/** Turns a zod issue path into a FHIRPath-like expression: patient.identifiers[0].value */
export function pathToExpression(path: ReadonlyArray<PropertyKey>): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') {
      out += `[${p}]`;
    } else {
      out += out ? `.${String(p)}` : String(p);
    }
  }
  return out || '$';
}
