"""One decode step's attention, two ways, side by side: SDPA with enable_gqa (each KV head
broadcast to its query heads) against the group folded into the query axis (what
minissb.model.Attention does when T == 1). Random tensors with Qwen2.5 head shapes; the cache is
a strided view of a longer buffer and rows have ragged lengths, as in the engine.

    python bench/decode_attention.py                 # 0.5B and 3B head shapes, bf16 and fp32
    python bench/decode_attention.py --rows 8,64 --spans 400,1300 --repeats 30

Prints ms per call of each form (median of interleaved rounds), their ratio, the largest
difference between the two outputs, and each form's largest error against float64 SDPA on the
same (already rounded) inputs: the two round differently, and this says whether either is worse.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import cpu_model  # noqa: E402

SHAPES = {"0.5b": (14, 2, 64), "3b": (16, 2, 128)}  # (query heads, KV heads, head dim) from config.json


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def compare(rows: int, heads: int, kv_heads: int, dim: int, span: int, dtype, repeats: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    buf_k = torch.randn(rows, kv_heads, span + 256, dim, generator=g).to(dtype)
    buf_v = torch.randn(rows, kv_heads, span + 256, dim, generator=g).to(dtype)
    k, v = buf_k[:, :, :span], buf_v[:, :, :span]  # (B, Hkv, S, D) views, as KVCache.update returns
    q = torch.randn(rows, 1, heads, dim, generator=g).to(dtype).transpose(1, 2)  # (B, H, 1, D)
    lengths = torch.randint(span // 3, span + 1, (rows,), generator=g)
    mask = (torch.arange(span)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def folded():
        y = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, heads // kv_heads, dim), k, v, attn_mask=mask)
        return y.reshape(rows, heads, 1, dim)

    y_gqa, y_folded = gqa().double(), folded().double()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    diff = (y_gqa - y_folded).abs().max().item()
    errors = ((y_gqa - exact).abs().max().item(), (y_folded - exact).abs().max().item())
    times = {"gqa": [], "folded": []}
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        times["gqa"].append(timed(gqa))
        times["folded"].append(timed(folded))
    return statistics.median(times["gqa"]), statistics.median(times["folded"]), diff, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,64")
    ap.add_argument("--spans", default="400,1300")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for rows in map(int, args.rows.split(",")):
                for span in map(int, args.spans.split(",")):
                    a, b, diff, (err_gqa, err_folded) = compare(rows, heads, kv_heads, dim, span, dtype, args.repeats)
                    dt = str(dtype).removeprefix("torch.")
                    print(f"  {name:4s} {dt:8s} rows {rows:3d} span {span:5d}  gqa {a:7.2f} ms  folded {b:7.2f} ms"
                          f"  ratio {a / b:4.2f}x  max diff {diff:.1e}"
                          f"  vs float64: gqa {err_gqa:.1e} folded {err_folded:.1e}")


if __name__ == "__main__":
    main()
