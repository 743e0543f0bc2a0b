// Lint for correctness and for the architecture (../shared/architecture.md, change 5): typescript-eslint's strict
// rules, the Medplum subset (floating promises, type imports, exhaustive switches, no nested ternaries, one
// import per module, no cycles), and zones that keep the dependency direction:
//   - nothing outside src/api (and the composition root) imports src/api: the domain owns its outcomes;
//   - mapping is pure: it imports neither the store nor delivery;
//   - only the composition root and the command lines import the sandbox (which they load on demand);
//   - src/outcomes, src/json and src/model are leaves;
//   - another folder is imported through its index.ts (its public surface), never through its files.
import js from '@eslint/js';
import { createTypeScriptImportResolver } from 'eslint-import-resolver-typescript';
import importX from 'eslint-plugin-import-x';
import tseslint from 'typescript-eslint';

const root = ['./src/app.ts', './src/gateway.ts', './src/index.ts'];
const domain = [
  './src/referral',
  './src/tracking',
  './src/mapping',
  './src/delivery',
  './src/store',
  './src/webhooks',
  './src/queue',
  './src/retention',
  './src/doctor',
  './src/config',
  './src/observability',
  './src/outcomes',
  './src/json',
  './src/memory',
  './src/model',
  './src/http',
  './src/destinations',
  './src/intake',
  './src/hl7return',
];

export default tseslint.config(
  { ignores: ['node_modules/**', 'dist/**', 'data/**', 'coverage/**', 'docs/**', '**/*.cjs', '**/*.mjs'] },
  js.configs.recommended,
  ...tseslint.configs.strict,
  {
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    plugins: { 'import-x': importX },
    settings: { 'import-x/resolver-next': [createTypeScriptImportResolver()] },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/consistent-type-imports': ['error', { fixStyle: 'inline-type-imports' }],
      '@typescript-eslint/switch-exhaustiveness-check': ['error', { considerDefaultExhaustiveForUnions: true }],
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', destructuredArrayIgnorePattern: '^_', ignoreRestSiblings: true },
      ],
      'no-nested-ternary': 'error',
      curly: ['error', 'multi-line'],
      'import-x/no-duplicates': 'error',
      'import-x/no-cycle': 'error',
      'import-x/no-restricted-paths': [
        'error',
        {
          zones: [
            { target: domain, from: './src/api', message: 'the domain owns its outcomes: only src/api and the composition root know HTTP' },
            { target: './src/mapping', from: ['./src/store', './src/delivery'], message: 'mapping is pure: no store, no delivery' },
            { target: [...domain, './src/api'], from: './src/sandbox', message: 'only the composition root and the command lines use the sandbox' },
            { target: './src/outcomes', from: './src', except: ['./outcomes'], message: 'src/outcomes is a leaf' },
            { target: './src/json', from: './src', except: ['./json'], message: 'src/json is a leaf' },
            { target: './src/model', from: './src', except: ['./model'], message: 'src/model is a leaf' },
          ],
        },
      ],
    },
  },
  {
    // One public surface per capability folder: another folder is imported through its index.ts, never its files.
    files: ['src/**/*.ts'],
    ignores: ['src/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        { patterns: [{ regex: '^(\\.\\./)+(?!\\.|fixtures/|mappings/)[^/]+/', message: 'import another folder through its index.ts' }] },
      ],
    },
  },
  {
    files: ['src/*.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: [{ regex: '^\\./[^/]+/', message: 'import a folder through its index.ts' }] }],
    },
  },
  {
    files: ['test/**/*.ts', 'bench/**/*.ts'],
    rules: {
      // Tests and benches assert on shapes they build; the non-null assertion and any are tools there.
      '@typescript-eslint/no-non-null-assertion': 'off',
      '@typescript-eslint/no-explicit-any': 'off',
      'import-x/no-restricted-paths': 'off',
    },
  }
);
