"""Finding data files and reading their records: JSONL and Parquet, streamed, sharded, resumable.

A *record* is one JSON object (one non-blank line of a ``.jsonl`` file) or one row of a ``.parquet`` file.
``RecordReader`` streams the records of a list of files in order and hands out only those of one shard
(record ``k`` of the stream belongs to shard ``k % num_shards``), reading line by line or row group by row
group, never a whole file. Its ``position`` says where to start again, so a reader rebuilt from a saved
position continues with exactly the next record of its shard.

Bad input is reported with its file and line (or row) through ``BadRecordPolicy``: raised, or skipped and
counted in the log, per ``on_bad_record``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
BAD_RECORD_MODES = ("raise", "skip")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of a UTF-16 surrogate, e.g. \ud83d


class BadRecordError(ValueError):
    """A record that cannot become a training sample (malformed, a field missing, nothing to train on).

    Transforms raise it with the reason; datasets add the file and line and apply ``on_bad_record``.
    """


class BadRecordPolicy:
    """Applies ``on_bad_record``: ``"raise"`` raises ``ValueError`` naming the place, ``"skip"`` logs and counts."""

    def __init__(self, on_bad_record: str = "raise") -> None:
        if on_bad_record not in BAD_RECORD_MODES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
        self.mode = on_bad_record
        self.skipped = 0

    def handle(self, where: str, reason: str) -> None:
        """Report the bad record at ``where`` (``"file:line"``): raise, or log it and count it."""
        if self.mode == "raise":
            raise ValueError(f"{where}: {reason} (fix the record, or set on_bad_record='skip' to skip such records)")
        self.skipped += 1
        if self.skipped <= 10 or self.skipped % 1000 == 0:
            logger.warning("skipped bad record %s: %s (%d skipped so far by this reader)", where, reason, self.skipped)


def resolve_data_files(data_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The data files a path names: a file, a directory (searched recursively) or a glob; or a list of those.

    Returns the ``.jsonl`` and ``.parquet`` files, sorted within each entry. A path that exists is taken as it is,
    even with glob characters in it (``run[1]/``). As with a glob, a directory's hidden entries (names starting with
    ``.``: ``.ipynb_checkpoints/``, macOS ``._*`` files, caches) are not searched; symlinked subdirectories are
    followed, each real directory searched once. Raises ``FileNotFoundError`` for a path that does not exist and
    ``ValueError`` when no data file is found or a named file has another suffix.
    """
    entries = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    if not entries:
        raise ValueError("data_path is empty: give a .jsonl/.parquet file, a directory or a glob")
    files: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if any(ch in entry for ch in "*?[") and not os.path.exists(entry):  # an existing "run[1]/" is a path
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data path {entry!r}: the glob matches no file")
            files.extend(p for p in matches if file_format(p) is not None)
        elif os.path.isdir(entry):
            visited = set()  # symlinked directories are followed, each real directory read once (no cycles)
            for root, dirs, names in os.walk(entry, followlinks=True):
                if os.path.realpath(root) in visited:
                    dirs[:] = []
                    continue
                visited.add(os.path.realpath(root))
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(
                    os.path.join(root, n) for n in sorted(names) if not n.startswith(".") and file_format(n) is not None
                )
        elif os.path.isfile(entry):
            if file_format(entry) is None:
                raise ValueError(f"data file {entry!r}: unsupported suffix; use {' or '.join(FORMATS)}")
            files.append(entry)
        else:
            raise FileNotFoundError(f"data path {entry!r} does not exist")
    if not files:
        raise ValueError(f"data path {data_path!r}: no {' or '.join(FORMATS)} files found")
    return files


def file_format(path: str) -> str | None:
    """``"jsonl"``, ``"parquet"`` or None, from the file suffix."""
    return FORMATS.get(os.path.splitext(path)[1].lower())


def decode_json_line(raw: bytes) -> dict:
    """One JSONL line as a dict; ``BadRecordError`` if it is not valid JSON, not a JSON object, or holds a string
    that is not valid Unicode (see ``check_no_lone_surrogate``)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRecordError(f"malformed JSON ({exc})") from None
    if not isinstance(record, dict):
        raise BadRecordError(f"expected a JSON object, got {type(record).__name__}")
    if SURROGATE_ESCAPE.search(raw):
        check_no_lone_surrogate(record)
    return record


def check_no_lone_surrogate(record: dict) -> None:
    """``BadRecordError`` if a string of ``record`` holds an unpaired UTF-16 surrogate.

    JSON may escape one (``"\\ud83d"`` alone: half an emoji, common in scraped text); ``json`` decodes it into a
    ``str`` that cannot be encoded as UTF-8, so every tokenizer fails on it.
    """
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        surrogate = exc.object[exc.start : exc.end]
        raise BadRecordError(f"a string holds an unpaired UTF-16 surrogate {surrogate!r}: not valid Unicode") from None


def start_position() -> dict:
    """The position before the first record of a file list."""
    return {"file": 0, "offset": 0, "line": 0, "record": 0}


class RecordReader:
    """Streams the records of shard ``shard`` of ``num_shards`` from ``files``, from ``position`` on.

    Iterating yields ``(where, record)``: ``where`` is ``"path:line"`` (JSONL, 1-based) or ``"path row N"``
    (Parquet, 0-based), ``record`` a dict, or a ``BadRecordError`` for a malformed JSONL line (the caller
    applies its policy). After each yield, ``position`` is where the next record of this shard is searched
    from: ``{"file", "offset" (byte or row), "line", "record" (records of all shards passed)}``.
    """

    def __init__(self, files: Sequence[str], shard: int, num_shards: int, position: dict | None = None) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
        self.files = list(files)
        self.shard = shard
        self.num_shards = num_shards
        self.position = dict(position or start_position())

    def __iter__(self) -> Iterator[tuple[str, dict | BadRecordError]]:
        while self.position["file"] < len(self.files):
            path = self.files[self.position["file"]]
            if file_format(path) == "jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)
            self.position.update(file=self.position["file"] + 1, offset=0, line=0)

    def _mine(self, record_index: int) -> bool:
        return record_index % self.num_shards == self.shard

    def _jsonl(self, path: str) -> Iterator[tuple[str, dict | BadRecordError]]:
        pos = self.position
        with open(path, "rb") as f:
            f.seek(pos["offset"])
            offset, line_no, k = pos["offset"], pos["line"], pos["record"]
            for raw in f:
                offset += len(raw)
                line_no += 1
                if not raw.strip():
                    continue
                k += 1
                if not self._mine(k - 1):
                    continue
                pos.update(offset=offset, line=line_no, record=k)
                try:
                    yield f"{path}:{line_no}", decode_json_line(raw)
                except BadRecordError as exc:
                    yield f"{path}:{line_no}", exc
            pos.update(offset=offset, line=line_no, record=k)

    def _parquet(self, path: str) -> Iterator[tuple[str, dict | BadRecordError]]:
        import pyarrow.parquet as pq

        pos = self.position
        if os.path.getsize(path) == 0:
            return  # an empty file holds no records, as an empty .jsonl file
        try:
            parquet = pq.ParquetFile(path)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError do not name the file
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        first_row, group = 0, 0  # skip the row groups before the saved position
        while (
            group < parquet.num_row_groups and first_row + parquet.metadata.row_group(group).num_rows <= pos["offset"]
        ):
            first_row, group = first_row + parquet.metadata.row_group(group).num_rows, group + 1
        base_row, base_k = pos["offset"], pos["record"]  # record index of row r >= base_row: base_k + r - base_row
        for batch in parquet.iter_batches(batch_size=1024, row_groups=range(group, parquet.num_row_groups)):
            row0, first_row = first_row, first_row + batch.num_rows
            start = max(base_row - row0, 0)
            first_mine = start + (self.shard - (base_k + row0 + start - base_row)) % self.num_shards
            mine = list(range(first_mine, batch.num_rows, self.num_shards))
            for j, record in zip(mine, batch.take(mine).to_pylist() if mine else [], strict=True):
                pos.update(offset=row0 + j + 1, record=base_k + row0 + j + 1 - base_row)
                yield f"{path} row {row0 + j}", record
            if first_row > base_row:
                pos.update(offset=first_row, record=base_k + first_row - base_row)
