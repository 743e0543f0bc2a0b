// Status back to HL7 v2 senders (README.md beside this file): the dispatcher that sends the status changes queued in
// src/store's HL7 v2 outbox over MLLP, and the messages it builds (RRI^I12, OSU^O51, ORU^R01, SIU^S12).
export { HL7_RETURN_DEFAULTS, Hl7ReturnDispatcher, type Hl7ReturnDeps, type Hl7ReturnOptions } from './dispatcher';
export { controlId, GATEWAY_APPLICATION, statusMessages, type OutboundMessage, type ReportAttachment, type StatusMessageInput } from './message';
export { collectReport, reportBytesWithin, ReportTooLarge, type ReportStream } from './report';
export { readAck, type AckVerdict } from './ack';
export { bookingCode, defaultStatusTables, loadStatusTables, type StatusTables } from './tables';
