"""Where a rollout run's time goes inside the engine: decode steps by how many rows they ran,
sampling, prefill. The stage-1 workload of bench_generate.py (GSM8K train questions x K, T 0.8,
top-k 50, natural stops), real Qwen2.5-Coder-0.5B-Instruct by default.

    python bench/engine_profile.py                      # 32 x 4, <= 512 tokens, 64 slots, bf16
    python bench/engine_profile.py --prompts 8 --max-new 128 --dtype fp32

Prints tokens/s, then one line per band of 8 rows: steps, ms per step, mean busy rows and mean
span (the longest row's length, which every row's attention covers), and the band's total time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import DEFAULT_MODEL, chat_prompts, cpu_model, gsm8k_questions  # noqa: E402
from minissb.engine import Engine, Request  # noqa: E402
from minissb.generate import prompt_seed  # noqa: E402
from minissb.model import from_pretrained  # noqa: E402
from minissb.runs import torch_dtype  # noqa: E402
from minissb.tokenizer import Tokenizer  # noqa: E402


def instrument(engine: Engine, steps: list, totals: collections.Counter) -> None:
    """Wrap the engine's decode step, sampling and prefill with timers (this instance only)."""
    decode, sample, prefill = engine._decode_step, engine._sample_and_accept, engine._prefill

    def timed_decode():
        t0 = time.perf_counter()
        out = decode()
        busy = sum(s is not None for s in engine.slots)
        span = max((q.length for q in engine.slots if q is not None), default=0)
        steps.append((time.perf_counter() - t0, engine.stats["row_steps"], busy, span))
        return out

    def timed(fn, key):
        def wrapped(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            totals[key] += time.perf_counter() - t0
            return out
        return wrapped

    engine._decode_step = timed_decode
    engine._sample_and_accept, engine._prefill = timed(sample, "sample"), timed(prefill, "prefill")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    model = from_pretrained(args.model, dtype=torch_dtype(args.dtype)).eval()
    tok = Tokenizer.from_dir(args.model)
    prompts = chat_prompts(tok, gsm8k_questions(args.prompts))
    engine = Engine(model, args.width, max(map(len, prompts)) + args.max_new, stop_ids=list(tok.stop_ids))
    steps, totals = [], collections.Counter()
    instrument(engine, steps, totals)
    t0 = time.perf_counter()
    requests = [Request(p, args.max_new, args.samples, 0.8, 50, seed=prompt_seed(0, i)) for i, p in enumerate(prompts)]
    outs = [c for o in engine.run(requests) for c in o.completions]
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in outs)
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads; {args.model.name} {args.dtype}, "
          f"{args.prompts} x {args.samples}, <= {args.max_new} tokens, {args.width} slots")
    print(f"{tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s; {len(steps)} decode steps "
          f"({sum(s[0] for s in steps):.1f} s, sampling included), sampling {totals['sample']:.1f} s, prefill {totals['prefill']:.1f} s")
    rows_of = [b - a for (_, a, *_), (_, b, *_) in zip([(0, 0, 0, 0)] + steps, steps)]  # rows each step ran
    bands = collections.defaultdict(list)
    for (dt, _, busy, span), rows in zip(steps, rows_of):
        bands[rows // 8 * 8].append((dt, busy, span))
    for band in sorted(bands):
        v = bands[band]
        print(f"rows {band:3d}-{band + 7:<3d} {len(v):5d} steps {1000 * sum(x[0] for x in v) / len(v):7.0f} ms/step  "
              f"busy {sum(x[1] for x in v) / len(v):5.1f}  span {sum(x[2] for x in v) / len(v):5.0f}  total {sum(x[0] for x in v):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
