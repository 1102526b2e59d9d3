"""Is FlexAttention worth it for the engine's prefix-shared rows (issue #29)? One attention call of SmolLM2's shape on
rows laid out as the engine packs them (conversations one after another; in each, the prefix is causal and every
question block sees its conversation's prefix and itself), timed three ways:

* ``sdpa-dense``: SDPA with the dense additive mask, what the engine runs today (PyTorch picks the mem-efficient
  kernel: flash attention takes no mask);
* ``flex-block``: ``flex_attention`` (compiled) with a ``BlockMask`` built by ``create_block_mask`` from a
  ``mask_mod`` that reads the same boolean tensor: blocks wholly masked are skipped;
* ``sdpa-causal``: SDPA causal with no mask tensor (flash): the floor, not a correct answer for these rows.

Prints a table (ms per call, TFLOP/s of the work the mask leaves, max |difference| against sdpa-dense) and writes
--json. Pure torch: no model, no mecpe import.

    python bench/flex_check.py --json OUT.json            # on a GPU; --small on CPU checks the agreement only
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def row_mask(length: int, prefix: int, blocks: int, block_len: int) -> torch.Tensor:
    """[length, length] bool: True where query i may see key j, for conversations of ``prefix`` tokens plus
    ``blocks`` question blocks of ``block_len`` tokens, packed one after another; the tail is one causal filler."""
    m = torch.zeros(length, length, dtype=torch.bool)
    start = 0
    seg = prefix + blocks * block_len
    while start + seg <= length:
        p_end = start + prefix
        m[start:p_end, start:p_end] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
        for b in range(blocks):
            s, e = p_end + b * block_len, p_end + (b + 1) * block_len
            m[s:e, start:p_end] = True
            m[s:e, s:e] = torch.ones(block_len, block_len, dtype=torch.bool).tril()
        start += seg
    if start < length:
        n = length - start
        m[start:, start:] = torch.ones(n, n, dtype=torch.bool).tril()
    return m


def timed(fn, iters: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=9)       # SmolLM2-135M: 9 query heads of 64
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--block-len", type=int, default=25)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dynamic", action="store_true", help="compile flex with dynamic shapes; also time a second "
                    "shape's first call (does a new batch shape recompile?)")
    ap.add_argument("--small", action="store_true", help="CPU check: 2 rows of 256 tokens, flex uncompiled")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.small:
        args.rows, args.length, args.prefix, args.blocks, args.block_len, args.iters = 2, 256, 40, 4, 8, 2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    shape = (args.rows, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype) for _ in range(3))
    # one (rows, L, L) mask, as the engine holds one per row (read per row by the mask_mod, as the engine would)
    allowed = row_mask(args.length, args.prefix, args.blocks, args.block_len).to(dev)[None].repeat(args.rows, 1, 1)
    additive = torch.zeros(allowed.shape, device=dev, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    additive = additive[:, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, q_idx, kv_idx]

    flex = torch.compile(flex_attention, dynamic=args.dynamic) if dev == "cuda" else flex_attention
    t0 = time.perf_counter()
    block = create_block_mask(mask_mod, args.rows, None, args.length, args.length, device=dev)
    sync()
    block_s = time.perf_counter() - t0
    calls = {
        "sdpa-dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
        "flex-block": lambda: flex(q, k, v, block_mask=block),
        "sdpa-causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    ref = calls["sdpa-dense"]().float()
    t0 = time.perf_counter()
    out_flex = calls["flex-block"]().float()  # the first call compiles
    sync()
    compile_s = time.perf_counter() - t0
    second = None
    if args.dynamic:  # a batch of another shape, as the engine's next batch would be
        r2, l2 = max(1, args.rows - 3), args.length - 64
        q2, k2, v2 = (t[:r2, :, :l2].contiguous() for t in (q, k, v))
        a2 = allowed[:r2, :l2, :l2].contiguous()
        t0 = time.perf_counter()
        b2 = create_block_mask(lambda b, h, qi, ki: a2[b, qi, ki], r2, None, l2, l2, device=dev)
        flex(q2, k2, v2, block_mask=b2)
        sync()
        second = round(time.perf_counter() - t0, 2)
    work = 4 * args.heads * args.head_dim * int(allowed.sum())  # QK^T and PV over the visible pairs of every row
    rows = []
    for name, fn in calls.items():
        sec = timed(fn, args.iters, sync)
        diff = (fn().float() - ref).abs().max().item() if name != "sdpa-causal" else None
        rows.append({"variant": name, "ms": round(sec * 1e3, 3), "tflops_visible": round(work / sec / 1e12, 2),
                     "max_abs_diff_vs_dense": diff})
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
              "shape": list(shape), "dtype": str(dtype), "visible_fraction": round(allowed.float().mean().item(), 4),
              "block_mask_build_s": round(block_s, 4), "flex_first_call_s": round(compile_s, 2),
              "dynamic": args.dynamic, "second_shape_first_call_s": second,
              "block_sparsity": str(block).splitlines()[0] if dev == "cuda" else None, "variants": rows}
    print(f"# {result['device']}, torch {result['torch']}, q/k/v {shape} {dtype}; visible {result['visible_fraction']}"
          f" of the pairs; block mask built in {block_s:.4f} s; flex first call {compile_s:.2f} s"
          f"; another shape's first call {second} s")
    print(f"{'variant':<12} {'ms':>9} {'TFLOP/s':>8}  max|diff| vs sdpa-dense")
    for r in rows:
        print(f"{r['variant']:<12} {r['ms']:>9.3f} {r['tflops_visible']:>8.2f}  {r['max_abs_diff_vs_dense']}")
    assert (out_flex - ref).abs().max().item() < (3e-2 if dtype == torch.bfloat16 else 1e-4)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
