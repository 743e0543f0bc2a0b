import type { AddressInfo, Server, Socket } from 'node:net';
import { once } from 'node:events';
import { buildAck, createMllpServer, ERROR_CODES, parseV2 } from '../intake';
import { logger, requestContext } from '../observability';
import type { ReferralService } from '../referral';
import type { Db } from '../store';
import { answerV2Message } from './hl7v2-handler';

export interface MllpListenerOptions {
  port: number;
  host: string;
  /** Which client each sending facility (MSH-4) is. */
  senders: ReadonlyMap<string, string>;
  /** The client of a sender not listed (a listener for one sender); without it such a message is refused AR. */
  listenerClient?: string;
  maxMessageBytes: number;
}

export interface MllpListener {
  readonly server: Server;
  readonly port: number;
  close(): Promise<void>;
}

/**
 * The HL7 v2 MLLP listener: each message is answered by answerV2Message for the client its sending facility is
 * bound to (HL7_MLLP_SENDERS, else HL7_MLLP_CLIENT), so one sender never reaches another client's referrals. The
 * acknowledgement goes back on the connection once the work is stored; replies keep the order of the messages.
 */
export async function startMllpListener(service: ReferralService, db: Db, opts: MllpListenerOptions): Promise<MllpListener> {
  const server = createMllpServer({
    maxMessageBytes: opts.maxMessageBytes,
    onMessage: async (bytes, connection) => {
      const text = bytes.toString('utf8');
      const parsed = parseV2(text);
      const facility = parsed.ok ? parsed.sendingFacility : '';
      const clientId = opts.senders.get(facility) ?? opts.listenerClient;
      if (!clientId) {
        logger.warn('HL7 v2 message from a sending facility bound to no client refused', { connection: connection.id, facilityLength: facility.length });
        return buildAck(parsed.message, 'AR', [
          { code: ERROR_CODES.unknownKey, location: 'MSH^1^4', text: 'this sending facility is not registered with the gateway (HL7_MLLP_SENDERS)' },
        ]);
      }
      const correlationId = `mllp-${connection.id}-${(parsed.ok ? parsed.controlId : 'unparsed').slice(0, 40)}`;
      const reply = await requestContext.run({ correlationId }, () => answerV2Message(service, db, clientId, text, correlationId));
      logger.info('HL7 v2 message answered', { correlationId, clientId, ack: /\rMSA\|(A[AER])/.exec(reply.body)?.[1], bytes: bytes.length });
      return reply.body;
    },
    onOversize: (head) => {
      const firstSegment = head.toString('utf8').split(/\r\n?|\n/)[0] ?? '';
      const parsed = parseV2(firstSegment);
      return buildAck(parsed.message, 'AR', [
        { code: ERROR_CODES.internalError, location: 'MSH', text: `the message is larger than HL7_MAX_MESSAGE_BYTES (${opts.maxMessageBytes} bytes)` },
      ]);
    },
  });
  // Senders keep MLLP connections open for days: close() ends them (a message whose ACK was not sent is resent by
  // the sender and answered as the original).
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.listen(opts.port, opts.host);
  await Promise.race([
    once(server, 'listening'),
    once(server, 'error').then(([err]) => {
      throw err as Error;
    }),
  ]);
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      }),
  };
}
