// The built-in FHIR sandbox (README.md beside this file). This surface is light on purpose: the server itself
// (@medplum/fhir-router, the R4 definitions, ~2,400 lines) is loaded by `loadSandbox()` only when a sandbox is
// used, so a production gateway, which never runs one, never loads it.
import type * as Server from './server';

export { SANDBOX_ID, SANDBOX_PATH, sandboxDestination } from './destination';
export type { FailNextEntryOptions } from './faults';
export type { SandboxProfileName, SandboxTraits } from './profiles';
export type {
  BinaryDigest,
  BinaryUploadStats,
  SandboxEngineOptions,
  SandboxRouter,
  SandboxRouterOptions,
  SandboxServer,
  SandboxStats,
  StartSandboxOptions,
} from './server';

/** The sandbox server: createSandboxRouter (to mount in an app), startSandboxServer (standalone), profiles, faults. */
export const loadSandbox = (): Promise<typeof Server> => import('./server');
