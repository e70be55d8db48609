"""One prepared GPU run: the engine's and the trainer's numbers on the Qwen2.5-3B-Instruct shapes.

The GPU machine has no network and room for 64 MiB of our files, so the model is built there
with random weights and the real Qwen2.5-3B-Instruct config.json values (below). Random
weights never stop, so each rollout request gets its own max_new_tokens, drawn from the
rollout lengths of a CPU stage-1 run (STAGE1_LENGTHS). Everything is printed and written as
JSON to --out. Run it on CPU first with --tiny (a small random model, a minute):

    python bench/gpu.py --tiny --out /tmp/gpu-tiny.json          # CPU, before the GPU run
    python bench/gpu.py --out $OUT/gpu.json                       # the GPU run, <= 6 minutes

Sections:
  decode    batch-1 decode tokens/s, eager and CUDA-graph, and the fraction of the HBM floor
            (weight bytes read per step / measured device-to-device copy bandwidth)
  graphs    the CUDA-graph path's tokens equal the eager path's (greedy and sampled, tiny model)
  rollouts  useful tokens/s at 64 and 256 engine slots against transformers' generate on the
            same requests (batches of 64, each run to its longest request; useful tokens are
            the requested ones only)
  train     one training step of the paper's setting (batch 4, ~450-token student sequences,
            ~1,200-token hinted prompts): captured vs online teacher, peak GPU memory, with and
            without gradient checkpointing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minissb.distill import Example, TrainConfig, enable_gradient_checkpointing, micro_batch_loss  # noqa: E402
from minissb.engine import Engine, Request  # noqa: E402
from minissb.lora import apply_lora, lora_parameters  # noqa: E402
from minissb.model import Qwen2Config, Qwen2ForCausalLM, num_params  # noqa: E402

# Qwen/Qwen2.5-3B-Instruct config.json (the fields minissb reads).
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768,
                 tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
# Rollout lengths (tokens, stop included) of the first 40 GSM8K train problems x K=4 in the CPU
# stage-1 run of results/ssb-coder1.5b-cpu (Qwen2.5-Coder-1.5B-Instruct, T 0.8, top-k 50, cap 512):
# the 5th, 10th, ..., 95th percentiles.
STAGE1_LENGTHS = [118, 135, 148, 158, 167, 175, 183, 191, 199, 207, 216, 226, 237, 249, 264, 283, 310, 352, 512]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_init(model, std: float, seed: int):
    """normal(0, std) weights, ones for norms, drawn on the model's device (3B on a CPU takes a minute)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std, generator=g)
    return model


def build_model(cfg: dict, device, dtype) -> Qwen2ForCausalLM:
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    model = model.to_empty(device=device)
    if cfg["tie_word_embeddings"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return random_init(model, 0.02, 0).to(dtype).eval().requires_grad_(False)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second moved (read + write) by a large device-to-device copy, best of 10."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_section(model, device, graphs: bool, steps: int) -> dict:
    """Batch-1 greedy decode: seconds per token after a 128-token prompt."""
    engine = Engine(model, 1, 128 + steps + 1, cuda_graphs=graphs)
    prompt = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    list(engine.run([Request(prompt, 8)]))  # warm-up (and graph capture)
    sync(device)
    t0 = time.perf_counter()
    out = list(engine.run([Request(prompt, steps)]))
    sync(device)
    dt = time.perf_counter() - t0
    return {"tokens": len(out[0].completions[0].token_ids), "seconds": dt, "tokens_per_s": steps / dt}


def graphs_equal_eager(device) -> dict:
    """Tokens of the graph path and the eager path on a tiny model: greedy and sampled."""
    model = random_init(build_model(TINY, device, torch.float32), 0.3, 1)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2, 11)]
    result = {}
    for name, temp in (("greedy", 0.0), ("sampled", 1.0)):
        runs = []
        for graphs in (False, True):
            engine = Engine(model, 4, 128, stop_ids=list(range(0, 512, 37)), cuda_graphs=graphs)
            reqs = [Request(p, 40, 2, temp, 50, seed=i, tag=i) for i, p in enumerate(prompts)]
            runs.append({o.request.tag: [c.token_ids for c in o.completions] for o in engine.run(reqs)})
        result[name] = runs[0] == runs[1]
    return result


def rollout_requests(n: int, vocab: int, seed: int = 0, cap: int = 512) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(STAGE1_LENGTHS)
    reqs = []
    for i in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(90, 200, (1,), generator=g)),), generator=g).tolist()
        max_new = min(cap, int(lengths[torch.randint(0, len(lengths), (1,), generator=g)]))
        reqs.append(Request(prompt, max_new, 1, 0.8, 50, seed=i))
    return reqs


def engine_rollouts(model, device, reqs, slots: int, graphs: bool) -> dict:
    max_len = max(len(r.prompt) + r.max_new_tokens for r in reqs)
    engine = Engine(model, slots, max_len, cuda_graphs=graphs)
    list(engine.run(reqs[: min(8, len(reqs))]))  # warm-up
    engine = Engine(model, slots, max_len, cuda_graphs=graphs) if not graphs else engine
    sync(device)
    t0 = time.perf_counter()
    tokens = sum(len(c.token_ids) for o in engine.run(reqs) for c in o.completions)
    sync(device)
    dt = time.perf_counter() - t0
    return {"slots": slots, "graphs": graphs, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def hf_rollouts(hf, device, reqs, batch: int) -> dict:
    """transformers' generate over batches of `batch` left-padded requests; each batch runs to its
    longest request (random weights never stop); only each request's own tokens count."""
    useful, t0 = 0, None
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, len(reqs), batch):
        group = reqs[b : b + batch]
        L = max(len(r.prompt) for r in group)
        ids = torch.tensor([[0] * (L - len(r.prompt)) + list(r.prompt) for r in group], device=device)
        mask = (torch.arange(L, device=device)[None, :] >= torch.tensor([L - len(r.prompt) for r in group], device=device)[:, None]).long()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_new_tokens for r in group), min_new_tokens=1,
                        do_sample=True, temperature=0.8, top_k=50, top_p=1.0, pad_token_id=0, eos_token_id=None)
        useful += sum(r.max_new_tokens for r in group)
    sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "tokens": useful, "seconds": dt, "tokens_per_s": useful / dt}


def train_step(model, device, mode: str, checkpointing: bool, student_len: int, teacher_len: int, solution: int) -> dict:
    """One step (4 pairs) of the paper's setting: time and peak memory."""
    g = torch.Generator().manual_seed(0)
    V, D = model.config.vocab_size, model.config.hidden_size
    batch = []
    for i in range(4):
        sol = torch.randint(0, V, (solution,), generator=g).tolist()
        s_prompt = torch.randint(0, V, (student_len - solution,), generator=g).tolist()
        t_prompt = torch.randint(0, V, (teacher_len,), generator=g).tolist()
        batch.append(Example(f"p{i}", s_prompt + sol + [0], len(s_prompt) - 1, t_prompt + sol + [0], len(t_prompt) - 1,
                             sol + [0], solution, False))
    rows = {ex.id: torch.randn(ex.n, D, generator=g).to(device, model.dtype) for ex in batch}

    class Stored:  # what CapturedTeacher hands the loss: rows already on the device
        def rows(self, ex):
            return rows[ex.id]

    cfg = TrainConfig(pairs="-", device=str(device), dtype="bf16" if model.dtype == torch.bfloat16 else "fp32")
    params = lora_parameters(model)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        res, _ = micro_batch_loss(model, batch, cfg, 0, Stored() if mode == "captured" else None)
        res.loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        for p in params:
            p.grad = None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"teacher": mode, "grad_checkpointing": checkpointing, "seconds": statistics.median(times[1:]), "peak_gb": peak,
            "loss": float(res.loss.detach())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small random model (for a CPU check of the script)")
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: decode,graphs,rollouts,train")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(TINY, num_hidden_layers=4, hidden_size=128, intermediate_size=384) if args.tiny else QWEN25_3B
    skip = set(args.skip.split(","))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    report = {"device": gpu, "torch": torch.__version__, "dtype": str(dtype), "model": "tiny" if args.tiny else "Qwen2.5-3B shapes"}
    t_start = time.perf_counter()

    def say(key, value):
        report[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a timeout

    model = build_model(cfg, device, dtype)
    say("params", num_params(model))
    use_graphs = device.type == "cuda"
    if "graphs" not in skip and use_graphs:
        say("graphs_equal_eager", graphs_equal_eager(device))
    if "decode" not in skip:
        weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        weight_bytes -= 0 if cfg["tie_word_embeddings"] else model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
        bw = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
        floor = weight_bytes / bw
        for graphs in ([False, True] if use_graphs else [False]):
            r = decode_section(model, device, graphs, 16 if args.tiny else 256)
            r.update(weight_bytes=weight_bytes, copy_bandwidth_gbs=bw / 1e9, floor_ms=floor * 1e3,
                     step_ms=1e3 / r["tokens_per_s"], fraction_of_floor=floor * r["tokens_per_s"])
            say(f"decode_batch1_{'graph' if graphs else 'eager'}", r)
    if "rollouts" not in skip:
        import transformers

        reqs = rollout_requests(32, cfg["vocab_size"], cap=48) if args.tiny else rollout_requests(512, cfg["vocab_size"])
        for slots in (64, 256):
            for graphs in ([False, True] if use_graphs else [False]):
                say(f"engine_{slots}_{'graph' if graphs else 'eager'}", engine_rollouts(model, device, reqs, slots, graphs))
        with torch.device(device):  # built where it runs: a 3B float32 init on the CPU would take minutes
            hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).to(dtype).eval()
        hf.load_state_dict(model.state_dict(), strict=False)  # the same weights (names match one to one)
        say("transformers_64", hf_rollouts(hf, device, reqs[: 128 if not args.tiny else 64], 64))
        del hf
    if "train" not in skip:
        apply_lora(model, 32, 32, seed=0)
        shape = (80, 120, 40) if args.tiny else (450, 1200, 300)  # student sequence, hinted prompt, solution
        for checkpointing in (False, True):
            if checkpointing:
                enable_gradient_checkpointing(model)
            for mode in ("captured", "online"):
                say(f"train_{mode}{'_ckpt' if checkpointing else ''}", train_step(model, device, mode, checkpointing, *shape))
    say("wall_seconds", time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
