/**
 * The C allocator setting the service is started with (npm start, the Docker image, bench/abuse).
 *
 * Request bodies and documents are large blocks outside the JavaScript heap (megabytes each). glibc's malloc
 * serves blocks from 128 KiB up with mmap and gives them back to the system when freed, but it raises that
 * threshold to the size of each such block freed (up to 32 MiB), after which 20 MB documents come from its
 * heap and their memory stays with the process after they are freed. A fixed threshold turns that off.
 * Measured with bench/abuse (20 concurrent 20 MB referrals, 256 MiB budget, 2026-12-06, 3 runs): peak RSS above
 * idle 1.42–1.46 × the budget without it, 1.17–1.38 × with it.
 */
export const GLIBC_TUNABLES_RECOMMENDED = 'glibc.malloc.mmap_threshold=131072';

/** Whether this process was started with a fixed mmap threshold (only glibc on Linux reads it). */
export function allocatorTuned(env: NodeJS.ProcessEnv = process.env): boolean {
  return /(^|:)glibc\.malloc\.mmap_threshold=/.test(env.GLIBC_TUNABLES ?? '');
}
