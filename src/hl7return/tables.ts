import { z } from 'zod';
import { mappingFilePath, parseMappingFile } from '../mapping';
import { referralStatuses, type ReferralStatus } from '../model';

// The status tables of the messages sent back to HL7 v2 senders (mappings/hl7v2-status.json): gateway status to
// HL7 table 0283 (RF1-1 of RRI^I12) and table 0038 (ORC-5 of OSU^O51), the report's code, and the Task business
// statuses that say the board is booked (SIU^S12 to 360X senders).

const sources = z.string().min(20, 'say where the codes come from');
/** One entry for every gateway status: a status added to the model without a code here stops start-up. */
const everyStatus = <T extends z.ZodType>(code: T) => z.strictObject(Object.fromEntries(referralStatuses.map((s) => [s, code])) as Record<ReferralStatus, T>);

export const statusTablesSchema = z.object({
  _source: z.string().min(40, 'say where the tables come from'),
  referralStatus: z.strictObject({
    sources,
    map: everyStatus(z.enum(['A', 'E', 'P', 'R'])),
    displays: z.strictObject({ A: z.string().min(1), E: z.string().min(1), P: z.string().min(1), R: z.string().min(1) }),
  }),
  orderStatus: z.strictObject({ sources, map: everyStatus(z.enum(['A', 'CA', 'CM', 'DC', 'ER', 'HD', 'IP', 'RP', 'SC'])) }),
  report: z.strictObject({ sources, code: z.string().min(1), display: z.string().min(1), system: z.string().min(1) }),
  appointment: z.strictObject({
    sources,
    /** The Task business statuses that say the board is booked; without a system, the code in any system. */
    bookingCodes: z.array(z.strictObject({ system: z.string().min(1).optional(), code: z.string().min(1), display: z.string().min(1) })).min(1),
  }),
});

export type StatusTables = z.output<typeof statusTablesSchema>;

/** The booking code a Task's business status codes match (tables.appointment.bookingCodes), if any. */
export function bookingCode(
  tables: StatusTables,
  codes: readonly { system?: string; code: string }[]
): StatusTables['appointment']['bookingCodes'][number] | undefined {
  for (const c of codes) {
    const found = tables.appointment.bookingCodes.find((b) => b.code === c.code && (b.system === undefined || b.system === c.system));
    if (found) return found;
  }
  return undefined;
}

const TABLES_FILE = 'hl7v2-status.json';

/** Reads and checks a status tables file (default: mappings/hl7v2-status.json); throws naming the file and the fields at fault. */
export function loadStatusTables(file: string = mappingFilePath(TABLES_FILE)): StatusTables {
  return parseMappingFile(file, statusTablesSchema);
}

let defaultTables: StatusTables | undefined;

/** mappings/hl7v2-status.json, loaded on first use and kept. */
export function defaultStatusTables(): StatusTables {
  defaultTables ??= loadStatusTables();
  return defaultTables;
}
