"""minissb.generate vs transformers' generate: same weights, prompts, batch and token budget.

Workloads (each run for minissb and transformers back to back, interleaved over --repeats, so
load from other processes hits both alike; the ratio is what to read):
  rollout  P GSM8K questions x K samples, temperature 0.8, top-k 50, stop at <|im_end|> /
           <|endoftext|>: the SSB rollout shape, where rows finish hundreds of tokens apart.
  greedy   one prompt at a time, greedy; also checks minissb's tokens equal transformers'.
  step     minissb's batch-1 decode step time against the memory-bandwidth floor (weight
           bytes read per step / measured copy bandwidth).
Tokens are counted honestly: generated tokens up to and including each row's stop token,
never padding or a finished row's dead slots.

  python bench/bench_generate.py                         # real Qwen2.5-Coder-0.5B-Instruct (see below)
  python bench/bench_generate.py --tiny                  # tiny random model, no downloads, ~1 min
  python bench/bench_generate.py --dtypes bfloat16 --workloads rollout

The real model comes from `bash ../shared/tools/build-real-qwen.sh 0.5b`
(-> ~/.cache/minissb/qwen2.5-coder-0.5b-instruct).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minissb.generate import generate
from minissb.model import from_pretrained

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


def run_minissb(model, prompts, *, greedy, k, max_new, stop_ids, seed):
    t0 = time.perf_counter()
    outs = generate(model, prompts, max_new_tokens=max_new, temperature=0.0 if greedy else 0.8,
                    top_k=None if greedy else 50, num_samples=k, stop_ids=stop_ids, seed=seed)
    dt = time.perf_counter() - t0
    rows = [c.token_ids + ([c.stop_id] if c.finish_reason == "stop" else []) for c in outs]
    return dt, rows


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
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
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


def line(name, ours, theirs, ntok_ours, ntok_theirs):
    tps_o, tps_t = ntok_ours / ours, ntok_theirs / theirs
    return (f"  {name:<22} minissb {tps_o:8.1f} tok/s ({ntok_ours:5d} tok, {ours:6.1f}s)   "
            f"transformers {tps_t:8.1f} tok/s ({ntok_theirs:5d} tok, {theirs:6.1f}s)   ratio {tps_o / tps_t:5.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF-format Qwen2 directory with tokenizer files")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model (no real weights needed)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--workloads", default="rollout,greedy,step")
    ap.add_argument("--prompts", type=int, default=8, help="rollout: distinct GSM8K questions")
    ap.add_argument("--samples", type=int, default=4, help="rollout: samples per question (K)")
    ap.add_argument("--max-new", type=int, default=320, help="rollout: new-token budget")
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

    cpu = "2-core x86 CPU, avx512_bf16" if torch.cuda.is_available() is False else torch.cuda.get_device_name()
    print(f"machine: {cpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; model {model_dir.name if not args.tiny else 'tiny random (4 layers, hidden 128)'}")
    workloads = args.workloads.split(",")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = from_pretrained(model_dir, dtype=dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        print(f"[{dtype_name}]")
        warm = dict(greedy=False, k=2, max_new=4, stop_ids=stop_ids, seed=0)  # first-call costs out of the timings
        run_minissb(model, prompts[:2], **warm)
        run_hf(hf, prompts[:2], pad_id=tokenizer.pad_id, **warm)
        if "rollout" in workloads:
            batch = prompts[: args.prompts]
            kw = dict(greedy=False, k=args.samples, max_new=args.max_new, stop_ids=stop_ids)
            ours, theirs = [], []
            for rep in range(args.repeats):
                ours.append(run_minissb(model, batch, seed=rep, **kw))
                theirs.append(run_hf(hf, batch, seed=rep, pad_id=tokenizer.pad_id, **kw))
                o_tok = counted_tokens(ours[-1][1], set(stop_ids))
                t_tok = counted_tokens(theirs[-1][1], set(stop_ids))
                lens = sorted(len(r) for r in ours[-1][1])
                print(line(f"rollout {args.prompts}x{args.samples} #{rep}", ours[-1][0], theirs[-1][0], o_tok, t_tok)
                      + f"   (minissb lengths {lens[0]}..{lens[len(lens) // 2]}..{lens[-1]})")
        if "greedy" in workloads:
            total_o = total_t = tok_o = tok_t = 0.0
            same = 0
            for i, p in enumerate(prompts[: args.greedy_prompts]):
                kw = dict(greedy=True, k=1, max_new=args.greedy_max_new, stop_ids=stop_ids, seed=0)
                for rep in range(args.repeats):
                    dt_o, rows_o = run_minissb(model, [p], **kw)
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
        if "step" in workloads:
            step = decode_step_time(model, prompts[0])
            nbytes = weight_bytes_per_step(model)
            bw = copy_bandwidth()
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
