"""The transformers KV cache as decoding needs it, and every transformers version shim of the engine, in one place.

``DynamicCache`` concatenates each step's keys and values onto the whole cache (a copy per step); a ``RoomLayer``
writes them into room reserved after the prefill instead. The shims: the forward's cache argument is ``cache`` in
transformers >= 5.2x and ``past_key_values`` before, and the output names it the same way.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def _room_layer_class() -> type:
    """A ``DynamicLayer`` with reserved room: ``update`` writes into spare capacity instead of ``torch.cat``, so a
    decoding step costs no copy of the whole cache. Built on first use (importing transformers is slow)."""
    from transformers.cache_utils import DynamicLayer

    class RoomLayer(DynamicLayer):
        reserve = 0

        def update(self, key_states, value_states, *args, **kwargs):
            at = getattr(self, "_write_at", None)
            if at is not None:  # fixed shapes (``fix_room``): write at the given columns, hand over the whole room
                self._kb.index_copy_(2, at, key_states)
                self._vb.index_copy_(2, at, value_states)
                return self._kb, self._vb
            n = key_states.shape[-2]
            used = self.keys.shape[-2] if self.is_initialized and self.keys is not None and self.keys.dim() == 4 else 0
            kb = getattr(self, "_kb", None)
            if kb is None or used + n > kb.shape[-2] or (used and self.keys.data_ptr() != kb.data_ptr()):
                cap = used + n + self.reserve
                kb = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                vb = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if used:
                    kb[:, :, :used] = self.keys
                    vb[:, :, :used] = self.values
                self._kb, self._vb = kb, vb
                self.is_initialized, self.device, self.dtype = True, key_states.device, key_states.dtype
            self._kb[:, :, used:used + n] = key_states
            self._vb[:, :, used:used + n] = value_states
            self.keys, self.values = self._kb[:, :, :used + n], self._vb[:, :, :used + n]
            return self.keys, self.values

        def adopt(self, keys, values, used):
            """Take ``keys``/``values`` (B, H_kv, used + room, D) as the cache, its first ``used`` columns filled."""
            self._kb, self._vb = keys, values
            self.keys, self.values = keys[:, :, :used], values[:, :, :used]
            self.is_initialized, self.device, self.dtype = True, keys.device, keys.dtype

        def batch_select_indices(self, indices):
            if getattr(self, "_kb", None) is None or not self.is_initialized:
                return super().batch_select_indices(indices)
            used = self.keys.shape[-2]
            self._kb, self._vb = self._kb.index_select(0, indices), self._vb.index_select(0, indices)
            self.keys, self.values = self._kb[:, :, :used], self._vb[:, :, :used]

    return RoomLayer


def room_cache(model: Any, reserve: int) -> Any:
    """An empty cache whose layers keep ``reserve`` positions of room after the first (prefill) update."""
    from transformers import DynamicCache

    cls = _room_layer_class()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = cls()
        layer.reserve = reserve
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


class RowWriter:
    """The ``room_cache`` of packed rows (``rows`` x ``width`` columns + ``reserve`` of room), filled layer by layer
    from a forward over one flat sequence (``mecpe.engine.ragged``): ``put`` takes a layer's keys and values as the
    attention receives them and writes flat token t at (row, column) ``cells[t]``; the other columns are zeros
    (padding, masked; zeros so no NaN of uninitialised memory reaches a softmax). The flat keys and values are never
    held beyond their layer's attention call, so the peak is the rows' cache plus one layer."""

    def __init__(self, model: Any, rows: int, width: int, reserve: int, cells: torch.Tensor):
        self.cache = room_cache(model, reserve)
        self.shape, self.width, self.cells = (rows, width + reserve), width, cells
        self.filled: set[int] = set()

    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values``: (1, H_kv, T, D), the flat sequence's, of layer ``layer``."""
        r, c = self.cells[:, 0], self.cells[:, 1]
        out = []
        for t in (keys, values):
            flat = t[0].transpose(0, 1)  # (T, H_kv, D)
            rows = flat.new_zeros((self.shape[0], flat.shape[1], self.shape[1], flat.shape[2]))
            rows[r, :, c] = flat
            out.append(rows)
        self.cache.layers[layer].adopt(*out, self.width)
        self.filled.add(layer)

    def done(self) -> Any:
        """The filled cache; raises if a layer was not written (its attention did not run through ``put``)."""
        missing = sorted(set(range(len(self.cache.layers))) - self.filled)
        if missing:
            raise RuntimeError(f"ragged prefill: layers {missing} wrote no keys to the rows' cache")
        return self.cache


def fix_room(cache: Any, write_at: torch.Tensor) -> int:
    """Turn a prefilled ``room_cache`` into one of fixed shapes, for decoding steps that must not change shape (a
    static step, a CUDA graph): each update writes its keys and values at the columns ``write_at`` (a device tensor
    the caller advances in place) and every layer hands attention its whole room, written or not; the mask must hide
    what is not written yet. The unwritten room is zeroed, since uninitialised memory may hold NaN, which a masked
    score or a zero attention weight would still carry into the output. Returns the room's width."""
    width = 0
    for layer in cache.layers:
        used = layer.keys.shape[-2]
        layer._kb[:, :, used:].zero_()
        layer._vb[:, :, used:].zero_()
        layer.keys, layer.values, layer._write_at = layer._kb, layer._vb, write_at
        width = layer._kb.shape[-2]
    return width


def select_rows(cache: Any, idx: torch.Tensor) -> Any:
    """Keep batch rows ``idx``, layer by layer in place (old rows freed as it goes, so the peak is one layer more,
    not a second cache)."""
    cache.batch_select_indices(idx)
    return cache


@functools.lru_cache(maxsize=None)
def cache_argument(cls: type) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache`` (``past_key_values`` deprecated); 5.17 only knows
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned, under either version's name."""
    new = getattr(out, "cache", None)
    return new if new is not None else out.past_key_values
