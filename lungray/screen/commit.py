"""Making a screening run's output visible all at once, or not at all.

A run stages every file it will publish under `OUTPUT/_staging/<run>/`, then writes a
manifest (`COMMIT.json`: staged file -> final path). Writing the manifest is the commit
point. Publishing renames the staged files into place, one file per table and date, and
the run summary last. A run killed before the commit point leaves only staging, which
the next run deletes; one killed while publishing leaves a manifest, which the next run
finishes (every step is idempotent). Readers see the previous state or the new one, and
a rerun never publishes a second copy.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from lungray.io.listing import filesystem_for

log = logging.getLogger(__name__)

STAGING = "_staging"
MANIFEST = "COMMIT.json"


@dataclass(frozen=True)
class Store:
    """The output root, as a filesystem and a path inside it."""

    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str) -> Store:
        fs, root = filesystem_for(uri)
        fs.create_dir(root, recursive=True)
        return cls(fs, root)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def files(self, directory: str) -> list[str]:
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        return sorted(info.path for info in infos if info.type == pafs.FileType.File)


def staging_dir(store: Store, run_id: str) -> str:
    return store.path(STAGING, run_id)


def publish(store: Store, run_id: str, staged_to_final: dict[str, str]) -> None:
    """Write the manifest (the commit point), then move every staged file into place."""
    manifest = store.path(STAGING, run_id, MANIFEST)
    store.write(manifest, json.dumps(staged_to_final, indent=2).encode())
    apply_manifest(store, run_id)


def apply_manifest(store: Store, run_id: str) -> None:
    staging = store.path(STAGING, run_id)
    moves: dict[str, str] = json.loads(store.read(posixpath.join(staging, MANIFEST)))
    for staged, final in moves.items():
        if store.exists(staged):  # already moved by an earlier, interrupted publish
            store.fs.create_dir(posixpath.dirname(final), recursive=True)
            store.fs.move(staged, final)
    store.fs.delete_dir(staging)


def recover(store: Store) -> list[str]:
    """Finish runs that passed their commit point; discard the rest. Returns what was finished."""
    staging_root = store.path(STAGING)
    if store.fs.get_file_info(staging_root).type != pafs.FileType.Directory:
        return []
    finished = []
    for info in store.fs.get_file_info(pafs.FileSelector(staging_root)):
        run_id = posixpath.basename(info.path)
        if store.exists(posixpath.join(info.path, MANIFEST)):
            log.warning("finishing the publish of interrupted run %s", run_id)
            apply_manifest(store, run_id)
            finished.append(run_id)
        else:
            log.warning("discarding uncommitted output of interrupted run %s", run_id)
            store.fs.delete_dir(info.path)
    return finished

