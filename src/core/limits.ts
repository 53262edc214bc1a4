// Every limit of the node in one place; those that depend on each other are derived here.

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/** The unit of allocation, mapping and checksumming in the pool. */
export const chunkSizeBytes = 4 * KiB;
/** Volume sizes are whole chunks, so a volume's last chunk is never partly outside it. */
export const volumeSizeAlignBytes = chunkSizeBytes;
/** Largest volume: 2^53 bytes would lose integer precision; 1 PiB leaves room in every offset sum. */
export const volumeSizeMaxBytes = 1024 * TiB;

/** Chunks per chunk file: 1 GiB files keep the count of open descriptors small and each file far below any FS limit. */
export const chunksPerFile = (1 * GiB) / chunkSizeBytes;
/** Open chunk files cached (lru-cache); past this the least recently used descriptor is closed. */
export const openChunkFilesMax = 256;

/** Chunks per page of a volume's map: a page covers 2 MiB of a volume and is allocated on first write. */
export const mapPageChunks = 512;

/** Largest NBD read or write payload; also the NBD_INFO_BLOCK_SIZE maximum we advertise. */
export const requestBytesMax = 32 * MiB;
/**
 * Where small requests end. A small payload is copied out of the connection's socket read window rather than
 * read into a buffer of its own, sits in a slot of the shared slab rather than a SharedArrayBuffer of its own,
 * is allocated by Node rather than kept in a free list (nbd/buffer-pool.ts), and its chunk I/O runs on the
 * calling thread rather than a worker. One boundary for all four, because each is the same trade: below it a
 * hand-off or a buffer kept aside costs more than moving the bytes, above it the bytes cost more. 64 KiB is
 * also what Node reads from a socket at once.
 */
export const smallRequestBytesMax = 64 * KiB;
/** Largest TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS range (no payload travels, so it can be large). */
export const rangeRequestBytesMax = 4 * GiB - chunkSizeBytes;
/** Preferred NBD block size advertised to clients. */
export const preferredBlockBytes = chunkSizeBytes;
/** Requests in flight per NBD connection; past this the connection stops reading from its socket. */
export const requestsInFlightPerConnectionMax = 128;
/** Payload bytes in flight per connection; bounds memory held by one client. */
export const bytesInFlightPerConnectionMax = 4 * requestBytesMax;
/** NBD connections served at once; one past it is closed at accept. */
export const connectionsMax = 1024;
/** Bytes one handshake option may carry: names are 64 bytes, so 64 KiB is generous, and bounds memory. */
export const optionBytesMax = 64 * KiB;
/** Options one connection may send before NBD_OPT_GO; ends a client that loops forever in the handshake. */
export const optionsPerHandshakeMax = 1024;
/** Extents one BLOCK_STATUS reply may carry. */
export const blockStatusExtentsMax = 4096;
/** Time a client may take to finish the handshake. */
export const handshakeTimeoutMs = 30_000;
/**
 * Over TLS, the most reply bytes one socket write takes (nbd/reply-queue.ts): a TLS write is encrypted whole
 * before any of it is sent, so smaller writes let encryption and the client's reading overlap; much smaller
 * ones cost a write each for little.
 */
export const tlsReplySliceBytes = 256 * KiB;
/**
 * Over TLS, the largest reply piece that shares a socket write with others: Node's TLS socket copies a write of
 * several buffers into one before encrypting it, so large pieces are written alone (nbd/reply-queue.ts). One TLS
 * record's worth: 4 KiB reads' replies still go out many to a write.
 */
export const tlsReplyJoinBytes = 16 * KiB;
/**
 * The send buffer asked for on an NBD connection over TLS on a unix socket (SO_SNDBUF; Linux caps the request
 * at net.core.wmem_max, then doubles it; TCP sizes its own). It holds encrypted slices for the client to read
 * while the next is encrypted; the default (208 KiB) holds less than one.
 */
export const tlsSendBufferBytes = 2 * MiB;
/**
 * The send buffer asked for on a plain NBD connection on a unix socket once it is in transmission (the same
 * cap and doubling apply). With the default (208 KiB) a 1 MiB READ reply left in five writes, each after the
 * event loop woke for the client's reading (about 10 epoll waits per reply); with 8 MiB granted, the replies of
 * a queue of eight 1 MiB reads go out in one writev: 13% less CPU per GB on 1 MiB reads at QD8 (BENCHMARKS.md,
 * issue 19). Where net.core.wmem_max is the usual 208 KiB the kernel grants no more than that.
 */
export const plainSendBufferBytes = 4 * MiB;
/**
 * A plain connection's READ reply of at least this many bytes is written as soon as its data is in, not corked
 * until the end of the turn, and the connection takes its next request only in the next turn (connection.ts):
 * so the socket copies bytes still in the CPU's caches. Smaller replies are cheap to copy cold and gain more
 * from sharing one writev.
 */
export const hotReplyBytesMin = 256 * KiB;
/** Time a closing NBD connection has to flush its last replies before it is cut (a client that stopped reading). */
export const connectionCloseGraceMs = 10_000;

/** Journal size that triggers a checkpoint of the metadata at the next flush. */
export const journalCheckpointBytes = 64 * MiB;
/**
 * The same for a pool of paged metadata: its checkpoint writes only the pages changed, so it can come often, and
 * a start after a crash replays up to a journal of records through the map passes (3 to 8 us of CPU a record:
 * 2 MiB is about 51,000 records of 4 KiB writes), so a shorter journal is what keeps that start short; each
 * checkpoint writes the leaves dirtied since the last, so a shorter one also writes more metadata per data
 * written (paged-metadata.md, "The journal's size, and a start after a crash").
 */
export const pagedJournalCheckpointBytes = 2 * MiB;
/** The paged metadata's cache of clean pages (serve --metadata-cache), for a pool of paged metadata (paged-metadata.md). */
export const metadataCacheBytesDefault = 256 * MiB;
/**
 * Paged metadata: the map nodes changed since the last checkpoint start one once they hold the cache's size, but
 * never below this (a cache of a few pages, as in tests, would otherwise checkpoint every few writes).
 */
export const metadataDirtyBytesMin = 16 * MiB;
/**
 * Paged metadata: the map nodes changed since the last checkpoint also start one once they are this many, whatever
 * the cache's size: a crash leaves up to about twice this many for the next start to read and replay, one page
 * read a node (paged-metadata.md, "A crashed start at every size"). 8,192 rather than 2,048: with 2,048, random
 * writes over a map of a few thousand leaves (a 4 GiB volume written whole) checkpointed every few thousand writes
 * and cost 85 to 94 us of CPU and 7.7 KB of page file written per 4 KiB write, against 24 to 34 us and 0.44 KB.
 */
export const metadataReplayPagesMax = 8192;
/**
 * Paged metadata: what a replay after a crash costs, estimated from what the records since the last checkpoint
 * did (paged-catalog.ts's `replayCostUs`), in microseconds of one CPU on a quiet machine (measured in process with
 * bench/paged-replay.ts over 4 GiB at random into 64 GiB, and with 25 and 100 snapshots along 1 and 4 GiB into 1 TiB:
 * paged-metadata.md, "A crashed start bounded by its cost"): a record read, decoded and applied in its batch; a
 * page read, checked, decoded and copied (a map node changed, a page of counts changed); a reference count changed
 * (most of them from the copy of a leaf a snapshot shares: it counts up each chunk the leaf names).
 */
export const replayCostRecordUs = 6;
export const replayCostPageUs = 40;
export const replayCostCountChangeUs = 0.4;
/**
 * Paged metadata: a checkpoint starts once the replay a crash would leave is estimated at this (`replayCostUs`),
 * whatever the journal's size and the dirty nodes' count: about what a full journal (2 MiB, about 51,000 records)
 * costs over a map of some 6,500 leaves (4 GiB written at random), so that no crash leaves more than that, with
 * snapshots too (the copies of shared leaves made a crash after 100 snapshots cost 2 to 3 times it). A crash
 * leaves up to about twice it (the interval being written and the next). Not lower: 350,000 started 25
 * checkpoints where this starts 15 over 4 GiB at random and cost about 15 % more CPU a write (paged-metadata.md,
 * "A crashed start bounded by its cost").
 */
export const metadataReplayCostMaxUs = 550_000;
/** Journal space reserved ahead (zero-filled) so that a full file system cannot stop a metadata commit. */
export const journalReserveBytes = 4 * MiB;
/** Unflushed writes are committed in the background at least this often, as a file system's commit interval. */
export const backgroundCommitIntervalMs = 5_000;

/** Shared-memory request buffers (shared-buffers.ts): a slot holds a small request with room for its reply header. */
export const sharedSlotBytes = smallRequestBytesMax + 64;
/** Slots in the slab: 32 requests in flight on each of 64 connections; past that, buffers of their own. */
export const sharedSlotCount = 2048;
/** Larger shared buffers kept for reuse, in bytes: a few maximal requests per connection on a few connections. */
export const sharedLargeBytesHeldMax = 16 * requestBytesMax;

/** Chunk I/O tasks queued on one worker thread beyond the one it runs: hides the hand-off, keeps the balance. */
export const workerTasksQueuedMax = 3;
/** Reads up to this size are served on the calling thread, not a worker (through libuv's pool when they miss the page cache). */
export const inlineReadBytesMax = smallRequestBytesMax;
/**
 * Larger reads up to this size are served on the calling thread too when the page cache holds all their bytes
 * (one copy and one checksum pass); the rest, and reads that miss the cache, go to a worker.
 */
export const inlineCachedReadBytesMax = MiB;
/**
 * Writes up to this size are checksummed on the calling thread and written through libuv's pool, not a worker:
 * the hand-off to a worker and back cost more CPU than the checksum it moves (1 MiB writes at QD8 on 2 vCPUs:
 * 0.90-1.01 against 1.07-1.21 CPU seconds per GB; BENCHMARKS.md, issue 19). Larger ones go to a worker.
 */
export const inlineWriteBytesMax = MiB;
/** Worker threads at most (serve --workers). */
export const workersMax = 64;
/** serve --poll-us at most: a poll holds its thread's event loop (nbd/idle-poll.ts). */
export const pollUsMax = 1000;

/** Chunks freed but not yet reusable (they wait for a commit) that trigger a commit. */
export const deferredChunksCommitMax = (256 * MiB) / chunkSizeBytes;
/**
 * Writes wait for the commit under way once the chunks freed in runs (allocator.ts, `freedRunChunksMin`) and not
 * yet reusable are this many times deferredChunksCommitMax (commit-engine.ts): the chunk files' extra space under a
 * stream of large overwrites bounded by about 512 MiB.
 */
export const freedChunksHoldFactor = 2;

/** Volumes in one pool. */
export const volumesMax = 4096;
/** Bytes one management API request body may carry. */
export const apiBodyBytesMax = 64 * KiB;

/** Snapshots one volume may have; reference counts and checkpoints are sized for far more. */
export const snapshotsPerVolumeMax = 4096;

/** Peer port (src/peer): largest frame payload. Sized for replication's data frames to come (a request's worth, 32 MiB, plus its header). */
export const peerFrameBytesMax = requestBytesMax + 64 * KiB;
/** Largest payload of a control frame (hello and the JSON verbs): checked at the header, before the payload is buffered. */
export const peerControlBytesMax = 64 * KiB;
/** Time a peer has from TCP accept to a finished TLS handshake, and again from there to its hello: machines answer fast. */
export const peerHandshakeTimeoutMs = 10_000;
/** Peer connections served at once; one past it is closed at accept. */
export const peerConnectionsMax = 64;
/** Requests in flight on one peer connection; past this the connection stops reading from its socket. */
export const peerRequestsInFlightMax = 32;
/** Time `chunkd peer status` waits for a peer's answer, connect and TLS included. */
export const peerClientTimeoutMs = 15_000;

/**
 * Synchronous replicas (replication/sync-replicas.ts): the unit of the owner's dirty map and activity log. Smaller
 * resends less after an outage, larger keeps the map (rewritten whole) small: 64 KiB is 16 chunks, and 16 Ki
 * regions per GiB.
 */
export const syncRegionBytes = 16 * chunkSizeBytes;
/**
 * The unit of the activity log (regions that may differ after an owner crash): larger than a dirty-map region, as
 * DRBD's 4 MiB activity-log extents, because the state file is written each time an extent enters the log, on
 * the write path; the price is resending a whole extent for each one active at a crash. A multiple of syncRegionBytes.
 */
export const syncActivityExtentBytes = 64 * syncRegionBytes;
/** A synchronous replica that leaves a write or flush unanswered this long is out of sync (replica add --sync-timeout). */
export const syncReplicaTimeoutMsDefault = 5_000;
/**
 * A resync copies runs of adjacent dirty regions of at most this many bytes as one step: one range lock, one
 * checksum read, reads and syncWrites of whole differing runs (1 MiB frames, not 64 KiB: a region at a time ran at
 * about a third of nbdcopy's speed). A multiple of syncRegionBytes dividing syncActivityExtentBytes.
 */
export const syncResyncBatchBytes = 16 * syncRegionBytes;
/** Resync steps (syncResyncBatchBytes each) under way at once: up to 4 MiB of data in flight to the replica. */
export const syncResyncBatchesInFlight = 4;
/**
 * Chunks whose checksums a resync asks a synchronous replica for at once (syncSums; 4 bytes each, about 5.5 KiB of
 * JSON for 1024): 4 MiB of volume, an activity-log extent.
 */
export const syncSumsChunksMax = syncActivityExtentBytes / chunkSizeBytes;
/** Passes over the dirty regions a resync makes while writes go on; what the last one leaves is copied under the write lock. */
export const syncResyncPassesMax = 4;
/** A pass that leaves at most this many regions (4 MiB) dirty is the last: they are copied under the write lock. */
export const syncCatchUpRegionsMax = 64;
/**
 * syncWrite payload buffers a synchronous replica keeps for reuse, in bytes: more than a queue depth of writes of
 * up to 1 MiB (a fresh shared buffer per write is zeroed, faulted in and freed again: about a tenth of a replica's
 * CPU per 1 MiB write).
 */
export const syncPayloadsHeldBytes = 32 * MiB;
/** A synchronous replica that is away is tried again this often. */
export const syncReconnectDelayMs = 1_000;
/**
 * A resync that stopped at blocks damaged on the owner with no good copy anywhere to repair them from waits this long
 * before it tries again, unless a write over those blocks wakes it first (sync-replicas.ts, DAMAGE AT RESYNC).
 */
export const syncDamagedRetryMs = 60_000;

/** Data bytes one replication stream record carries at most (replication/stream-format.ts); a sender reads this much at a time. */
export const streamDataRecordBytesMax = 1 * MiB;
/** A stream's header record (JSON: names, ids, sizes) at most. */
export const streamHeaderBytesMax = 64 * KiB;
/** Any stream record's payload at most: a data record's offset and data; what a decoder ever buffers. */
export const streamRecordPayloadBytesMax = streamDataRecordBytesMax + 8;
/** Stream bytes a receiver applies between durable resume points (a commit, then its resume state written). */
export const receiveCommitBytes = 32 * MiB;
/** Data records a receiver writes at once (each at most streamDataRecordBytesMax): the disk works while the next arrive. */
export const receiveWritesInFlightMax = 8;
/**
 * Data records smaller than this a receiver gathers and writes together (up to streamDataRecordBytesMax at a time:
 * one fresh run, one write), copying their bytes; bigger ones are written as they come, in place.
 */
export const receiveBatchRecordBytesMax = 256 * KiB;
/** receiveData frame buffers a peer server keeps for reuse, in bytes: more than a link's window and the writes in flight. */
export const receiveFrameBuffersHeldBytes = 32 * MiB;
/**
 * receiveData frame buffers are made in multiples of this, so that frames of nearby sizes reuse one another's: a
 * frame of small records ends at the first record end past the link's 1 MiB target, a different byte each time.
 */
export const receiveFrameBufferStepBytes = 128 * KiB;
/** Reads a sender keeps ahead of what it has sent (each at most streamDataRecordBytesMax), and their bytes at most. */
export const sendReadsAheadMax = 64;
export const sendReadAheadBytes = 8 * MiB;
/**
 * Reads of at most sendGatheredReadBytesMax (a random writer's scattered chunks) a sender keeps ahead, read a batch
 * at a time once half of them (or of their bytes) are used, together (SnapshotDevice.readManyNowOrLater), so that
 * each batch holds many chunks that lie side by side on disk: at most sendReadAheadBytes of them too, and only
 * sendReadsAheadMax while the page cache does not answer them all (send.ts's #smallLimit). A larger read is one call already
 * for several chunks, and goes as before (sendReadsAheadMax).
 */
export const sendSmallReadsAheadMax = 2048;
export const sendGatheredReadBytesMax = 16 * KiB;
/** A sender's free record arenas kept for reuse (each streamDataRecordBytesMax): its read-ahead's and a link's window's worth. */
export const sendArenasFreeMax = (2 * sendReadAheadBytes) / streamDataRecordBytesMax;

/** Connections the metrics port (serve --metrics-listen) serves at once: a few scrapers, never a crowd. */
export const metricsConnectionsMax = 16;
/** Time a scraper has to send its request on the metrics port. */
export const metricsRequestTimeoutMs = 10_000;

/**
 * Read defragmentation (Volume's read, `serve --read-defrag`): a range that a read of at least readDefragBytesMin
 * finds, for the second time, in pieces of readDefragPieceBytesMax or less on average (a range rewritten at random:
 * redirect-on-write gave every rewritten chunk its own place) is written again, in the background, as one fresh contiguous run, so that
 * the next reads of it are one system call instead of one per piece (BENCHMARKS.md, issue 19). At most
 * readDefragInFlightBytesMax of such rewrites wait or run at once (their bytes are copies held in memory); reads
 * that find more in flight leave their range as it is.
 */
export const readDefragBytesMin = 256 * KiB;
export const readDefragPieceBytesMax = 32 * KiB;
export const readDefragInFlightBytesMax = 8 * MiB;
