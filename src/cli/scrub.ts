// chunkd scrub VOL | --all: asks the node to read and check every chunk of the volumes and their snapshots,
// shows a progress bar while it runs (on a terminal), then one line per damaged extent and a summary.
// Exit 0 when everything checked is intact, 1 when any extent is damaged (or the scrub failed).
import { parseArgs } from 'node:util';
import cliProgress from 'cli-progress';
import { validateName } from '../core/names.ts';
import { formatSize } from '../core/units.ts';
import type { VolumeInfo } from '../store/pool.ts';
import type { ScrubReport } from '../store/scrub.ts';
import type { ScrubWithReplicas } from '../replication/sync-replicas.ts';
import { callApi } from './api-client.ts';
import { parsing, UsageError } from './errors.ts';
import { commands } from './help.ts';

export async function scrubCommand(argv: string[], apiPath: (option: string | undefined) => string): Promise<number> {
  const { values, positionals } = parsing(() => parseArgs({ args: argv, allowPositionals: true, options: commands.scrub.options }));
  const socket = apiPath(values.api);
  const named = parsing(() => {
    if ((values.all === true) === (positionals.length > 0) || positionals.length > 1) throw new UsageError('usage: chunkd scrub VOL | --all [--json]');
    return values.all === true ? null : validateName(positionals[0]);
  });
  const volumes = named === null ? ((await callApi(socket, 'GET', '/v1/volumes')) as { volumes: VolumeInfo[] }).volumes.map((volume) => volume.name) : [named];
  const reports: ScrubReport[] = [];
  for (const volume of volumes) reports.push(await scrubOne(socket, volume, values.json !== true && process.stderr.isTTY === true));
  const badExtents = reports.flatMap((report) => report.badExtents);
  if (values.json === true) {
    process.stdout.write(`${JSON.stringify(values.all === true ? reports : reports[0], null, 2)}\n`);
  } else {
    const lines = badExtents.map((extent) => `bad extent: ${extent.export} offset ${extent.offsetBytes} length ${extent.lengthBytes}`);
    for (const report of reports as ScrubWithReplicas[]) {
      for (const extent of report.repairedExtents ?? []) lines.push(`repaired from a synchronous replica: ${extent.export} offset ${extent.offsetBytes} length ${extent.lengthBytes}`);
      for (const replica of report.replicas ?? []) {
        lines.push(`synchronous replica ${replica.peerName ?? '?'} (${replica.peer}): ${formatSize(replica.comparedBytes)} compared by checksum, ${replica.differingExtents.length === 0 ? 'the same' : `${replica.differingExtents.length} extent(s) differ: out of sync, resynced`}${replica.error === undefined ? '' : `; stopped: ${replica.error}`}`);
      }
    }
    for (const report of reports) {
      lines.push(
        `scrub of ${report.volume}: ${formatSize(report.checkedBytes)} (${report.checkedBytes} bytes) checked across ${report.exports.length} export(s); ` +
          (report.badExtents.length === 0 ? 'no damage found' : `${report.badChunks} damaged 4 KiB chunk(s) in ${report.badExtents.length} extent(s)`),
      );
    }
    if (reports.length === 0) lines.push('no volumes to scrub');
    process.stdout.write(`${lines.join('\n')}\n`);
  }
  return badExtents.length === 0 ? 0 : 1;
}

async function scrubOne(socket: string, volume: string, showProgress: boolean): Promise<ScrubReport> {
  const bar = showProgress
    ? new cliProgress.SingleBar({ format: `scrub ${volume} [{bar}] {percentage}% | {done} of {total} | ETA {eta_formatted}`, hideCursor: true, stream: process.stderr }, cliProgress.Presets.shades_classic)
    : null;
  let started = false;
  try {
    const result = (await callApi(socket, 'POST', `/v1/volumes/${encodeURIComponent(volume)}/scrub`, undefined, (line) => {
      const progress = (line as { progress?: { doneBytes: number; totalBytes: number } }).progress;
      if (progress === undefined || bar === null) return;
      const payload = { done: formatSize(progress.doneBytes), total: formatSize(progress.totalBytes) };
      if (!started) {
        bar.start(progress.totalBytes, progress.doneBytes, payload);
        started = true;
      } else bar.update(progress.doneBytes, payload);
    })) as { report: ScrubReport };
    return result.report;
  } finally {
    if (started) bar?.stop();
  }
}
