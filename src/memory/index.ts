export { allocatorTuned, GLIBC_TUNABLES_RECOMMENDED } from './allocator';
export { MemoryBudget, type MemoryBudgetOptions, type Refusal, type Release } from './budget';
