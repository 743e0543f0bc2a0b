// Operator command line for a running gateway: `npm run admin -- <command>`. It calls the /admin API
// (docs/openapi.json) with ADMIN_API_KEY, so it works the same against a local or a remote instance.
//
//   deliveries [failed|pending|done]    the delivery dead letter (default) or queue
//   retry <referral id | outbox id>     re-queue a failed delivery
//   webhooks [failed|pending|delivered] status webhooks that could not be delivered (default) or the queue
//   webhook-retry <webhook id>          replay one
//   retention                           apply the retention policy now
//   console-audit [referral id]         the console's audit log (who was shown a patient's identity), newest first
//
// GATEWAY_URL (default http://127.0.0.1:$PORT, PORT default 8080) names the instance. --json prints
// the API's JSON instead of lines. Exit codes: 0 done, 1 the gateway refused or could not be reached, 2 usage.

const USAGE = `usage: npm run admin -- <command> [--json]
  deliveries [failed|pending|done]      list the delivery dead letter (default: failed) or queue
  retry <referral id | outbox id>       re-queue a failed delivery
  webhooks [failed|pending|delivered]   list status webhooks that could not be delivered (default: failed)
  webhook-retry <webhook id>            replay one
  retention                             apply the retention policy now
  console-audit [referral id]           the console's audit log (who was shown a patient's identity), newest first
environment: ADMIN_API_KEY (required), GATEWAY_URL (default http://127.0.0.1:8080)`;

interface AdminCall {
  method: 'GET' | 'POST';
  path: string;
  /** The lines for the API's parsed JSON answer. Each command declares the shape docs/openapi.json gives it
   * (a method, so that its narrower parameter type is accepted). */
  show(body: unknown): string[];
}

function parse(args: string[]): AdminCall | string {
  const [command, arg, ...rest] = args.filter((a) => a !== '--json');
  if (rest.length > 0) return `unexpected ${rest.join(' ')}`;
  switch (command) {
    case 'deliveries':
      return listing(
        'deliveries',
        ['failed', 'pending', 'done'],
        arg,
        (e) => `${e.kind}  attempts=${e.attempts}${e.nextAttemptAt ? `  next=${e.nextAttemptAt}` : ''}`
      );
    case 'retry':
      if (!arg) return 'retry needs a referral id (ref_...) or an outbox entry id';
      return requeue(`/admin/deliveries/${encodeURIComponent(arg)}/retry`);
    case 'webhooks':
      return listing('webhooks', ['failed', 'pending', 'delivered'], arg, (e) => `${e.event?.status ?? ''}  attempts=${e.attempts}`);
    case 'webhook-retry':
      if (!arg) return 'webhook-retry needs a webhook id (wh_...)';
      return requeue(`/admin/webhooks/${encodeURIComponent(arg)}/retry`);
    case 'retention':
      if (arg) return `retention takes no argument`;
      return {
        method: 'POST',
        path: '/admin/retention/run',
        show: (b: { referralsStripped: number; documentsStripped: number; referralsDeleted: number; blobsDeleted?: number; skipped?: string }) => [
          b.skipped ??
            `document bytes removed from ${b.referralsStripped} referrals (${b.documentsStripped} documents); ${b.referralsDeleted} referrals deleted; ` +
              `${b.blobsDeleted ?? 0} unreferenced blobs removed`,
        ],
      };
    case 'console-audit':
      if (arg !== undefined && !/^ref_[0-9A-Z]{26}$/.test(arg)) return `console-audit takes a referral id (ref_...), not ${arg}`;
      return {
        method: 'GET',
        path: `/admin/console-audit?limit=1000${arg ? `&referral=${arg}` : ''}`,
        show: (b: { items: Array<{ at: string; actor: string; action: string; referralId: string }> }) =>
          b.items.length === 0 ? ['no audit rows'] : b.items.map((e) => `${e.at}  ${e.actor}  ${e.action}  ${e.referralId}`),
      };
    default:
      return command ? `unknown command ${command}` : 'a command is required';
  }
}

interface ListedEntry {
  id: string;
  referralId: string;
  kind?: string;
  attempts: number;
  lastError: string | null;
  nextAttemptAt?: string | null;
  event?: { status?: string };
}

/** GET /admin/{what}?state=: one line per entry (id, referral, `middle`, last error), or "no ..." when empty. */
function listing(what: 'deliveries' | 'webhooks', states: string[], arg: string | undefined, middle: (e: ListedEntry) => string): AdminCall | string {
  const state = arg ?? 'failed';
  if (!states.includes(state)) return `${what} takes ${states.slice(0, -1).join(', ')} or ${states[states.length - 1]}, not ${state}`;
  return {
    method: 'GET',
    path: `/admin/${what}?state=${state}&limit=500`,
    show: (b: { items: ListedEntry[] }) =>
      b.items.length === 0
        ? [`no ${state} ${what}`]
        : b.items.map((e) => `${e.id}  ${e.referralId}  ${middle(e)}${e.lastError ? `  ${oneLine(e.lastError)}` : ''}`),
  };
}

function requeue(path: string): AdminCall {
  return { method: 'POST', path, show: (b: { requeued: string[] }) => [`re-queued ${b.requeued.join(', ')}`] };
}

function oneLine(s: string): string {
  const flat = s.replace(/\s+/g, ' ');
  return flat.length > 200 ? `${flat.slice(0, 200)}…` : flat;
}

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const req = parse(args);
  if (typeof req === 'string') {
    process.stderr.write(`${req}\n${USAGE}\n`);
    return 2;
  }
  const key = process.env.ADMIN_API_KEY;
  if (!key) {
    process.stderr.write(`ADMIN_API_KEY is not set: it must be the key the gateway was started with\n`);
    return 2;
  }
  const base = (process.env.GATEWAY_URL || `http://127.0.0.1:${process.env.PORT || 8080}`).replace(/\/+$/, '');
  let res: Response;
  try {
    res = await fetch(`${base}${req.path}`, {
      method: req.method,
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      ...(req.method === 'POST' ? { body: '{}' } : {}),
      signal: AbortSignal.timeout(30_000),
    });
  } catch (err) {
    process.stderr.write(
      `cannot reach the gateway at ${base}: ${(err as Error).cause instanceof Error ? ((err as Error).cause as Error).message : (err as Error).message}\n`
    );
    return 1;
  }
  const text = await res.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  if (!res.ok) {
    const outcome = body as { resourceType?: unknown; issue: Array<{ details?: { text?: string } }> } | null | undefined;
    const issues: Array<{ details?: { text?: string } }> = outcome?.resourceType === 'OperationOutcome' ? outcome.issue : [];
    const why =
      issues
        .map((i) => i.details?.text)
        .filter(Boolean)
        .join('; ') || text.slice(0, 200);
    process.stderr.write(`${res.status}: ${why}\n`);
    return 1;
  }
  process.stdout.write(args.includes('--json') ? `${JSON.stringify(body, null, 2)}\n` : `${req.show(body).join('\n')}\n`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: Error) => {
    process.stderr.write(`${err.message}\n`);
    process.exit(1);
  }
);
export {};
