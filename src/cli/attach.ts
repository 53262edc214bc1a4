// chunkd attach / detach: ask the node (it runs as root and serves the FUSE files) to mount a volume's file
// system at a directory, or to take it away again.
import path from 'node:path';
import { parseArgs } from 'node:util';
import { validateName } from '../core/names.ts';
import { callApi } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands } from './help.ts';

interface AttachmentReply {
  volume: string;
  mountpoint: string;
  fsType: string;
  via: string;
  loopDevice: string | null;
}

/** chunkd attach VOL --mountpoint DIR [--fs ext4|xfs] [--format] [--via fuse|nbdfuse] */
export async function attachCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.attach.options }));
  const [volume, mountpoint] = parsing(() => {
    if (positionals.length !== 1 || values.mountpoint === undefined) throw new UsageError(`usage: chunkd ${commands.attach.usage[0]}`);
    return [validateName(positionals[0]), path.resolve(values.mountpoint)];
  });
  const body = { mountpoint, fs: values.fs, via: values.via, format: values.format ?? false };
  const reply = (await callApi(apiPath(values.api), 'POST', `/v1/volumes/${encodeURIComponent(volume)}/attach`, body)) as AttachmentReply;
  process.stdout.write(values.json ? `${JSON.stringify(reply, null, 2)}\n` : `attached volume ${reply.volume} at ${reply.mountpoint} (${reply.fsType} on ${reply.loopDevice ?? '?'} via ${reply.via})\n`);
  return 0;
}

/** chunkd detach VOL */
export async function detachCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.detach.options }));
  const volume = parsing(() => {
    if (positionals.length !== 1) throw new UsageError(`usage: chunkd ${commands.detach.usage[0]}`);
    return validateName(positionals[0]);
  });
  await callApi(apiPath(values.api), 'POST', `/v1/volumes/${encodeURIComponent(volume)}/detach`);
  process.stdout.write(values.json ? `${JSON.stringify({ detached: volume })}\n` : `detached volume ${volume}\n`);
  return 0;
}
