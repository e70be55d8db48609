"""Loss-side memory and time of one distillation step: chunked kd_loss vs naive full logits.

One step = forward + backward of KL(teacher || student) at T = 2 from final hidden states
(N tokens, width D) through an LM head of vocabulary V, with an online teacher (its hidden
states through the same head). Only the loss side is measured: the hidden states and the
head exist before the step. Each variant runs in a fresh subprocess; on CPU its peak is the
process's RSS high-water mark (getrusage) minus its RSS just before the step, on CUDA
torch.cuda.max_memory_allocated minus the allocation before the step.

Then a sparse top-k table: how far a KL over k + 1 buckets (the teacher's k most likely tokens,
and one bucket for the rest) is from the full-vocab KL, for several k. That error, large at T = 2,
is why minissb trains on full teacher distributions (captured as hidden states), not top-k
targets. With --student-model/--teacher-model (HF-format Qwen2.5 dirs, e.g. from
../shared/tools/build-real-qwen.sh) it uses real logits on GSM8K solutions; otherwise synthetic
peaked logits.

    python bench/bench_loss_memory.py [--tokens 1024] [--batch 1] [--chunk-sizes 128 256 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minissb.loss import kd_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def naive_step(h, W, th, T):
    """What one writes without thinking about memory: full (N, V) logits and autograd."""
    s = F.log_softmax(F.linear(h, W).float() / T, -1)  # (N, V)
    with torch.no_grad():
        t = F.log_softmax(F.linear(th, W).float() / T, -1)  # (N, V)
    loss = T**2 * F.kl_div(s, t, log_target=True, reduction="sum") / h.shape[0]
    loss.backward()
    return loss.item()


def chunked_step(h, W, th, T, chunk_size):
    out = kd_loss(h, W, teacher_hidden=th, temperature=T, chunk_size=chunk_size)
    out.loss.backward()
    return out.loss.item()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> None:
    """Run one variant and print a JSON line: loss-side peak bytes, seconds per step, loss."""
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    N = args.batch * args.tokens
    # Created directly in the target dtype: no float32 transient above the baseline.
    W = torch.empty(args.vocab, args.hidden, dtype=dtype, device=device).normal_(std=0.02)
    h = torch.empty(N, args.hidden, dtype=dtype, device=device).normal_().requires_grad_(True)
    th = torch.empty(N, args.hidden, dtype=dtype, device=device).normal_()
    variant = args.child
    step = naive_step if variant == "naive" else lambda *a: chunked_step(*a, chunk_size=int(variant))

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.steps):
        h.grad = None
        t0 = time.perf_counter()
        loss = step(h, W, th, 2.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        note = ""
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        note = "setup peak above baseline: a lower bound" if setup_peak > base + peak else ""
    print(json.dumps(dict(peak=peak, seconds=min(times), loss=loss, note=note)))


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in ("tokens", "batch", "hidden", "vocab", "dtype", "device", "steps")
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: variant {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(args) -> None:
    N = args.batch * args.tokens
    print(
        f"loss-side peak memory of one step (forward + backward), online teacher, T = 2\n"
        f"N = {args.batch} x {args.tokens} = {N} tokens, D = {args.hidden}, V = {args.vocab:,}, {args.dtype}, "
        f"{args.device}; one (N, V) float32 tensor = {N * args.vocab * 4 / 2**20:,.0f} MiB"
    )
    print(f"{'variant':<16}{'peak MiB':>10}{'s/step':>9}{'loss':>12}{'mem ratio':>11}{'time ratio':>12}")
    naive = run_variant(args, "naive")
    rows = [("naive", naive)] + [(f"chunked {c}", run_variant(args, str(c))) for c in args.chunk_sizes]
    for name, r in rows:
        print(
            f"{name:<16}{r['peak'] / 2**20:>10,.0f}{r['seconds']:>9.2f}{r['loss']:>12.6f}"
            f"{naive['peak'] / r['peak']:>10.1f}x{r['seconds'] / naive['seconds']:>11.2f}x" + (f"  ({r['note']})" if r["note"] else "")
        )
    print("mem ratio = naive peak / variant peak; time ratio = variant time / naive time")


# ----------------------------------------------------------------------------- sparse top-k error


def real_logits(args):
    """Student hidden states and teacher logits on the solution tokens of a few GSM8K problems."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from minissb.model import from_pretrained

    shared = ROOT.parent / "shared"
    rows = pq.read_table(shared / "data/openai__gsm8k/main/train-00000-of-00001.parquet").to_pylist()[: args.problems]
    tok = Tokenizer.from_file(str(shared / "qwen2.5-tokenizer/tokenizer.json"))
    student = from_pretrained(args.student_model, dtype=torch.bfloat16)
    teacher = from_pretrained(args.teacher_model, dtype=torch.bfloat16)
    hs, tls = [], []
    with torch.no_grad():
        for r in rows:
            prompt = tok.encode(f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n").ids
            answer = tok.encode(r["answer"] + "<|im_end|>").ids
            ids = torch.tensor([prompt + answer])
            # positions predicting the answer tokens: the last prompt token .. the second-to-last answer token
            sl = slice(len(prompt) - 1, ids.shape[1] - 1)
            hs.append(student.hidden_states(ids)[0, sl])
            tls.append(teacher(ids)[0, sl].float())
    return torch.cat(hs), student.lm_head.weight, torch.cat(tls), "real: student " + Path(args.student_model).name + ", teacher " + Path(args.teacher_model).name


def synthetic_logits(args):
    """Gaussian logits (std 8: top-1 mass ~0.6 at T = 1) and a nearby student. Their tail is much
    lighter than a real LM's power-law tail, so they understate the top-k error at T > 1."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 256, 64, args.vocab
    W = torch.randn(V, D, generator=g) / D**0.5
    th = torch.randn(N, D, generator=g) * 8
    h = th + torch.randn(N, D, generator=g) * 2
    return h.bfloat16(), W.bfloat16(), F.linear(th.bfloat16(), W.bfloat16()).float(), "synthetic Gaussian logits"


def topk_kl(h, W, tl, k, T, chunk_size=64):
    """Mean KL(teacher || student) over k + 1 buckets (the teacher's top k tokens, the rest) and
    the teacher's mean mass in its top k, at temperature T, in float64 from the full logits."""
    kl = mass = 0.0
    for s in range(0, h.shape[0], chunk_size):
        logq = F.log_softmax(F.linear(h[s : s + chunk_size], W).double() / T, -1)  # (C, V)
        logp = F.log_softmax(tl[s : s + chunk_size].double() / T, -1)
        lp, ids = logp.topk(k, dim=-1)  # (C, k)
        lq = logq.gather(1, ids)
        log_p_rest = logp.scatter_(1, ids, float("-inf")).logsumexp(-1)  # (C,), exact: no 1 - sum
        log_q_rest = logq.scatter_(1, ids, float("-inf")).logsumexp(-1)
        p_rest = log_p_rest.exp()
        rest = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), 0.0)  # k = V: no rest bucket
        kl += ((lp.exp() * (lp - lq)).sum(-1) + rest).sum().item()
        mass += lp.exp().sum().item()
    return kl / h.shape[0], mass / h.shape[0]


def sparse_table(args) -> None:
    h, W, tl, what = real_logits(args) if args.student_model else synthetic_logits(args)
    print(f"\nsparse top-k KL vs full-vocab KL, {what}, N = {h.shape[0]} positions, V = {W.shape[0]:,}")
    print(f"{'T':>4}{'k':>7}{'teacher mass in top k':>23}{'KL top-k':>11}{'full KL':>10}{'rel. error':>12}")
    for T in args.temperatures:
        full = kd_loss(h, W, teacher_logits=tl, temperature=T).kl.item()
        for k in args.ks:
            kl, mass = topk_kl(h, W, tl, k, T)
            print(f"{T:>4g}{k:>7}{mass:>23.4f}{kl:>11.5f}{full:>10.5f}{(kl - full) / full:>+12.2%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=896, help="896 = Qwen2.5-0.5B")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2, help="steps per variant; the fastest is reported")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 20, 50, 100, 500, 1000, 5000, 20000])
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--student-model", help="HF-format dir for the sparse table (real logits)")
    p.add_argument("--teacher-model", help="HF-format dir, same vocabulary as the student")
    p.add_argument("--problems", type=int, default=4, help="GSM8K train problems for the real sparse table")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-sparse", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if bool(args.student_model) != bool(args.teacher_model):
        raise SystemExit("error: pass both --student-model and --teacher-model, or neither")
    if not args.skip_memory:
        memory_table(args)
    if not args.skip_sparse:
        sparse_table(args)


if __name__ == "__main__":
    main()
