/**
 * The live lane (`npm run test:live`): the referral loop against a real FHIR R4 server named by
 * LIVE_FHIR_BASE_URL (see docs/for-cancer-centres.md). Only test/live/*.live.ts; `npm test` never runs them.
 * Without LIVE_FHIR_BASE_URL, test/live/global-setup.ts prints one line and exits 0.
 * @type {import('jest').Config}
 */
module.exports = {
  testEnvironment: 'node',
  rootDir: __dirname,
  roots: ['<rootDir>/test/live'],
  testMatch: ['**/*.live.ts'],
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json' }] },
  globalSetup: '<rootDir>/test/live/global-setup.ts',
  // Real servers are slow and a test waits for delivery and polls: each test gets three minutes.
  testTimeout: 180000,
  passWithNoTests: true,
};
