import type { Destination } from '../config';
import type { FhirClient } from '../destinations';

export type DoctorStatus = 'ok' | 'warn' | 'fail' | 'skip';

/** One line of the doctor's report. */
export interface DoctorCheck {
  /** Stable id, e.g. `prefer-minimal`. */
  id: string;
  /** Short human label, e.g. `Prefer: return=minimal`. */
  label: string;
  status: DoctorStatus;
  /** What was seen (statuses, sizes, header values; never resource bodies or tokens). */
  detail: string;
  /** What to set in the destination, or what the centre must enable. Absent when nothing is to be done. */
  advice?: string;
}

export interface DoctorReport {
  destination: string;
  baseUrl: string;
  /** ISO timestamp of the start of the run. */
  checkedAt: string;
  /** No line failed: the gateway can work with this destination as configured. */
  canWork: boolean;
  checks: DoctorCheck[];
  /**
   * Destination settings that would make every settings-dependent line pass (e.g. `{ profile: 'medplum' }`),
   * relative to what the destination sets now. Empty when nothing needs changing.
   */
  suggested: Record<string, unknown>;
  /** Probe resources deleted afterwards, and those that could not be (`Type/id (reason)`). */
  cleanup: { deleted: number; left: string[] };
}

export interface OrphanedBinary {
  referralId: string;
  document: number;
  since: string;
}

export interface DoctorOptions {
  /** The FHIR client to probe with (default: a new client for the destination, logging nothing). */
  client?: FhirClient;
  /** Environment holding the destination's secrets (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Raw Binary uploads whose answer was lost (from the store); shown as a warn line when there are any. */
  orphanedBinaries?: () => Promise<OrphanedBinary[]>;
  /** Clock (ms since epoch), for checkedAt and the clock-skew line. */
  now?: () => number;
  /** fetch for the token endpoint and presigned URLs (default global fetch). */
  fetchImpl?: typeof fetch;
  /**
   * Probe sizes in bytes (defaults: JSON 256 KiB, 1 MiB, 4 MiB, 16 MiB; raw Binary 1, 8, 32 MiB). Each
   * ladder stops at the first refusal.
   */
  sizes?: { json?: number[]; raw?: number[] };
  /** Most HTTP requests the probes may make, cleanup excluded (default 60). */
  maxRequests?: number;
}

export type { Destination };
