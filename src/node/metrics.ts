// /metrics in Prometheus text exposition format, from a node's status.
import { softwareVersion } from '../core/version.ts';
import { chunkSizeBytes } from '../core/limits.ts';
import { histogramLines } from '../core/latency-histogram.ts';
import { stages, type StageTimes } from '../store/stage-times.ts';
import { ioOperations, type ExportIoStats } from './io-stats.ts';
import type { NodeStatus } from './node.ts';

/** Renders the node's status and its exports' I/O statistics as Prometheus metrics. */
export function renderMetrics(status: NodeStatus, io: Record<string, ExportIoStats> = {}, stageTimes: StageTimes | null = null): string {
  const lines: string[] = [];
  const metric = (name: string, type: 'gauge' | 'counter', help: string, samples: Array<[labels: string, value: number]>): void => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, value] of samples) lines.push(`${name}${labels} ${value}`);
  };
  metric('chunkd_build_info', 'gauge', 'The chunkd version and the Node.js it runs on; always 1.', [[`{version="${softwareVersion}",nodejs="${process.version}"}`, 1]]);
  metric('chunkd_pool_allocated_bytes', 'gauge', 'Bytes of chunks allocated in the pool.', [['', status.pool.allocatedBytes]]);
  metric('chunkd_pool_chunk_files_bytes', 'gauge', "The pool's chunk files' span: the chunks allocated, those freed and waiting for a commit, and the free chunks kept for reuse.", [['', status.pool.chunkFilesBytes]]);
  metric('chunkd_pool_filesystem_free_bytes', 'gauge', "Free bytes on the pool's file system.", [['', status.pool.fileSystem.freeBytes]]);
  metric('chunkd_pool_journal_bytes', 'gauge', 'Bytes in the current metadata journal.', [['', status.pool.journalBytes]]);
  metric('chunkd_volumes', 'gauge', 'Volumes in the pool.', [['', status.volumes.length]]);
  metric('chunkd_snapshots', 'gauge', 'Snapshots in the pool.', [['', status.pool.snapshotCount]]);
  metric('chunkd_volume_size_bytes', 'gauge', 'Declared size of each volume.', status.volumes.map((v) => [`{volume="${v.name}"}`, v.sizeBytes]));
  metric('chunkd_volume_allocated_bytes', 'gauge', 'Bytes allocated to each volume.', status.volumes.map((v) => [`{volume="${v.name}"}`, v.allocatedBytes]));
  metric('chunkd_nbd_connections_open', 'gauge', 'NBD connections open now.', [['', status.nbd.connectionsOpen]]);
  metric('chunkd_nbd_connections_total', 'counter', 'NBD connections accepted.', [['', status.nbd.connectionsTotal]]);
  metric('chunkd_nbd_requests_total', 'counter', 'NBD requests served.', [['', status.nbd.requestsTotal]]);
  metric('chunkd_nbd_idle_polls_total', 'counter', 'Idle waits for a client\'s next request polled (serve --poll-us): hit, the request came within the poll; miss, it did not.', [['{result="hit"}', status.nbd.idlePoll.hits], ['{result="miss"}', status.nbd.idlePoll.misses]]);
  metric('chunkd_nbd_idle_poll_seconds_total', 'counter', 'Time spent polling for clients\' next requests (serve --poll-us).', [['', status.nbd.idlePoll.microseconds / 1e6]]);
  metric('chunkd_nbd_request_errors_total', 'counter', 'NBD requests answered with an error.', [['', status.nbd.requestErrorsTotal]]);
  metric('chunkd_pool_failed', 'gauge', 'Whether the pool refuses writes after a failed sync or metadata write (1), until the node restarts.', [['', status.pool.failure === null ? 0 : 1]]);
  metric('chunkd_pool_commit_failures_total', 'counter', 'Metadata commits (flush, FUA, background) that failed.', [['', status.pool.commitFailuresTotal]]);
  metric('chunkd_pool_writes_held_for_freed_space_total', 'counter', 'Writes that waited for the commit under way before taking chunks, while the chunks freed by overwrites and not yet reusable were past their bound (the disk writes back slower than the writes come).', [['', status.pool.writesHeldForFreedSpaceTotal]]);
  metric('chunkd_pool_free_chunks_given_back_bytes_total', 'counter', 'Free chunks punched out of the pool\'s files, while the node runs, because the metadata met a full file system.', [['', status.pool.freeChunksGivenBackBytesTotal]]);
  metric('chunkd_metadata_repairs_total', 'counter', 'Damaged or missing metadata copies found at open and repaired from the other copy.', [['', status.pool.metadataRepairsTotal]]);
  metric('chunkd_read_defrag_bytes_total', 'counter', 'Bytes that large reads found scattered in small pieces and rewrote as one run (serve --read-defrag).', [['', status.pool.readDefragBytesTotal]]);
  metric('chunkd_checksum_errors_total', 'counter', 'Reads that found a block not matching its checksum (answered with EIO).', [['', status.pool.checksumErrorsTotal]]);
  metric('chunkd_io_worker_requests_in_flight', 'gauge', 'Chunk I/O tasks each worker thread holds now.', status.io.workers.map((worker) => [`{worker="${worker.id}"}`, worker.inFlight]));
  metric('chunkd_io_requests_queued', 'gauge', 'Chunk I/O tasks waiting for a worker thread.', [['', status.io.queued]]);
  metric('chunkd_io_worker_restarts_total', 'counter', 'Chunk I/O worker threads that died and were replaced.', [['', status.io.workerRestarts]]);
  if (status.peer !== null) {
    metric('chunkd_peer_connections_open', 'gauge', 'Peer port connections open now.', [['', status.peer.connectionsOpen]]);
    metric('chunkd_peer_connections_refused_total', 'counter', 'Peer port connections refused (TLS failures, names not allowed, stalls, over the limit).', [['', status.peer.refusedTotal]]);
    metric('chunkd_peer_requests_total', 'counter', 'Requests served on the peer port.', [['', status.peer.requestsTotal]]);
  }
  const links = status.replication.replicas;
  const link = (r: (typeof links)[number]): string => `{volume="${r.volume}",peer="${r.peer}"}`;
  if (links.length > 0) {
    metric('chunkd_replica_lag_seconds', 'gauge', 'Seconds a replica is behind its volume here (since its last replicated point was taken); -1 before the first.', links.map((r) => [link(r), r.lagSeconds === null ? -1 : Number(r.lagSeconds.toFixed(3))]));
    metric('chunkd_replica_bytes_pending', 'gauge', 'Bytes of changed extents not yet on the replica.', links.map((r) => [link(r), r.bytesPending]));
    metric('chunkd_replica_stream_bytes_sent_total', 'counter', 'Stream bytes sent to the replica.', links.map((r) => [link(r), r.streamBytesSentTotal]));
    metric('chunkd_replica_cycles_total', 'counter', 'Replication cycles run (each sends an increment, resumes one, or finds the replica current).', links.map((r) => [link(r), r.cyclesTotal]));
    metric('chunkd_replica_cycle_failures_total', 'counter', 'Replication cycles that failed (retried).', links.map((r) => [link(r), r.cycleFailuresTotal]));
    metric('chunkd_replica_up', 'gauge', 'Whether the last replication cycle succeeded (1) or failed (0).', links.map((r) => [link(r), r.lastError === null ? 1 : 0]));
  }
  const syncLinks = status.replication.syncReplicas;
  if (syncLinks.length > 0) {
    const label = (r: (typeof syncLinks)[number]): string => `{volume="${r.volume}",peer="${r.peer}"}`;
    metric('chunkd_sync_replica_in_sync', 'gauge', 'Whether a synchronous replica is in sync (1: every acknowledged write is on it) or not (0).', syncLinks.map((r) => [label(r), r.state === 'in-sync' ? 1 : 0]));
    metric('chunkd_sync_replica_dirty_bytes', 'gauge', 'Bytes of regions a synchronous replica may lack (its dirty map), resent by the next resync.', syncLinks.map((r) => [label(r), r.dirtyBytes]));
    metric('chunkd_sync_replica_resync_copied_bytes', 'gauge', 'Bytes of dirty regions the resync under way has copied (0 when none runs).', syncLinks.map((r) => [label(r), r.resync?.copiedBytes ?? 0]));
    metric('chunkd_sync_replica_resync_total_bytes', 'gauge', 'Bytes of dirty regions the resync under way has to copy (0 when none runs).', syncLinks.map((r) => [label(r), r.resync?.totalBytes ?? 0]));
    metric('chunkd_sync_replica_resync_bytes_total', 'counter', 'Data bytes resyncs sent to a synchronous replica.', syncLinks.map((r) => [label(r), r.resyncBytesTotal]));
    metric('chunkd_sync_replica_out_of_sync_total', 'counter', 'Times a synchronous replica went out of sync.', syncLinks.map((r) => [label(r), r.outOfSyncTotal]));
    metric('chunkd_sync_replica_damaged_blocks', 'gauge', 'Blocks damaged here with no in-sync copy to repair them from, at which the resync to this replica stopped (it is out of sync until a write replaces them).', syncLinks.map((r) => [label(r), r.damagedBlocks.reduce((sum, range) => sum + range.lengthBytes / chunkSizeBytes, 0)]));
    metric('chunkd_sync_replica_damaged_blocks_total', 'counter', 'Damaged blocks with no in-sync copy that resyncs to this replica found.', syncLinks.map((r) => [label(r), r.damagedBlocksTotal]));
    metric('chunkd_sync_replica_read_repairs_total', 'counter', 'Blocks that failed their checksum here and were repaired from the synchronous replica.', syncLinks.map((r) => [label(r), r.readRepairsTotal]));
  }
  metric('chunkd_checkpoints_total', 'counter', 'Metadata checkpoints written since the node started (a full journal, or POST /v1/checkpoint).', [['', status.pool.checkpointsTotal]]);
  metric('chunkd_checkpoint_bytes', 'gauge', 'Size of the newest metadata checkpoint written since the node started (0 before one).', [['', status.pool.lastCheckpoint?.bytes ?? 0]]);
  metric('chunkd_checkpoint_encode_seconds_max', 'gauge', 'The longest a checkpoint held the event loop to encode the metadata, since the node started.', [['', status.pool.checkpointEncodeSecondsMax]]);
  metric('chunkd_event_loop_delay_max_seconds', 'gauge', 'The longest pause of the event loop since the node started (resolution 10 ms).', [['', status.eventLoopDelayMaxSeconds]]);
  const pause = status.eventLoopLongestPause ?? null;
  metric(
    'chunkd_event_loop_longest_pause_seconds',
    'gauge',
    'The longest gap between two ticks of a 10 ms timer on the main thread since the node started, and how it was spent: on_cpu (the thread ran), run_queue (it waited for a CPU: other threads or processes had the cores), elsewhere (blocked or idle); gc: V8\'s collections within it (part of the others); gc_full: the full collections among them; other_threads_cpu: the CPU the process\'s other threads took within it (not a part of it: up to the CPUs\' count times the gap).',
    pause === null ? [] : [['{part="gap"}', pause.gapSeconds], ['{part="on_cpu"}', pause.onCpuSeconds], ...(pause.runQueueSeconds === null ? [] : [['{part="run_queue"}', pause.runQueueSeconds] as [string, number]]), ['{part="elsewhere"}', pause.elsewhereSeconds], ['{part="gc"}', pause.gcSeconds], ['{part="gc_full"}', pause.majorGcSeconds], ['{part="other_threads_cpu"}', pause.otherThreadsCpuSeconds]],
  );
  metric('chunkd_event_loop_utilization', 'gauge', 'Event loop utilisation since the previous scrape.', [['', status.eventLoopUtilization]]);
  // Per export (a volume, or VOL@SNAP) and operation, as every front end's requests reach the device (io-stats.ts).
  const exports = Object.entries(io);
  const byOperation = (pick: (stats: ExportIoStats[keyof ExportIoStats]) => number): Array<[string, number]> =>
    exports.flatMap(([name, stats]) => ioOperations.map((op): [string, number] => [`{volume="${name}",op="${op}"}`, pick(stats[op])]));
  metric('chunkd_volume_requests_total', 'counter', 'Requests each volume (or VOL@SNAP export) served, by operation, from every front end.', byOperation((s) => s.count));
  metric('chunkd_volume_bytes_total', 'counter', 'Bytes read, written, trimmed or zeroed, by volume and operation.', byOperation((s) => s.bytes));
  metric('chunkd_volume_errors_total', 'counter', 'Requests answered with an error, by volume and operation.', byOperation((s) => s.errors));
  metric('chunkd_volume_requests_in_flight', 'gauge', 'Requests at each volume\'s device now (its queue depth), by operation.', byOperation((s) => s.inFlight));
  lines.push('# HELP chunkd_volume_request_seconds Latency of requests at the device (lock wait, chunk I/O, commit for flush and FUA), by volume and operation.', '# TYPE chunkd_volume_request_seconds histogram');
  for (const [name, stats] of exports) for (const op of ioOperations) lines.push(...histogramLines('chunkd_volume_request_seconds', `volume="${name}",op="${op}"`, stats[op]));
  if (stageTimes !== null) {
    lines.push(
      '# HELP chunkd_stage_seconds Time requests spent in each stage, node-wide, in the order a request meets them: receive (an NBD WRITE payload arriving), worker_wait (a chunk task waiting for a worker thread), chunk I/O (reads with their checksum checks, writes of fresh runs, zeroing; on this thread, libuv\'s pool or the workers), commit (the metadata commits FLUSH and FUA wait for), reply (an NBD reply on its way to the kernel).',
      '# TYPE chunkd_stage_seconds histogram',
    );
    for (const stage of stages) lines.push(...histogramLines('chunkd_stage_seconds', `stage="${stage}"`, stageTimes[stage]));
  }
  // The process and its runtime.
  const memory = process.memoryUsage();
  const cpu = process.cpuUsage();
  metric('process_cpu_seconds_total', 'counter', 'User and system CPU time of the node process.', [['', (cpu.user + cpu.system) / 1e6]]);
  metric('process_resident_memory_bytes', 'gauge', 'Resident memory of the node process.', [['', memory.rss]]);
  metric('process_start_time_seconds', 'gauge', 'When the node process started, seconds since the epoch.', [['', Math.round(Date.now() / 1000 - process.uptime())]]);
  metric('nodejs_heap_used_bytes', 'gauge', "V8's heap in use.", [['', memory.heapUsed]]);
  metric('nodejs_external_memory_bytes', 'gauge', 'Memory of buffers and other objects outside the V8 heap.', [['', memory.external + memory.arrayBuffers]]);
  return `${lines.join('\n')}\n`;
}
