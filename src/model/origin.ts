/** An HL7 v2 sender's message family: REF^I12 is answered with RRI^I12, 360X's OMG^O19 with OSU^O51. */
export type Hl7Family = 'REF' | 'OMG';

/**
 * Who sent an HL7 v2 referral and how to address it back (HD and EI values as escaped ER7, default delimiters): read
 * by the intake (src/intake/hl7v2/origin.ts), kept with the referral by the store, used by src/hl7return.
 */
export interface V2Origin {
  family: Hl7Family;
  /** MSH-3, MSH-4 of the referral message: the sender (MSH-5, MSH-6 of what goes back). */
  sendingApplication: string;
  sendingFacility: string;
  /** MSH-5, MSH-6 of the referral message: what the sender called the gateway (MSH-3, MSH-4 of what goes back). */
  receivingApplication: string;
  receivingFacility: string;
  /** MSH-12 of the referral message. */
  version: string;
  /** RF1-6 (REF) or ORC-2, else OBR-2 (OMG): the sender's id for the referral, as sent. */
  referralIdentifier: string;
}
