"""Reading raw input for inference: which files, and a Ray Data datasource that hands their conversations on as
undecoded rows (validation happens downstream, in ``mecpe.infer.stages.ParseStage``).

JSON Lines: one row per line, as bytes, streamed (a huge file never sits in memory; Ray never decodes the line, so a
bad line or invalid UTF-8 cannot fail the file). JSON arrays: the file is split into one row per element by
``mecpe.data.iter_records``; an unreadable file becomes one error row naming the file and the reason.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pyarrow as pa

from mecpe import readers, storage
from mecpe.errors import MissingInputError

LIGHT_CPUS = 0.25  # read / parse / write stages: JSON and I/O only

RAW_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("file_index", pa.int64()),
    # line: a JSONL line, undecoded | item: one element of a JSON array (re-serialized) | reject: an element
    # mecpe.data already rejected (raw = the reject as JSON) | error: the file is unreadable (raw = message)
    ("kind", pa.string()),
    ("position", pa.int64()),
    ("location", pa.string()),
    ("raw", pa.large_binary()),
])


def list_inputs(input_uri: str | list[str], *, exclude: str | None = None) -> list[str]:
    """Input files: each URI is a .json/.jsonl file or a folder / prefix of them (sorted, de-duplicated; local
    paths made absolute so run ids and uids do not depend on the working directory). Files under ``exclude``
    (the output location, if it lies inside an input folder) are left out."""
    uris = [input_uri] if isinstance(input_uri, str) else list(input_uri)
    skip = None
    if exclude:
        skip = (exclude if storage.is_remote(exclude) else os.path.abspath(exclude)).rstrip("/") + "/"
    out: dict[str, None] = {}
    for uri in uris:
        found = storage.list_files(uri, suffixes=(".json", ".jsonl"))
        for f in found:
            f = f if storage.is_remote(f) else os.path.abspath(f.removeprefix("file://"))
            if skip is None or not f.startswith(skip):
                out[f] = None
        if not found:
            raise MissingInputError(f"no .json/.jsonl input files at {uri}")
    return list(out)


def make_raw_datasource(members: list[tuple[str, str, int]], filesystem, lines_per_block: int):
    """A Ray ``FileBasedDatasource`` (Ray's documented way to read a custom file format) yielding raw rows.
    ``members``: (uri, filesystem path, global file index) of the files on ``filesystem``."""
    from ray.data.datasource import FileBasedDatasource

    class RawInput(FileBasedDatasource):
        """JSON Lines: lines as bytes, ``lines_per_block`` per block. JSON arrays (.json, or a .jsonl whose first
        byte is ``[``): the whole file read, split into elements."""

        def __init__(self, paths, *, index: dict[str, tuple[str, int]], per_block: int, **kwargs):
            super().__init__(paths, **kwargs)
            self._index = index
            self._per_block = max(1, per_block)

        def get_name(self) -> str:
            return "ReadECF"

        def _where(self, path: str) -> tuple[str, int]:
            norm = path.lstrip("/")
            for p in (path, norm, "/" + norm):
                if p in self._index:
                    return self._index[p]
            return path, -1

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            source, file_index = self._where(path)
            rows: list[dict] = []

            def add(kind, position, location, raw) -> bool:
                rows.append({"source": source, "file_index": file_index, "kind": kind, "position": position,
                             "location": location, "raw": raw})
                return len(rows) >= self._per_block

            def flush() -> pa.Table:
                block = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                rows.clear()
                return block

            seen = False
            try:
                head = f.read(1 << 16)
                if not source.endswith(".jsonl") or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                    yield from self._array(head + f.readall(), source, add, flush)
                else:
                    chunks = iter(lambda: f.read(1 << 20), b"")
                    for lineno, line in storage.iter_lines(_chain(head, chunks)):
                        seen = True
                        if add("line", lineno, f"line {lineno}", line):
                            yield flush()
                    if not seen:  # as mecpe.data: an empty file is an error, not zero rows
                        add("error", -1, "byte 0", b"unreadable file: empty file (no JSON Lines)")
            except OSError as exc:  # an I/O error mid-file: a file-level reject, the job goes on
                add("error", -1, "file", f"cannot read: {type(exc).__name__}: {exc}".encode())
            if rows:
                yield flush()

        @staticmethod
        def _array(data_bytes: bytes, source: str, add, flush) -> Iterator[pa.Table]:
            """A whole JSON document (one array; or JSON Lines in a .json): split into items by mecpe.data."""
            from mecpe import data

            try:
                for index, (location, item) in enumerate(readers.iter_records(data_bytes, source)):
                    if isinstance(item, data.Reject):
                        full = add("reject", index, location, json.dumps(item.to_json(), ensure_ascii=False).encode())
                    else:
                        full = add("item", index, location, json.dumps(item, ensure_ascii=False).encode())
                    if full:
                        yield flush()
            except data.FileError as exc:
                add("error", -1, exc.position or "file", f"unreadable file: {exc.message}".encode())

    index = {path: (uri, i) for uri, path, i in members}
    return RawInput([m[1] for m in members], index=index, per_block=lines_per_block, filesystem=filesystem)


def _chain(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest


def read_raw(files: list[str], *, lines_per_block: int = 256) -> Any:
    """Raw-row dataset over ``files`` (local and/or s3://: one read per filesystem, unioned), in blocks of at most
    ``lines_per_block`` rows."""
    import ray

    groups: dict[bool, tuple[Any, list[tuple[str, str, int]]]] = {}
    for i, uri in enumerate(files):
        fs, path = storage.get_filesystem(uri)
        groups.setdefault(storage.is_remote(uri), (fs, []))[1].append((uri, path, i))
    datasets = [ray.data.read_datasource(make_raw_datasource(members, fs, lines_per_block), num_cpus=LIGHT_CPUS)
                for fs, members in groups.values()]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
