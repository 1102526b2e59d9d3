"""One place that touches filesystems: local paths and ``s3://`` URIs through ``pyarrow.fs``.

S3 settings (endpoint, region) are explicit: each process that touches S3 calls ``configure`` once with the resolved
``S3Settings`` (the driver resolves them with ``settings_from(cfg.storage)``, config over environment, and hands the
same values to its Ray workers), so the driver and every worker use the same endpoint whatever their environment.
Credentials are never settings: the AWS SDK's default chain reads ``AWS_ACCESS_KEY_ID`` etc. from the environment
(or an instance profile). Explicit keys would travel inside every pickled filesystem sent to a Ray task; without
them a pickle holds only endpoint, region and options.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import pyarrow.fs as pafs

from mecpe.errors import CorruptStateError, InputError, MissingInputError

_CHUNK = 1 << 20
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ENDPOINT_ENV = ("MECPE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is: ``endpoint`` (``http://host:port`` for an S3-compatible server; None = AWS) and ``region``."""

    endpoint: str | None = None
    region: str = "us-east-1"

    def as_dict(self) -> dict:
        return asdict(self)


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def settings_from(storage_cfg: Any = None) -> S3Settings:
    """Resolve S3 settings: the config's ``s3_endpoint`` / ``s3_region`` when set, else the environment
    (``MECPE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``; ``AWS_REGION``, ``AWS_DEFAULT_REGION``),
    else AWS in us-east-1."""
    endpoint = getattr(storage_cfg, "s3_endpoint", None) or _env(_ENDPOINT_ENV)
    region = getattr(storage_cfg, "s3_region", None) or _env(_REGION_ENV) or "us-east-1"
    return S3Settings(endpoint=endpoint, region=region)


_settings: S3Settings | None = None


def configure(settings: S3Settings | dict | None) -> S3Settings | None:
    """Set this process's S3 settings (a dict from ``S3Settings.as_dict`` is accepted: what Ray workers receive);
    None goes back to the environment. Process entry points call it (the CLI, a Ray Train worker, a predictor actor);
    library calls in a driver use ``using`` instead, so one run's settings never outlive it. Returns the previous."""
    global _settings
    previous = _settings
    _settings = S3Settings(**settings) if isinstance(settings, dict) else settings
    return previous


@contextlib.contextmanager
def using(settings: S3Settings | dict | None) -> Iterator[S3Settings]:
    """``configure`` for the duration of a block (a driver-side run), then the previous settings again."""
    previous = configure(settings)
    try:
        yield current_settings()
    finally:
        configure(previous)


def current_settings() -> S3Settings:
    """The settings ``configure`` set, else those of the environment (read now)."""
    return _settings if _settings is not None else settings_from(None)


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _endpoint(endpoint: str | None) -> tuple[str | None, str]:
    """``http://host:port/`` -> ("host:port", "http"); no scheme means https (pyarrow's default)."""
    if not endpoint:
        return None, "https"
    scheme, sep, rest = endpoint.partition("://")
    return (rest.rstrip("/"), scheme) if sep else (scheme.rstrip("/"), "https")


@functools.lru_cache(maxsize=None)
def _s3(endpoint_override: str | None, scheme: str, region: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint_override, scheme=scheme, region=region)


def get_filesystem(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it). S3 filesystems (cached per endpoint and region) use ``settings``, or
    this process's (``configure``)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        s = settings or current_settings()
        host, scheme = _endpoint(s.endpoint)
        return _s3(host, scheme, s.region), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:  # gs://, hdfs://, ...: whatever pyarrow supports
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _uri(original: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``original``."""
    if is_remote(original):
        return original.split("://", 1)[0] + "://" + path
    return path


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts if p])
    return os.path.join(uri, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = get_filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def _local_temp(path: str) -> str:
    """Unique temp name in the target's directory (same filesystem, so os.replace is atomic)."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _write_local(path: str, chunks: Iterable[bytes]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _local_temp(path)
    try:
        # os.open with mode 0o666 lets the umask decide permissions (mkstemp would force 0600).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic: readers see the old file or the new one, never a partial one.

    Local: temp file in the same directory + ``os.replace``. S3: one output stream, which becomes
    visible only when closed (a single PUT for small objects).
    """
    fs, path = get_filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(path, [data])
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def write_chunks(uri: str, chunks: Iterable[bytes]) -> None:
    """``write_bytes`` for data produced piece by piece (a large file never held whole): equally atomic."""
    fs, path = get_filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(path, chunks)
        return
    with fs.open_output_stream(path) as fh:  # multipart upload: the object appears only when closed
        for chunk in chunks:
            fh.write(chunk)


def dumps_json(obj: Any, *, indent: int | None = None) -> bytes:
    """Deterministic JSON bytes (key order as given, UTF-8, newline at the end)."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def read_json(uri: str) -> Any:
    """A JSON file; an ``InputError`` naming it when it is not UTF-8 JSON."""
    try:
        return json.loads(read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{uri}: not valid JSON: {exc}") from None


def read_state(uri: str) -> Any:
    """A JSON file that mecpe wrote; ``CorruptStateError`` naming it, and what to do, when it does not read back."""
    try:
        return json.loads(read_bytes(uri).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptStateError(f"{uri} is damaged ({type(exc).__name__}: {exc}). mecpe wrote it, so the disk or an "
                                f"interrupted copy changed it afterwards; the input and the config are fine. Delete "
                                f"it (or its run folder) and run the step again.") from None


def write_json(uri: str, obj: Any, *, indent: int | None = None) -> None:
    write_bytes(uri, dumps_json(obj, indent=indent))


def dumps_jsonl(objs: Iterable[Any]) -> bytes:
    """JSON Lines bytes: one compact object per line, UTF-8."""
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs).encode("utf-8")


def iter_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) of a byte stream given in chunks, for JSON Lines: a BOM at the start and a CR at
    line ends are dropped, blank lines skipped, a last line without newline kept. Pieces of a line are joined once
    (no quadratic re-scanning of a long line)."""
    lineno, carry, first = 0, [], True
    for chunk in chunks:
        if first and chunk:
            chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if carry:
                line, carry = b"".join(carry) + line, []
            lineno += 1
            line = line.removesuffix(b"\r")
            if line.strip():
                yield lineno, line
        carry.append(rest)
    last = b"".join(carry).removesuffix(b"\r")
    if last.strip():
        yield lineno + 1, last


def read_chunks(uri: str) -> Iterator[bytes]:
    """A file's bytes in 1 MiB chunks (streams: a large file is never held whole)."""
    fs, path = get_filesystem(uri)
    yield from _stream(fs, path)


def exists(uri: str) -> bool:
    fs, path = get_filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def list_files(uri: str, suffixes: Iterable[str] | None = (".json", ".jsonl")) -> list[str]:
    """A file -> [uri]; a directory/prefix -> its files, recursive, sorted, by suffix, hidden ones skipped.

    Hidden means any path component below ``uri`` starting with "." or "_" (temp files, ``_SUCCESS``,
    ``.ipynb_checkpoints``). Raises ``MissingInputError`` (a FileNotFoundError) when nothing is there.
    """
    fs, path = get_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [str(uri)]
    if info.type == pafs.FileType.NotFound:
        raise MissingInputError(f"{uri}: no such file or directory")
    suffixes = tuple(s.lower() for s in suffixes or ())
    out = []
    for item in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = item.path[len(path):].lstrip("/")
        if item.type != pafs.FileType.File or _hidden(rel):
            continue
        if suffixes and not item.path.lower().endswith(suffixes):
            continue
        out.append(_uri(str(uri), item.path))
    return sorted(out)


def delete(uri: str) -> None:
    """Delete one file; a missing file is fine."""
    fs, path = get_filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    """Delete a directory/prefix recursively; a missing one is fine."""
    fs, path = get_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _stream(fs: pafs.FileSystem, path: str) -> Iterable[bytes]:
    with fs.open_input_stream(path) as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _copy_tree(src_uri: str, dst_uri: str) -> list[str]:
    """Copy every file below ``src_uri`` (hidden ones too) to ``dst_uri``, streaming; each file atomic."""
    src_fs, src = get_filesystem(src_uri)
    dst_fs, dst = get_filesystem(dst_uri)
    info = src_fs.get_file_info(src)
    if info.type == pafs.FileType.NotFound:
        raise MissingInputError(f"{src_uri}: no such directory")
    items = [info] if info.type == pafs.FileType.File else \
        src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
    copied = []
    for item in sorted(items, key=lambda i: i.path):
        if item.type != pafs.FileType.File:
            continue
        rel = item.path[len(src):].lstrip("/") or os.path.basename(item.path)
        target = dst.rstrip("/") + "/" + rel
        if isinstance(dst_fs, pafs.LocalFileSystem):
            _write_local(target, _stream(src_fs, item.path))
        else:
            with dst_fs.open_output_stream(target) as out:
                for chunk in _stream(src_fs, item.path):
                    out.write(chunk)
        copied.append(rel)
    return copied


def download_dir(uri: str, local_dir: str) -> list[str]:
    """Mirror a directory/prefix (model weights, checkpoints) into ``local_dir``; returns relative paths."""
    return _copy_tree(uri, local_dir)


def upload_dir(local_dir: str, uri: str) -> list[str]:
    """Copy a local directory tree to ``uri`` (local or S3); returns relative paths."""
    return _copy_tree(local_dir, uri)


def safe_key(conversation_id: Any) -> str:
    """A safe object-key/file-name component for any id: ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}``.

    Ids that are already safe are kept as they are (readable keys). Anything altered (other characters,
    leading dot/dash, too long) gets 8 hex digits of the original's sha256, so distinct ids stay distinct
    in practice and ``..``/``/`` can never escape a prefix.
    """
    text = str(conversation_id)
    if _SAFE_KEY.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-")[:90].rstrip("._-")
    return f"{cleaned}-{digest}" if cleaned else digest


def sha256(uri: str) -> str:
    fs, path = get_filesystem(uri)
    h = hashlib.sha256()
    for chunk in _stream(fs, path):
        h.update(chunk)
    return h.hexdigest()
