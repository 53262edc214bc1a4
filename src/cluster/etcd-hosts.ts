// Which etcd member the client's calls go to. The etcd3 client picks a member at random for every call and sticks
// with it until the call's deadline: with one member of three paused or partitioned (its port accepts connections,
// nothing answers), a third of the calls hang until their deadline, the lease keepalive among them, call after call.
// HostCooldown is the client's per-member fault handling (IOptions.faultHandling.host): a member whose call failed
// the way a member that does not answer fails (deadline exceeded, unavailable, ...) is passed over for `cooldownMs`,
// the client going on to the next member, while another member is not cooling down; with every member cooling down
// (etcd down or the machine too loaded to answer in time), every call goes through as before, so no call is refused
// here that would otherwise have been tried. A member that answers is cleared at once.
import { Stream } from 'node:stream';
import { GRPCUnavailableError, isRecoverableError, type IOptions } from 'etcd3';

export type HostPolicy = NonNullable<NonNullable<IOptions['faultHandling']>['global']>;

/** Thrown instead of calling a member that is cooling down: etcd3 then tries the next member (the call never started). */
export class HostCoolingDown extends Error {}

/** A failure that says the member does not answer (not etcd's answer to the request, such as a failed comparison). */
export function isHostFault(error: unknown): boolean {
  return error instanceof Error && (isRecoverableError(error) || error instanceof GRPCUnavailableError);
}

export class HostCooldown {
  readonly cooldownMs: number;
  readonly #now: () => number;
  /** host -> until when (this.#now()) it is passed over. */
  readonly #coolingUntil = new Map<string, number>();
  readonly #hosts: string[];

  constructor(hosts: string[], cooldownMs: number, now: () => number = () => performance.now()) {
    this.#hosts = [...hosts];
    this.cooldownMs = cooldownMs;
    this.#now = now;
  }

  /** Whether calls pass `host` over now: it is cooling down and another member is not. */
  passesOver(host: string): boolean {
    const now = this.#now();
    const cooling = (name: string) => (this.#coolingUntil.get(name) ?? 0) > now;
    return cooling(host) && this.#hosts.some((other) => other !== host && !cooling(other));
  }

  /** A call to `host` failed with `error`. */
  failed(host: string, error: unknown): void {
    if (isHostFault(error)) this.#coolingUntil.set(host, this.#now() + this.cooldownMs);
  }

  /** A call to `host` was answered. */
  answered(host: string): void {
    this.#coolingUntil.delete(host);
  }

  /**
   * The fault handling for `host`, as etcd3 uses it: `execute` runs each call to the member (and is handed a stream's
   * failure, etcd3's markFailed). (Only `execute` is what etcd3 calls.) A stream opened is no answer yet: its failure
   * comes later, through the same execute.
   */
  policy(host: string): HostPolicy {
    // etcd3 strips the scheme from a host's address; the map is keyed by what it was given.
    const execute = async (fn: (context: { signal: AbortSignal }) => unknown, signal?: AbortSignal): Promise<unknown> => {
      if (this.passesOver(host)) throw new HostCoolingDown(`etcd member ${host} did not answer a call in the last ${this.cooldownMs / 1000} s: passed over`);
      try {
        const value = await fn({ signal: signal ?? new AbortController().signal });
        if (!(value instanceof Stream)) this.answered(host);
        return value;
      } catch (error) {
        this.failed(host, error);
        throw error;
      }
    };
    return { execute } as unknown as HostPolicy;
  }
}
