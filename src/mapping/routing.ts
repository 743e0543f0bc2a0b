import type { Referral } from '../model';
import { cancerConditionCodes, type RoutingRule, routingRules } from './tables';

export interface Route {
  destination: string;
  /** Specialty of the first routing rule that matches the diagnosis, whichever way the destination was chosen. */
  specialty?: string;
}

/** "C50.912" -> "C50"; undefined when the code does not start with an ICD-10 category. */
export function icd10Category(code: string): string | undefined {
  const m = /^([A-Z][0-9][0-9A-Z])/.exec(code.trim().toUpperCase());
  return m ? m[1] : undefined;
}

function icd10Matches(pattern: string, category: string): boolean {
  if (!pattern.includes('-')) {
    return pattern === category;
  }
  const [from, to] = pattern.split('-');
  if (category[0] !== from[0] || !/^\d\d$/.test(category.slice(1))) {
    return false;
  }
  const n = Number(category.slice(1));
  return n >= Number(from.slice(1)) && n <= Number(to.slice(1));
}

/** True when the rule covers the referral's diagnosis code (ICD-10-CM / ICD-10 category, or exact SNOMED code). */
export function ruleMatches(rule: RoutingRule, diagnosis: Referral['diagnosis']['code']): boolean {
  const systems = cancerConditionCodes().codeSystems;
  if (diagnosis.system === systems.icd10cm || diagnosis.system === systems.icd10) {
    const category = icd10Category(diagnosis.code);
    return category !== undefined && rule.icd10.some((p) => icd10Matches(p, category));
  }
  if (diagnosis.system === systems.snomed) {
    return rule.snomed.includes(diagnosis.code.trim());
  }
  return false;
}

/** The routing rules (in order) that cover this diagnosis. */
export function matchingRules(referral: Referral): RoutingRule[] {
  return routingRules().filter((r) => ruleMatches(r, referral.diagnosis.code));
}

/**
 * Chooses the destination for a referral among the configured destination ids:
 * 1. an explicit `referral.destination` wins if it is configured (otherwise: undefined);
 * 2. else the first rule that matches the diagnosis and whose destination is configured;
 * 3. else, if exactly one destination is configured, that one;
 * otherwise undefined (the API answers 422).
 */
export function routeReferral(referral: Referral, destinationIds: string[]): Route | undefined {
  const known = new Set(destinationIds);
  const matches = matchingRules(referral);
  const specialty = matches[0]?.specialty;
  const withSpecialty = (destination: string, s: string | undefined = specialty): Route => (s ? { destination, specialty: s } : { destination });

  if (referral.destination !== undefined) {
    return known.has(referral.destination) ? withSpecialty(referral.destination) : undefined;
  }
  const rule = matches.find((r) => known.has(r.destination));
  if (rule) {
    return withSpecialty(rule.destination, rule.specialty);
  }
  if (known.size === 1) {
    return withSpecialty([...known][0]);
  }
  return undefined;
}
