"""Captured teacher targets on a real model: bytes on disk, the step-0 KL against the online
teacher, and a training step's time and peak memory, captured vs online, side by side.

    python bench/bench_targets.py --model ~/.cache/minissb/qwen2.5-coder-0.5b-instruct \\
        --probe runs/ssb-coder1.5b-cpu/probe/pairs.jsonl --out runs/bench-targets

1. The teacher (the engine, return_hidden) writes a solution for the first --pairs mixed
   problems of a stage-1 run made with --keep-rollouts (their stored attempts), and the
   hidden states it returns are stored as sample.py stores them: the bytes per token on disk.
   Every solution is used, right or wrong: this measures the targets, not the teacher.
2. The step-0 KL (LoRA B = 0, so the student is the base model on the bare question) from the
   captured rows and from the online teacher, on the same pairs.
3. One training step (batch 4: forward, backward) per mode, each in its own process so that
   each peak RSS is its own; the median of 3 steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minissb.runs import resolve_dtype_name, torch_dtype  # noqa: E402
from minissb.distill import CapturedTeacher, TrainConfig, build_examples, load_pairs, micro_batch_loss  # noqa: E402
from minissb.engine import Engine, Request  # noqa: E402
from minissb.lora import apply_lora, lora_parameters  # noqa: E402
from minissb.model import from_pretrained  # noqa: E402
from minissb.prompts import student_chat  # noqa: E402
from minissb.ssb import RunFiles, Stage1Options, build_teacher_chat  # noqa: E402
from minissb.targets import FLOAT32_LOGIT_BYTES, CapturedTargets  # noqa: E402
from minissb.tokenizer import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_variants import mixed_problems  # noqa: E402


def capture(model, tok, probe: Path, n: int, out: Path, model_name: str, max_new: int) -> Path:
    items = mixed_problems(RunFiles(probe))[:n]
    opts = Stage1Options()
    reqs = []
    for problem, right, wrong in items:
        chat = build_teacher_chat(problem, right, wrong, opts)
        ids = tok.encode_chat(chat, add_generation_prompt=True)
        reqs.append(Request(ids, max_new, 1, 0.4, 50, seed=len(reqs), return_hidden=True, tag=(problem, chat)))
    engine = Engine(model, len(reqs), max(len(r.prompt) for r in reqs) + max_new, stop_ids=tok.stop_ids)
    store = CapturedTargets(out / "pairs.targets")
    store.open_for_writing(model_name, model.dtype, model.dtype, model.config.hidden_size, [])
    records = []
    for res in engine.run(reqs):
        problem, chat = res.request.tag
        c = res.completions[0]
        if c.finish_reason != "stop":
            continue  # a pair has S+1 rows only when the solution ended on its own
        store.write(problem.id, c.token_ids, c.hidden)
        records.append({"id": problem.id, "dataset": problem.dataset, "question": problem.question, "gold": problem.gold,
                        "student_chat": student_chat(problem.question), "teacher_chat": chat, "solution": tok.decode(c.token_ids),
                        "solution_ids": c.token_ids, "finish_reason": "stop", "model": model_name})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def step_process(args) -> dict:
    """One mode's training steps, in this process: time, peak RSS, the step-0 KL."""
    dtype = torch_dtype(resolve_dtype_name(args.dtype, "cpu"))
    model = from_pretrained(args.model, dtype=dtype)
    tok = Tokenizer.from_dir(args.model)
    pairs = load_pairs(Path(args.out) / "pairs.jsonl")[:4]
    examples = build_examples(pairs, tok, vocab_size=model.config.vocab_size, max_seq_len=8192, truncate=False,
                              online_teacher=args.step == "online", pairs_path=str(Path(args.out) / "pairs.jsonl"))
    apply_lora(model, 32, 32, seed=0)  # B = 0: the student starts as the base model
    captured = None
    if args.step == "captured":
        captured = CapturedTeacher(Path(args.out) / "pairs.targets", str(Path(args.model).resolve()), dtype,
                                   model.config.hidden_size, pairs)
    cfg = TrainConfig(pairs="-", device="cpu", dtype=args.dtype)
    times, kl = [], None
    for i in range(4):
        t0 = time.perf_counter()
        res, n_input = micro_batch_loss(model, examples, cfg, tok.pad_id, captured)
        res.loss.backward()
        times.append(time.perf_counter() - t0)
        kl = kl if kl is not None else res.kl.item()
        for p in lora_parameters(model):
            p.grad = None
    return {"mode": args.step, "pairs": len(examples), "trained_tokens": sum(ex.n for ex in examples), "input_tokens": n_input,
            "step_s": statistics.median(times[1:]), "kl_step0": kl,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--probe", help="pairs file of a stage-1 run made with --keep-rollouts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--step", choices=("captured", "online"), help=argparse.SUPPRESS)  # internal: one mode per process
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step_process(args)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = resolve_dtype_name(args.dtype, "cpu")
    model = from_pretrained(args.model, dtype=torch_dtype(dtype_name))
    tok = Tokenizer.from_dir(args.model)
    t0 = time.perf_counter()
    path = capture(model, tok, Path(args.probe), args.pairs, out, str(Path(args.model).resolve()), args.max_new_tokens)
    total, rows, per = CapturedTargets(out / "pairs.targets").bytes_per_token()
    V, D = model.config.vocab_size, model.config.hidden_size
    elem = torch.finfo(model.dtype).bits // 8
    print(f"model {Path(args.model).name}, {dtype_name}; {len(load_pairs(path))} teacher solutions captured in {time.perf_counter() - t0:.0f} s")
    print(f"captured targets: {rows} rows, {total:,} bytes = {per:,.1f} bytes per token "
          f"(hidden {D} x {elem} B = {D * elem:,}; original float32 logits {V * FLOAT32_LOGIT_BYTES:,} B: {V * FLOAT32_LOGIT_BYTES / per:.0f}x smaller)")
    del model
    results = {}
    for mode in ("online", "captured"):
        cmd = [sys.executable, __file__, "--model", args.model, "--out", args.out, "--dtype", args.dtype, "--step", mode]
        results[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]), flush=True)
    on, cap = results["online"], results["captured"]
    print(f"step-0 KL: captured {cap['kl_step0']:.6f}, online {on['kl_step0']:.6f} (relative difference "
          f"{abs(cap['kl_step0'] - on['kl_step0']) / max(on['kl_step0'], 1e-12):.2%})")
    print(f"step time: captured {cap['step_s']:.2f} s, online {on['step_s']:.2f} s = {cap['step_s'] / on['step_s']:.2f}x; "
          f"peak RSS captured {cap['peak_rss_gb']:.2f} GB, online {on['peak_rss_gb']:.2f} GB")
    (out / "bench_targets.json").write_text(json.dumps({"bytes_per_token": per, "rows": rows, "bytes": total, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
