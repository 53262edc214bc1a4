// The FUSE front end: a FuseSession serving a VolumeFileSystem at one directory. `DIR/<volume>` is the path a
// loop device is made from; the node mounts it at start (--fuse DIR) or when the first attach needs it.
import path from 'node:path';
import { FuseSession, type FuseSessionStats } from './session.ts';
import { snapshotsDirName, VolumeFileSystem, type FuseCatalog } from './volume-fs.ts';
import type { Log } from '../core/log.ts';

export interface FuseStatus extends FuseSessionStats {
  mountpoint: string;
  openFiles: number;
}

export class FuseFrontEnd {
  readonly directory: string;
  readonly #session: FuseSession;
  readonly #fileSystem: VolumeFileSystem;

  private constructor(session: FuseSession, fileSystem: VolumeFileSystem) {
    this.directory = session.directory;
    this.#session = session;
    this.#fileSystem = fileSystem;
  }

  /** Mounts the volumes of `catalog` as files under `directory`; a stale mount left there by a crash is replaced. */
  static async mount(directory: string, catalog: FuseCatalog, log: Log): Promise<FuseFrontEnd> {
    const fileSystem = new VolumeFileSystem(catalog);
    const session = await FuseSession.mount(directory, fileSystem, log);
    return new FuseFrontEnd(session, fileSystem);
  }

  /** The file of a volume, or of VOL@SNAP (read-only). */
  filePath(exportName: string): string {
    return exportName.includes('@') ? path.join(this.directory, snapshotsDirName, exportName) : path.join(this.directory, exportName);
  }

  status(): FuseStatus {
    return { mountpoint: this.directory, openFiles: this.#fileSystem.openFileCount(), ...this.#session.stats() };
  }

  /** Unmounts (lazily, aborting the connection, if a loop device still holds a file) and closes every open device. */
  async close(): Promise<void> {
    await this.#session.close();
    await this.#fileSystem.closeAll();
  }
}
