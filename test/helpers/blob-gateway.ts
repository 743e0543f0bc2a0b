// The gateway in a process of its own, as src/index.ts runs it (configuration from the environment), for the tests
// that measure or kill it while it delivers a large streamed document (test/integration/delivery-blobs-process.test.ts):
//   BLOB_REFERRAL_MIB=<n> [BLOB_REFERRAL_DESTINATION=centre] tsx test/helpers/blob-gateway.ts
// With BLOB_REFERRAL_MIB it stores a referral with one generated document of that many MiB (createBlobReferral: the
// bytes into its blob store, the referral through the store) once it has started, and prints one JSON line per event:
//   {"event":"gateway-ready","url":...}
//   {"event":"blob-referral","id":...,"blob":{sha256,bytes,sha1},"document":<n>}
//   {"event":"delivered","id":...,"baselineRss":...,"peakRss":...,"peakGrowth":...,"maxRssGrowth":...}
// The RSS is sampled every 2 ms from the moment the document's bytes are in the blob store (just before the referral
// is queued) until the referral is sent (peakGrowth; storingPeakGrowth is the same for storing the bytes), and the
// kernel's high-water mark (resourceUsage().maxRSS) is compared before and after (maxRssGrowth: 0 when an earlier
// peak was higher). Without BLOB_REFERRAL_MIB it only runs the gateway (a restart after a kill).
import { loadConfig } from '../../src/config';
import { Gateway } from '../../src/gateway';
import { getReferral } from '../../src/store';
import { createBlobReferral } from './blob-referrals';

const say = (o: Record<string, unknown>): void => void process.stdout.write(`${JSON.stringify(o)}\n`);

async function main(): Promise<void> {
  const gateway = new Gateway(loadConfig());
  await gateway.start();
  let stopping = false;
  process.on('SIGTERM', () => {
    if (stopping) return;
    stopping = true;
    gateway.stop().then(
      () => process.exit(0),
      () => process.exit(1)
    );
  });
  say({ event: 'gateway-ready', url: gateway.url });
  const mib = Number(process.env.BLOB_REFERRAL_MIB ?? 0);
  if (!(mib > 0)) return;

  const gc = (globalThis as { gc?: () => void }).gc ?? (() => undefined);
  gc();
  const startRss = process.memoryUsage.rss();
  let peakRss = startRss;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
  }, 2);
  let storing: { peakGrowth: number } | undefined;
  let baselineRss = startRss;
  let baselineMax = 0;
  const r = await createBlobReferral(gateway, {
    documents: [{ bytes: mib * 1024 * 1024, seed: 13, contentType: 'application/dicom' }],
    destination: process.env.BLOB_REFERRAL_DESTINATION ?? 'centre',
    // The delivery is measured from here: storing the bytes (the intake's part) is reported apart.
    stored: () => {
      storing = { peakGrowth: Math.max(peakRss, process.memoryUsage.rss()) - startRss };
      gc();
      baselineRss = process.memoryUsage.rss();
      baselineMax = process.resourceUsage().maxRSS * 1024;
      peakRss = baselineRss;
    },
  });
  say({ event: 'blob-referral', id: r.id, blob: r.blobs[0], document: r.firstBlobIndex + 1 });
  for (;;) {
    const cur = await getReferral(gateway.db, r.id, { payload: false });
    if (cur?.status === 'sent' || cur?.status === 'delivery-failed') {
      clearInterval(sampler);
      peakRss = Math.max(peakRss, process.memoryUsage.rss());
      const maxRss = process.resourceUsage().maxRSS * 1024;
      say({
        event: 'delivered',
        id: r.id,
        status: cur.status,
        baselineRss,
        peakRss,
        peakGrowth: peakRss - baselineRss,
        maxRssGrowth: Math.max(0, maxRss - baselineMax),
        storingPeakGrowth: storing?.peakGrowth,
      });
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`);
  process.exit(1);
});
