// The fixed newstyle handshake as a state machine over an InputQueue, with no socket in it: the connection
// feeds bytes and sends what each step returns; the fuzz test drives it the same way.
//
//   greeting sent ──► client-flags ──► options ─┬─ EXPORT_NAME ok ──────────► transmission
//                                               ├─ GO ok (INFO replies, ACK) ► transmission
//                                               ├─ ABORT (ACK) ─────────────► abort (close after sending)
//                                               ├─ EXPORT_NAME unknown ─────► close (spec: must terminate)
//                                               ├─ STARTTLS (ACK) ──────────► starttls: the connection runs
//                                               │    the TLS handshake, calls tlsStarted(), and options go on
//                                               │    inside TLS with nothing negotiated before it kept
//                                               └─ anything else: replies ──► options
//
// TLS (tls.ts has the modes): with `off`, STARTTLS is unsupported. With `on` or `require` it is acknowledged once;
// a second one, or one with data, is NBD_REP_ERR_INVALID. With `require`, until TLS is up every option but
// STARTTLS and ABORT is NBD_REP_ERR_TLS_REQD, and EXPORT_NAME (which cannot be refused) closes the connection.
//
// A malformed stream (bad magic, unknown client flags, an option too long, too many options) throws
// ChunkdError EPROTO and the connection closes. Malformed option *data* is answered NBD_REP_ERR_INVALID and the
// handshake goes on, since the option framing itself is intact. Errors from the DeviceProvider become option
// errors (NBD_REP_ERR_UNKNOWN...), system errors too; anything else is a bug and propagates.
import { assert } from '../core/assert.ts';
import { ChunkdError, fromSystemError } from '../core/errors.ts';
import type { BlockDevice, DeviceProvider } from '../core/block-device.ts';
import { optionsPerHandshakeMax, preferredBlockBytes, requestBytesMax } from '../core/limits.ts';
import type { InputQueue } from './input-queue.ts';
import {
  NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_DESCRIPTION, NBD_INFO_NAME, NBD_META_CONTEXT_BASE_ALLOCATION, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, clientFlagsBytes, decodeClientFlags, decodeOption, encodeExportNameReply, encodeInfoBlockSize,
  encodeInfoDescription, encodeInfoExport, encodeInfoName, encodeMetaContextReply, encodeOptionError,
  encodeOptionReply, encodeServerReply, optionHeaderBytes, parseExportNameData, parseInfoRequest,
  parseMetaContextRequest,
} from './protocol.ts';
import type { ClientOption } from './protocol.ts';
import type { TlsMode } from './tls.ts';

/** The context ID this server gives base:allocation (any nonzero value would do; IDs are per connection). */
export const baseAllocationContextId = 1;

/** What the handshake negotiated, handed to the transmission phase. */
export interface Session {
  device: BlockDevice;
  exportName: string;
  structuredReplies: boolean;
  /** baseAllocationContextId when the client selected base:allocation for this export, else 0. */
  metaContextId: number;
  transmissionFlags: number;
}

export type HandshakeStep =
  /** The next message is not complete yet. */
  | { kind: 'need-more' }
  /** A message was handled; send `output` and go on. */
  | { kind: 'continue'; output: Buffer[] }
  /** The client sent NBD_OPT_ABORT: send `output`, then close. */
  | { kind: 'abort'; output: Buffer[] }
  /** The session must end without a reply (NBD_OPT_EXPORT_NAME of an export that cannot be opened). */
  | { kind: 'close'; reason: string }
  /** Send `output`; the transmission phase starts with the next byte. The caller now owns session.device. */
  | { kind: 'transmission'; output: Buffer[]; session: Session }
  /** Send `output` (the ACK to NBD_OPT_STARTTLS); the next bytes are the TLS handshake; then call tlsStarted(). */
  | { kind: 'starttls'; output: Buffer[] };

/**
 * The transmission flags for an export: everything this server does. A read-only export does not offer TRIM
 * and WRITE_ZEROES (as qemu-nbd and nbdkit do; a client sending them anyway gets EPERM); SEND_DF only with
 * structured replies (spec).
 */
export function transmissionFlagsFor(readOnly: boolean, structuredReplies: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
  if (readOnly) flags |= NBD_FLAG_READ_ONLY;
  else flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  return flags;
}

export class Handshake {
  readonly #provider: DeviceProvider;
  readonly #tlsMode: TlsMode;
  /** TLS is up: options now arrive inside it. */
  #tlsActive = false;
  #state: 'client-flags' | 'options' = 'client-flags';
  #noZeroes = false;
  #structuredReplies = false;
  /** The export named by the last NBD_OPT_SET_META_CONTEXT that selected base:allocation, or null. */
  #metaContextExport: string | null = null;
  #optionCount = 0;

  constructor(provider: DeviceProvider, tlsMode: TlsMode = 'off') {
    this.#provider = provider;
    this.#tlsMode = tlsMode;
  }

  /** Whether the options are now negotiated inside TLS. */
  get tlsActive(): boolean {
    return this.#tlsActive;
  }

  /** The TLS handshake after a 'starttls' step succeeded: what was negotiated before it is forgotten (spec). */
  tlsStarted(): void {
    assert(this.#tlsMode !== 'off' && !this.#tlsActive, 'TLS starts once, and only when offered');
    this.#tlsActive = true;
    this.#structuredReplies = false;
    this.#metaContextExport = null;
  }

  /** Handles the next complete message in `input`, consuming it; see HandshakeStep for what comes back. */
  async next(input: InputQueue): Promise<HandshakeStep> {
    if (this.#state === 'client-flags') {
      const view = input.contiguous(clientFlagsBytes);
      if (view === null) return { kind: 'need-more' };
      const decoded = decodeClientFlags(view.buffer, view.offset);
      if (!decoded.done) return { kind: 'need-more' };
      input.skip(decoded.bytesConsumed);
      // A client without NBD_FLAG_C_FIXED_NEWSTYLE is served fixed newstyle anyway (the spec allows it): for one
      // that only sends NBD_OPT_EXPORT_NAME there is no difference.
      this.#noZeroes = decoded.value.noZeroes;
      this.#state = 'options';
      return { kind: 'continue', output: [] };
    }
    const head = input.contiguous(optionHeaderBytes);
    if (head === null) return { kind: 'need-more' };
    let decoded = decodeOption(head.buffer, head.offset);
    if (!decoded.done) {
      const whole = input.contiguous(decoded.bytesNeeded);
      if (whole === null) return { kind: 'need-more' };
      decoded = decodeOption(whole.buffer, whole.offset);
      assert(decoded.done, 'a whole option decodes');
    }
    input.skip(decoded.bytesConsumed);
    this.#optionCount += 1;
    if (this.#optionCount > optionsPerHandshakeMax) {
      throw ChunkdError.protocol(`more than ${optionsPerHandshakeMax} options in one handshake`);
    }
    return await this.#handleOption(decoded.value);
  }

  async #handleOption({ option, data }: ClientOption): Promise<HandshakeStep> {
    if (option === NBD_OPT_STARTTLS && this.#tlsMode !== 'off') return this.#startTls(data);
    if (this.#tlsMode === 'require' && !this.#tlsActive && option !== NBD_OPT_ABORT) {
      if (option === NBD_OPT_EXPORT_NAME) return { kind: 'close', reason: 'NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and this server requires TLS' };
      return reply(encodeOptionError(option, NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first'));
    }
    switch (option) {
      case NBD_OPT_EXPORT_NAME:
        return await this.#exportName(data);
      case NBD_OPT_ABORT:
        return { kind: 'abort', output: [encodeOptionReply(option, NBD_REP_ACK)] };
      case NBD_OPT_LIST:
        return this.#list(option, data);
      case NBD_OPT_INFO:
      case NBD_OPT_GO:
        return await this.#infoOrGo(option, data);
      case NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return reply(encodeOptionError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data'));
        this.#structuredReplies = true;
        return reply(encodeOptionReply(option, NBD_REP_ACK));
      case NBD_OPT_LIST_META_CONTEXT:
      case NBD_OPT_SET_META_CONTEXT:
        return this.#metaContext(option, data);
      default:
        // NBD_OPT_STARTTLS lands here when TLS is off (NOTLS mode).
        return reply(encodeOptionError(option, NBD_REP_ERR_UNSUP, `option ${option} is not supported`));
    }
  }

  #startTls(data: Buffer): HandshakeStep {
    const option = NBD_OPT_STARTTLS;
    if (this.#tlsActive) return reply(encodeOptionError(option, NBD_REP_ERR_INVALID, 'TLS is already on'));
    if (data.length !== 0) return reply(encodeOptionError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data'));
    return { kind: 'starttls', output: [encodeOptionReply(option, NBD_REP_ACK)] };
  }

  async #exportName(data: Buffer): Promise<HandshakeStep> {
    // This option cannot be answered with an error: a malformed name ends the session (EPROTO propagates).
    const exportName = parseExportNameData(data);
    const opened = await this.#open(exportName);
    if ('error' in opened) return { kind: 'close', reason: `export ${JSON.stringify(exportName)}: ${opened.error.message}` };
    const session = this.#session(opened.device, exportName);
    const output = [encodeExportNameReply(opened.device.sizeBytes, session.transmissionFlags, this.#noZeroes)];
    return { kind: 'transmission', output, session };
  }

  #list(option: number, data: Buffer): HandshakeStep {
    if (data.length !== 0) return reply(encodeOptionError(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data'));
    const output = this.#provider.list().map(({ name, description }) => encodeServerReply(option, name, description));
    output.push(encodeOptionReply(option, NBD_REP_ACK));
    return { kind: 'continue', output };
  }

  async #infoOrGo(option: number, data: Buffer): Promise<HandshakeStep> {
    let request;
    try {
      request = parseInfoRequest(data);
    } catch (error) {
      return reply(invalid(option, error));
    }
    const opened = await this.#open(request.exportName);
    if ('error' in opened) return reply(encodeOptionError(option, opened.replyType, opened.error.message));
    const { device } = opened;
    const session = this.#session(device, request.exportName);
    // NBD_INFO_EXPORT always (qemu needs it unasked); BLOCK_SIZE always, since our maximum is not the default.
    const output = [encodeInfoExport(option, device.sizeBytes, session.transmissionFlags)];
    if (request.infoTypes.includes(NBD_INFO_NAME)) output.push(encodeInfoName(option, device.name));
    if (request.infoTypes.includes(NBD_INFO_DESCRIPTION)) {
      const description = this.#provider.list().find((entry) => entry.name === device.name)?.description ?? '';
      if (description !== '') output.push(encodeInfoDescription(option, description));
    }
    output.push(encodeInfoBlockSize(option, 1, preferredBlockBytes, Math.min(requestBytesMax, 0xffffffff)));
    output.push(encodeOptionReply(option, NBD_REP_ACK));
    if (option === NBD_OPT_GO) return { kind: 'transmission', output, session };
    await device.close();
    return { kind: 'continue', output };
  }

  #metaContext(option: number, data: Buffer): HandshakeStep {
    // SET replaces the selection even when it fails (spec), so forget the old one first.
    if (option === NBD_OPT_SET_META_CONTEXT) this.#metaContextExport = null;
    if (!this.#structuredReplies) {
      return reply(encodeOptionError(option, NBD_REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first'));
    }
    let request;
    try {
      request = parseMetaContextRequest(data);
    } catch (error) {
      return reply(invalid(option, error));
    }
    const listing = option === NBD_OPT_LIST_META_CONTEXT;
    // "base:" is a wildcard when listing and selects nothing when setting; unknown namespaces and leaves are
    // ignored, as the spec requires. No query at all lists everything and selects nothing.
    const matches = listing && request.queries.length === 0 ||
      request.queries.some((query) => query === NBD_META_CONTEXT_BASE_ALLOCATION || (listing && query === 'base:'));
    const output: Buffer[] = [];
    if (matches) {
      // Context IDs in a LIST reply are reserved and SHOULD be zero.
      output.push(encodeMetaContextReply(option, listing ? 0 : baseAllocationContextId, NBD_META_CONTEXT_BASE_ALLOCATION));
      if (!listing) this.#metaContextExport = request.exportName;
    }
    output.push(encodeOptionReply(option, NBD_REP_ACK));
    return { kind: 'continue', output };
  }

  #session(device: BlockDevice, exportName: string): Session {
    return {
      device,
      exportName,
      structuredReplies: this.#structuredReplies,
      // A context selected for another export name does not carry over (spec: same name for SET and GO).
      metaContextId: this.#structuredReplies && this.#metaContextExport === exportName ? baseAllocationContextId : 0,
      transmissionFlags: transmissionFlagsFor(device.readOnly, this.#structuredReplies),
    };
  }

  async #open(exportName: string): Promise<{ device: BlockDevice } | { error: ChunkdError; replyType: number }> {
    try {
      return { device: await this.#provider.open(exportName) };
    } catch (error) {
      const failure = fromSystemError(error, `opening export ${JSON.stringify(exportName)}`); // a bug is rethrown
      return { error: failure, replyType: failure.code === 'ESHUTDOWN' ? NBD_REP_ERR_SHUTDOWN : NBD_REP_ERR_UNKNOWN };
    }
  }
}

function reply(buffer: Buffer): HandshakeStep {
  return { kind: 'continue', output: [buffer] };
}

/** NBD_REP_ERR_INVALID for option data a parser refused; only our own protocol error is expected here. */
function invalid(option: number, error: unknown): Buffer {
  if (!(error instanceof ChunkdError) || error.code !== 'EPROTO') throw error;
  return encodeOptionError(option, NBD_REP_ERR_INVALID, error.message);
}
