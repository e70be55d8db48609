"""What fits where: GPU memory per rank of each stage for the Qwen2.5 sizes — ESTIMATES from shapes.

    python bench/fit.py

Nothing here is measured: no GPU has been lent to this project's sessions. The numbers are
arithmetic on the published configs (parameters counted the way minissb.model builds them and
checked against the published totals), with these assumptions, which a GPU run should replace:
  weights      bf16, 2 bytes a parameter, on every rank (train.py and grpo.py replicate the base:
               data parallel over the LoRA parameters only, no sharding)
  KV cache     the engine's static cache: slots x positions x layers x 2 x kv heads x 128 x 2 bytes
  LoRA         r 32 on q/k/v/o/gate/up/down; float32 weights, gradients and two AdamW moments
  activations  training keeps ~(16 h + 3 i) bf16 values per token and layer for the backward
               (h hidden, i intermediate), calibrated on nothing better than the shapes; the
               online teacher's forward keeps none (no_grad); the chunked loss adds 256 x vocab
               float32 logits twice
  overhead     1.5 GB (CUDA context, allocator slack)
Sizes: sample.py at 64 slots x (prompt ~700 + 512) positions; eval.py MATH-500 at 64 x 2,300;
train.py with 1 pair per rank's micro-batch of ~420 student tokens (+ ~1,200 teacher tokens
online), --grad-checkpointing keeping only each layer's input.
"""

from __future__ import annotations

CONFIGS = {  # published Qwen2.5 configs: hidden, intermediate, layers, heads, kv heads, vocab, tied; billions published
    "0.5B": (896, 4864, 24, 14, 2, 151936, True, 0.49),
    "1.5B": (1536, 8960, 28, 12, 2, 151936, True, 1.54),
    "3B": (2048, 11008, 36, 16, 2, 151936, True, 3.09),
    "7B": (3584, 18944, 28, 28, 4, 152064, False, 7.62),
    "14B": (5120, 13824, 48, 40, 8, 152064, False, 14.7),
    "32B": (5120, 27648, 64, 40, 8, 152064, False, 32.5),
}
GPUS = (24, 40, 80, 141)  # GB: RTX 4090 / A100-40G / A100-80G, H100 / H200
GB = 1e9
OVERHEAD = 1.5 * GB
LORA_R = 32


def parameters(h, i, layers, heads, kv, vocab, tied):
    d = h // heads
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + (heads + 2 * kv) * d  # q, k, v (with biases), o
    per_layer = attn + 3 * h * i + 2 * h  # MLP and two norms
    return layers * per_layer + vocab * h * (1 if tied else 2) + h


def lora_parameters(h, i, layers, heads, kv):
    d = h // heads
    shapes = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, i), (h, i), (i, h)]
    return layers * sum(LORA_R * (a + b) for a, b in shapes)


def kv_bytes_per_token(layers, kv):
    return layers * 2 * kv * 128 * 2


def estimates(name):
    h, i, layers, heads, kv, vocab, tied, _ = CONFIGS[name]
    weights = 2 * parameters(h, i, layers, heads, kv, vocab, tied)
    lora = 16 * lora_parameters(h, i, layers, heads, kv)
    kv_tok = kv_bytes_per_token(layers, kv)
    logits = 2 * 256 * vocab * 4
    act_tok_layer = 2 * (16 * h + 3 * i)
    student = 420
    return {
        "sample.py": weights + 64 * 1212 * kv_tok + OVERHEAD,
        "eval.py MATH-500": weights + 64 * 2300 * kv_tok + OVERHEAD,
        "train.py": weights + lora + student * layers * act_tok_layer + logits + OVERHEAD,
        "train.py --grad-checkpointing": weights + lora + student * layers * 2 * h + student * act_tok_layer + logits + OVERHEAD,
        "grpo.py (8 x 512 rollouts, 1 per micro-batch)": weights + lora + 8 * 1212 * kv_tok + 712 * layers * act_tok_layer + logits + OVERHEAD,
    }  # the online teacher's ~1,200 tokens add no activations: its forward runs under no_grad


def main():
    print("ESTIMATES from shapes, not measurements (see the docstring for the assumptions)\n")
    print(f"{'model':>5}  {'params (B) ours / published':>28}  {'bf16 weights':>12}  {'KV / token':>10}")
    for name, cfg in CONFIGS.items():
        n = parameters(*cfg[:7]) / 1e9
        print(f"{name:>5}  {n:>15.2f} / {cfg[7]:<10.2f}  {2 * n:>10.1f} GB  {kv_bytes_per_token(cfg[2], cfg[4]) / 1024:>7.0f} KiB")
    stages = list(estimates("0.5B"))
    print()
    header = "| stage | " + " | ".join(CONFIGS) + " |"
    print(header)
    print("|" + "---|" * (len(CONFIGS) + 1))
    for stage in stages:
        cells = []
        for name in CONFIGS:
            need = estimates(name)[stage]
            fits = next((g for g in GPUS if need <= g * GB * 0.95), None)
            cells.append(f"{need / GB:.0f} GB → {fits} GB card" if fits else f"{need / GB:.0f} GB → none of {GPUS[-1]} GB")
        print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
