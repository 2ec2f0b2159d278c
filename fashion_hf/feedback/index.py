"""The records of a store folder in memory, read from its shards' metadata files; torn and corrupt lines repaired.

Every method is called under the store's lock (shared to read, exclusive to repair or change).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .files import append_line, atomic_write, fsync_dir
from .schema import METADATA_NAME, is_file_name, is_record_id

logger = logging.getLogger(__name__)


def record_id_of(line: bytes) -> str | None:
    """The `id` of a metadata line, or None when the line is not a JSON object."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    return item.get("id") if isinstance(item, dict) else None


def parse_record(line: bytes) -> dict | None:
    """A metadata line as a record, or None when it is not one (torn, corrupt, or naming a file outside its shard)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not is_record_id(record.get("id")) or not is_file_name(record.get("file_name")):
        return None
    return record


class ShardIndex:
    """Record id -> record and where its line is, for every `<data_dir>/<shard>/metadata.jsonl`.

    `refresh` reads only the bytes appended since the last call, unless a metadata file was rewritten (a delete or a
    repair bumps the folder's epoch, and every process then reads everything again).
    """

    def __init__(self, data_dir: Path, state_dir: Path, tmp_dir: Path):
        self._data, self._state, self._tmp = data_dir, state_dir, tmp_dir
        self._epoch_path = state_dir / "epoch"
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, dict] = {}
        self.where: dict[str, tuple[str, int]] = {}  # id -> (shard, byte offset of its line)
        self.shard_counts: dict[str, int] = {}
        self._files: dict[str, tuple[int, int, int]] = {}  # shard -> (st_dev, st_ino, bytes consumed)
        self._epoch: int | None = None
        self.corrupt_lines = 0

    def _read_epoch(self) -> int:
        try:
            return int(self._epoch_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def bump_epoch(self) -> None:
        """Tell every reader that a metadata file was rewritten (call under the exclusive lock)."""
        epoch = self._read_epoch() + 1
        atomic_write(self._epoch_path, str(epoch).encode(), self._tmp)

    def shard_of(self, record_id: str) -> str:
        return self.where[record_id][0]

    def add(self, shard: str, offset: int, record: dict) -> None:
        """Index one record whose line starts at byte `offset` of the shard's metadata file."""
        rid = record["id"]
        if rid in self.records:  # should not happen (uuid4); keep the first
            return
        self.records[rid] = record
        self.where[rid] = (shard, offset)
        self.shard_counts[shard] = self.shard_counts.get(shard, 0) + 1

    def appended(self, shard: str, offset: int, record: dict, line_length: int) -> None:
        """This process appended `record`'s line at `offset` of the shard's metadata file: index it without reading
        the file back."""
        self.add(shard, offset, record)
        st = (self._data / shard / METADATA_NAME).stat()
        self._files[shard] = (st.st_dev, st.st_ino, offset + line_length)

    def _drop_shard(self, shard: str) -> None:
        for rid in [rid for rid, (s, _) in self.where.items() if s == shard]:
            del self.records[rid]
            del self.where[rid]
        self.shard_counts.pop(shard, None)
        self._files.pop(shard, None)

    def refresh(self, repair: bool = False) -> None:
        """Bring the index up to date with the files.

        An unterminated last line (a writer crashed mid-append: under the lock no write is in progress) and
        unparsable lines are skipped; with `repair` (exclusive lock) they are moved to `.feedback/quarantine/` and
        removed from the file.
        """
        epoch = self._read_epoch()
        if epoch != self._epoch:
            self._reset()
            self._epoch = epoch
        seen = set()
        to_repair: list[str] = []
        for meta in sorted(self._data.glob(f"*/{METADATA_NAME}")):
            shard = meta.parent.name
            try:
                st = meta.stat()
            except FileNotFoundError:
                continue
            seen.add(shard)
            state = self._files.get(shard)
            start = state[2] if state and state[:2] == (st.st_dev, st.st_ino) and st.st_size >= state[2] else 0
            if start == 0 and state is not None:
                self._drop_shard(shard)
            consumed = start
            if st.st_size > start:
                with open(meta, "rb") as handle:
                    handle.seek(start)
                    chunk = handle.read(st.st_size - start)
                end = chunk.rfind(b"\n") + 1
                offset = start
                for line in chunk[:end].split(b"\n")[:-1]:
                    record = parse_record(line)
                    if record is None:
                        self.corrupt_lines += 1
                        to_repair.append(shard)
                        logger.warning("Skipping a corrupt line at byte %d of %s.", offset, meta)
                    else:
                        self.add(shard, offset, record)
                    offset += len(line) + 1
                consumed = start + end
                if end < len(chunk):
                    to_repair.append(shard)
            self._files[shard] = (st.st_dev, st.st_ino, consumed)
        for shard in [s for s in self._files if s not in seen]:
            self._drop_shard(shard)
        if repair and to_repair:
            for shard in dict.fromkeys(to_repair):
                self._repair_shard(shard)
            self.refresh()

    def _repair_shard(self, shard: str) -> None:
        meta = self._data / shard / METADATA_NAME
        raw = meta.read_bytes()
        end = raw.rfind(b"\n") + 1
        good, bad = [], []
        for line in raw[:end].split(b"\n")[:-1]:
            (good if parse_record(line) is not None else bad).append(line + b"\n")
        if end < len(raw):
            bad.append(raw[end:] + b"\n")
        quarantine = self._state / "quarantine"
        quarantine.mkdir(exist_ok=True)
        append_line(quarantine / f"{shard}.txt", b"".join(bad))
        logger.warning("Repaired %s: moved %d torn or corrupt line(s) to %s.", meta, len(bad), quarantine)
        if good:
            atomic_write(meta, b"".join(good), self._tmp)
        else:
            os.unlink(meta)
            fsync_dir(meta.parent)
        self.bump_epoch()
