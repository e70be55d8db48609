"""The engine vs the static sampler vs transformers' generate: same weights, prompts, width, budget.

Workloads (each run for every system back to back, interleaved over --repeats, so load from
other processes hits all alike; the ratios are what to read):
  rollout  SSB's stage-1 shape: P GSM8K train questions x K samples, temperature 0.8, top-k
           50, stop at <|im_end|> / <|endoftext|>, rows finishing hundreds of tokens apart.
           engine: minissb.engine with --width slots over all P requests (refilled as
           sequences finish); static: minissb's sampler before the engine (git commit
           STATIC_COMMIT, a static batch of width // K problems that drops finished rows but
           never refills); transformers: generate() on the same batches, left-padded.
  greedy   one prompt at a time, greedy; also checks the engine's tokens equal transformers'.
  step     minissb's batch-1 decode step time against the memory-bandwidth floor (weight
           bytes read per step / measured copy bandwidth).
  rows     one engine decode step at 8, 32 and 64 rows (300 cached positions): how much a wide
           pool buys on this machine, per dtype.
Tokens are counted honestly: generated tokens up to and including each row's stop token,
never padding or a finished row's dead slots.

  python bench/bench_generate.py                         # real Qwen2.5-Coder-0.5B-Instruct, 32 x 4, <= 512 tokens
  python bench/bench_generate.py --tiny                  # tiny random model, no downloads, ~1 min
  python bench/bench_generate.py --dtypes bfloat16 --workloads rollout

The real model comes from `bash ../shared/tools/build-real-qwen.sh 0.5b`
(-> ~/.cache/minissb/qwen2.5-coder-0.5b-instruct).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without installing

from minissb.engine import Engine, Request  # noqa: E402
from minissb.generate import generate, prompt_seed  # noqa: E402
from minissb.model import KVCache, from_pretrained  # noqa: E402

STATIC_COMMIT = "aecf6fc"  # main just before the engine: the static-batch sampler

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_MODEL = Path.home() / ".cache/minissb/qwen2.5-coder-0.5b-instruct"
GSM8K_TRAIN = SHARED / "data/openai__gsm8k/main/train-00000-of-00001.parquet"


def gsm8k_questions(n: int) -> list[str]:
    import pyarrow.parquet as pq

    if not GSM8K_TRAIN.is_file():
        raise SystemExit(f"error: {GSM8K_TRAIN} is missing (the GSM8K mirror in ../shared/data)")
    return pq.read_table(GSM8K_TRAIN, columns=["question"]).column("question").to_pylist()[:n]


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    from minissb.prompts import student_chat

    return [tokenizer.encode_chat(student_chat(q), add_generation_prompt=True) for q in questions]


def counted_tokens(rows: list[list[int]], stop_ids: set[int]) -> int:
    """Generated tokens up to and including the first stop token of each row (rest is padding)."""
    total = 0
    for row in rows:
        cut = next((t for t, tok in enumerate(row) if tok in stop_ids), None)
        total += len(row) if cut is None else cut + 1
    return total


def run_engine(model, prompts, *, greedy, k, max_new, stop_ids, seed, width=None):
    """All prompts through one engine of `width` slots (default: every row at once)."""
    t0 = time.perf_counter()
    if greedy:
        outs = generate(model, prompts, max_new_tokens=max_new, num_samples=k, stop_ids=stop_ids, seed=seed)
    else:
        engine = Engine(model, width or len(prompts) * k, max(len(p) for p in prompts) + max_new, stop_ids=stop_ids)
        reqs = [Request(p, max_new, k, 0.8, 50, seed=prompt_seed(seed, i)) for i, p in enumerate(prompts)]
        outs = [c for o in engine.run(reqs) for c in o.completions]
    dt = time.perf_counter() - t0
    return dt, [c.token_ids + ([c.stop_id] if c.finish_reason == "stop" else []) for c in outs]


class StaticKVCache(KVCache):
    """Today's KVCache plus the two row operations the static sampler needed (the engine does
    not, so the library no longer has them): drop finished rows, and copy a prompt's row K times."""

    def select_rows(self, rows: torch.Tensor, upto: int) -> None:
        for name in ("k", "v"):  # (layers, B, Hkv, max_len, D): only slots below `upto` hold anything yet
            buf = getattr(self, name)
            kept = buf.new_empty(buf.shape[0], len(rows), *buf.shape[2:])
            kept[:, :, :, :upto] = buf[:, rows, :, :upto]
            setattr(self, name, kept)

    def repeat_rows(self, repeats: int, upto: int) -> None:
        self.select_rows(torch.arange(self.k.shape[1], device=self.k.device).repeat_interleave(repeats), upto)


def load_static_sampler():
    """generate() as it was at STATIC_COMMIT, run on today's model code (its API is unchanged;
    its cache gets back the row operations only it used)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{STATIC_COMMIT}:minissb/generate.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "static_generate.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("static_generate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["static_generate"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    module.KVCache = StaticKVCache
    return module.generate


def run_static(static_generate, model, prompts, *, k, max_new, stop_ids, seed, per_batch):
    t0 = time.perf_counter()
    rows = []
    for b in range(0, len(prompts), per_batch):
        outs = static_generate(model, prompts[b : b + per_batch], max_new_tokens=max_new, temperature=0.8, top_k=50,
                               num_samples=k, stop_ids=stop_ids, seed=seed + b)
        rows += [c.token_ids + ([c.stop_id] if c.finish_reason == "stop" else []) for c in outs]
    return time.perf_counter() - t0, rows


def run_hf_batches(hf, prompts, *, k, max_new, stop_ids, seed, pad_id, per_batch):
    t, rows = 0.0, []
    for b in range(0, len(prompts), per_batch):
        dt, r = run_hf(hf, prompts[b : b + per_batch], greedy=False, k=k, max_new=max_new, stop_ids=stop_ids, seed=seed + b, pad_id=pad_id)
        t, rows = t + dt, rows + r
    return t, rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        return f"{name}, {'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run_hf(hf, prompts, *, greedy, k, max_new, stop_ids, seed, pad_id):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    sampling = {} if greedy else dict(temperature=0.8, top_k=50, top_p=1.0, num_return_sequences=k)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=not greedy,
                          eos_token_id=list(stop_ids), pad_token_id=pad_id, **sampling)
    dt = time.perf_counter() - t0
    return dt, out[:, L:].tolist()


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters one decode step reads: everything but the embedding table
    (a lookup reads B rows), unless it doubles as the LM head."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes moved per second (read + write) by a large tensor copy, best of 10."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times[1:])


def decode_step_time(model, prompt: list[int], steps: int = 24) -> float:
    """Median seconds of one batch-1 decode step (cache filled by a prompt prefill)."""
    from minissb.model import KVCache

    cache = KVCache(model.config, 1, len(prompt) + steps + 1, model.dtype, model.device)
    ids = torch.tensor([prompt])
    times = []
    with torch.no_grad():
        hidden = model.hidden_states(ids, cache=cache)
        tok = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        for s in range(len(prompt), len(prompt) + steps):
            t0 = time.perf_counter()
            hidden = model.hidden_states(tok, positions=torch.tensor([[s]]), cache=cache, start=s)
            tok = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rows_time(model, rows: int, cached: int = 300, repeats: int = 5) -> float:
    """Mean seconds of one engine decode step (model + LM head) over `rows` slots."""
    from minissb.engine import decode_hidden

    engine = Engine(model, rows, cached + 2)
    ids = torch.randint(0, model.config.vocab_size, (rows, 1))
    pos = torch.full((rows,), cached)
    with torch.no_grad():
        for _ in range(2):
            decode_hidden(model, engine.cache, ids, pos, cached + 1)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.lm_head(decode_hidden(model, engine.cache, ids, pos, cached + 1))
    return (time.perf_counter() - t0) / repeats


def line(name, ours, theirs, ntok_ours, ntok_theirs):
    tps_o, tps_t = ntok_ours / ours, ntok_theirs / theirs
    return (f"  {name:<22} minissb {tps_o:8.1f} tok/s ({ntok_ours:5d} tok, {ours:6.1f}s)   "
            f"transformers {tps_t:8.1f} tok/s ({ntok_theirs:5d} tok, {theirs:6.1f}s)   ratio {tps_o / tps_t:5.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-format Qwen2 directory with tokenizer files")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (no real weights needed)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="rollout,greedy,step", help="any of rollout, greedy, step, rows")
    ap.add_argument("--prompts", type=int, default=32, help="rollout: distinct GSM8K train questions")
    ap.add_argument("--samples", type=int, default=4, help="rollout: samples per question (K)")
    ap.add_argument("--max-new", type=int, default=512, help="rollout: new-token budget")
    ap.add_argument("--width", type=int, default=64, help="rollout: rows decoded together (engine slots; static and "
                    "transformers batches of width // K questions)")
    ap.add_argument("--systems", default="engine,static,transformers")
    ap.add_argument("--greedy-prompts", type=int, default=2)
    ap.add_argument("--greedy-max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved minissb/transformers rounds per workload")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from minissb.tokenizer import Tokenizer

    tmp = None
    if args.tiny:
        from minissb.testing import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model_dir = build_tiny_model(Path(tmp.name), hidden_size=128, layers=4, intermediate=384)
        with torch.no_grad():  # larger weights so sampled lengths and greedy argmaxes vary
            m = from_pretrained(model_dir, dtype=torch.float32)
            from minissb.model import init_weights, save_pretrained

            save_pretrained(init_weights(m, std=0.25, seed=1), model_dir)
    else:
        model_dir = args.model.expanduser()
        if not (model_dir / "config.json").is_file():
            print(f"error: {model_dir} has no config.json; build it with `bash {SHARED}/tools/build-real-qwen.sh 0.5b` "
                  "or pass --tiny", file=sys.stderr)
            return 1
    tokenizer = Tokenizer.from_dir(model_dir)
    stop_ids = list(tokenizer.stop_ids)
    questions = gsm8k_questions(max(args.prompts, args.greedy_prompts))
    prompts = chat_prompts(tokenizer, questions)

    cpu = cpu_model() if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"machine: {cpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; model {model_dir.name if not args.tiny else 'tiny random (4 layers, hidden 128)'}")
    workloads = args.workloads.split(",")
    bandwidth = copy_bandwidth() if "step" in workloads else 0.0  # measured once, used for both dtypes
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = from_pretrained(model_dir, dtype=dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        print(f"[{dtype_name}]")
        systems = args.systems.split(",")
        static_generate = load_static_sampler() if "static" in systems else None
        warm = dict(k=2, max_new=4, stop_ids=stop_ids, seed=0)  # first-call costs out of the timings
        run_engine(model, prompts[:2], greedy=False, **warm)
        run_hf(hf, prompts[:2], greedy=False, pad_id=tokenizer.pad_id, **warm)
        if "rollout" in workloads:
            batch = prompts[: args.prompts]
            per_batch = max(1, args.width // args.samples)
            kw = dict(k=args.samples, max_new=args.max_new, stop_ids=stop_ids)
            runners = {
                "engine": lambda rep: run_engine(model, batch, greedy=False, seed=rep, width=args.width, **kw),
                "static": lambda rep: run_static(static_generate, model, batch, seed=rep, per_batch=per_batch, **kw),
                "transformers": lambda rep: run_hf_batches(hf, batch, seed=rep, pad_id=tokenizer.pad_id, per_batch=per_batch, **kw),
            }
            for rep in range(args.repeats):
                tps = {}
                for name in systems:
                    dt, rows = runners[name](rep)
                    ntok = counted_tokens(rows, set(stop_ids))
                    tps[name] = ntok / dt
                    lens = sorted(counted_tokens([r], set(stop_ids)) for r in rows)
                    print(f"  rollout {args.prompts}x{args.samples} width {args.width} #{rep}  {name:<12} {tps[name]:7.1f} tok/s "
                          f"({ntok:6d} tok, {dt:7.1f} s; lengths {lens[0]}..{lens[len(lens) // 2]}..{lens[-1]})", flush=True)
                if "engine" in tps:
                    print("  ratios: " + ", ".join(f"engine / {n} = {tps['engine'] / tps[n]:.2f}x" for n in tps if n != "engine"))
        if "greedy" in workloads:
            total_o = total_t = tok_o = tok_t = 0.0
            same = 0
            for i, p in enumerate(prompts[: args.greedy_prompts]):
                kw = dict(greedy=True, k=1, max_new=args.greedy_max_new, stop_ids=stop_ids, seed=0)
                for rep in range(args.repeats):
                    dt_o, rows_o = run_engine(model, [p], **kw)
                    dt_t, rows_t = run_hf(hf, [p], pad_id=tokenizer.pad_id, **kw)
                    total_o, total_t = total_o + dt_o, total_t + dt_t
                    tok_o += counted_tokens(rows_o, set(stop_ids))
                    tok_t += counted_tokens(rows_t, set(stop_ids))
                n = counted_tokens(rows_t, set(stop_ids))
                same += rows_o[0] == rows_t[0][:n]
                if rows_o[0] != rows_t[0][:n]:
                    first = next(t for t, (a, b) in enumerate(zip(rows_o[0], rows_t[0])) if a != b)
                    print(f"  greedy prompt {i}: tokens differ from transformers at step {first}")
            print(line(f"greedy batch 1 x{args.greedy_prompts}", total_o, total_t, int(tok_o), int(tok_t))
                  + f"   identical to transformers: {same}/{args.greedy_prompts}")
        if "rows" in workloads:
            for rows in (8, 32, 64):
                dt = decode_rows_time(model, rows)
                print(f"  decode step, {rows:2d} rows: {dt * 1e3:7.1f} ms = {rows / dt:6.1f} tok/s", flush=True)
        if "step" in workloads:
            step = decode_step_time(model, prompts[0])
            nbytes = weight_bytes_per_step(model)
            bw = bandwidth
            floor = nbytes / bw
            print(f"  batch-1 decode step: {step * 1e3:.1f} ms; weights read {nbytes / 1e9:.2f} GB / copy bandwidth "
                  f"{bw / 1e9:.1f} GB/s = floor {floor * 1e3:.1f} ms; floor / step = {floor / step:.0%}")
        del model, hf
        gc.collect()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
