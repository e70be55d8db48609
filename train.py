"""SSB stage 3: train a LoRA student on the pairs sample.py wrote (see minissb/distill.py).

    python train.py --pairs runs/pairs.jsonl --out runs/train

The defaults reproduce the paper: Qwen/Qwen2.5-3B-Instruct, LoRA r=32 alpha=32 on
q/k/v/o/gate/up/down, T^2 * KL(teacher || student) at T=2, AdamW lr 2e-4 decaying linearly with
no warmup, batch 4, 3 epochs; the teacher's targets are the hidden states sample.py captured
(--teacher online: the same weights with the adapter off, on the hinted prompt, every step).
--recipe original trains the student on the original code's flat-text input.

    torchrun --nproc_per_node 8 train.py --pairs runs/pairs.jsonl --out runs/train

runs data parallel (minissb/dist.py): --batch-size stays the global batch, each rank trains its
slice of it (then --micro-batch-size pairs per forward), and the step is the one-process step.
Rank 0 alone writes; a run continues from its checkpoint at any number of ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minissb import dist
from minissb.distill import OPTION_TYPES as T, TrainConfig, batch_at, check_config, optimizer_step, start_run
from minissb.lora import DEFAULT_TARGETS
from minissb.recipes import add_recipe_argument, parse_with_recipe
from minissb.runs import ArgumentParser, HelpFormatter, run_main
from minissb.training import MetricsLog, finish, finished_summary, interrupted, lr_at, plot_metrics, save_checkpoint

D = TrainConfig  # the defaults live on the dataclass, in one place; the allowed ranges in T, checked while parsing


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Distil teacher token distributions into a LoRA student (SSB stage 3).",
        formatter_class=HelpFormatter,
    )
    io = p.add_argument_group("data and output")
    io.add_argument("--pairs", required=True, help="pairs JSONL written by sample.py")
    io.add_argument("--out", default=D.out, help="run directory: adapter/, metrics.jsonl, run.json, checkpoints/")
    io.add_argument("--model", default=D.model, help="base model: hub repo id or local HF-format directory")
    io.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    io.add_argument("--teacher", choices=("captured", "online"), default=D.teacher,
                    help="captured: the teacher's hidden states sample.py stored as it wrote each solution (no teacher "
                         "forward in training); online: the base model (adapter off) on the hinted prompt, each step "
                         "(needed for pairs that come without captured targets)")
    io.add_argument("--targets", default=None, help="captured targets directory (default: <pairs stem>.targets next to the pairs)")
    io.add_argument("--max-seq-len", type=T["max_seq_len"], default=D.max_seq_len,
                    help="longest prompt + solution in tokens; a longer pair is an error unless --truncate")
    io.add_argument("--truncate", action="store_true",
                    help="cut pairs longer than --max-seq-len (the end of their solution is not trained; counted in the log)")

    m = p.add_argument_group("model and LoRA")
    m.add_argument("--device", default=D.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    m.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=D.dtype,
                   help="base weights' dtype (bf16 autocast on CUDA); auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(avx512_bf16/AMX), else fp32; LoRA weights and AdamW state are always float32")
    m.add_argument("--lora-r", type=T["lora_r"], default=D.lora_r, help="LoRA rank r")
    m.add_argument("--lora-alpha", type=T["lora_alpha"], default=D.lora_alpha, help="LoRA alpha (scaling alpha / r)")
    m.add_argument("--lora-dropout", type=T["lora_dropout"], default=D.lora_dropout, help="dropout on the LoRA branch input")
    m.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated linear layers to adapt")
    m.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen base layers over the ranks (FSDP2), for a base that does "
                        "not fit one GPU; the LoRA weights stay whole on every rank")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass: less activation memory, "
                        "one more student forward per step")

    o = p.add_argument_group("loss and optimisation")
    o.add_argument("--temperature", type=T["temperature"], default=D.temperature, help="KD temperature T (the loss is x T^2)")
    o.add_argument("--kd-weight", type=T["kd_weight"], default=D.kd_weight, help="weight of T^2 * KL(teacher || student)")
    o.add_argument("--ce-weight", type=T["ce_weight"], default=D.ce_weight, help="weight of cross-entropy on the solution tokens")
    o.add_argument("--lr", type=T["lr"], default=D.lr, help="peak AdamW learning rate")
    o.add_argument("--lr-schedule", choices=("linear", "cosine"), default=D.lr_schedule,
                   help="decay after the warmup (linear with no warmup = the Hugging Face Trainer default the original uses)")
    o.add_argument("--warmup-ratio", type=T["warmup_ratio"], default=D.warmup_ratio, help="linear warmup, as a fraction of all steps")
    o.add_argument("--min-lr-ratio", type=T["min_lr_ratio"], default=D.min_lr_ratio, help="the schedule decays to lr x this")
    o.add_argument("--student-input", choices=("chat", "flat"), default=D.student_input,
                   help="chat: the pair's student chat with the chat template, as at evaluation; flat: the original's "
                        "system prompt + ' ' + question as plain text, solution without end of turn")
    o.add_argument("--weight-decay", type=T["weight_decay"], default=D.weight_decay, help="AdamW weight decay")
    o.add_argument("--max-grad-norm", type=T["max_grad_norm"], default=D.max_grad_norm, help="clip the gradient norm (<= 0: no clipping)")
    o.add_argument("--batch-size", type=T["batch_size"], default=D.batch_size, help="pairs per optimizer step (the effective batch)")
    o.add_argument("--micro-batch-size", type=T["micro_batch_size"], default=None,
                   help="pairs per forward/backward; gradients are accumulated up to --batch-size (default: = batch size)")
    o.add_argument("--epochs", type=T["epochs"], default=D.epochs, help="passes over the pairs")
    o.add_argument("--max-steps", type=T["max_steps"], default=None, help="train at most this many steps (the schedule spans them)")
    o.add_argument("--loss-chunk-size", type=T["loss_chunk_size"], default=D.loss_chunk_size,
                   help="positions per LM-head chunk in the loss (memory: chunk x vocab float32 logits)")
    o.add_argument("--seed", type=T["seed"], default=D.seed, help="seeds the LoRA init, the data order and dropout")

    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save-every", type=T["save_every"], default=D.save_every,
                   help="checkpoint every N steps (0: never; a rerun after a stop then starts over)")
    c.add_argument("--keep-checkpoints", type=T["keep_checkpoints"], default=D.keep_checkpoints, help="how many recent checkpoints to keep (0: all)")
    c.add_argument("--resume", action="store_true",
                   help="insist on continuing the run in --out (an error when it holds none); without it, rerunning "
                        "the same command also continues from the newest checkpoint, or starts over when there is none; "
                        "a finished run rerun does nothing")
    c.add_argument("--stop-after-steps", type=T["stop_after_steps"], default=None,
                   help="stop after this many steps with a checkpoint, as if interrupted (the schedule is unchanged)")
    c.add_argument("--plot", action="store_true", help="draw metrics.jsonl into <out>/metrics.png at the end (needs matplotlib)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    add_recipe_argument(p)
    return p


def parse_args(argv=None) -> TrainConfig:
    a = vars(parse_with_recipe(build_parser(), argv, "train"))
    a["lora_targets"] = tuple(t.strip() for t in a["lora_targets"].split(",") if t.strip())
    a["progress"] = not a.pop("no_progress")
    a.pop("recipe", None)
    return TrainConfig(**a)


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) a distillation run into cfg.out: adapter/ (PEFT), metrics.jsonl,
    run.json, checkpoints/step-N/. Returns a summary."""
    world, device = dist.setup(cfg.device)  # a world of one unless launched by torchrun
    cfg = check_config(dataclasses.replace(cfg, device=device))
    out = Path(cfg.out)
    talk = cfg.progress and world.is_main  # rank 0 alone logs and writes
    say = tqdm.write if talk else (lambda s: None)
    run = start_run(cfg, say, world)
    if run is None:  # finished earlier with these settings: its adapter stays as it is
        return finished_summary(out)
    stop_at = min(run.total_steps, cfg.stop_after_steps or run.total_steps)
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", disable=not talk, dynamic_ncols=True)
    metrics_path = out / "metrics.jsonl"
    metrics = MetricsLog(metrics_path) if world.is_main else None
    t_start, last = time.perf_counter(), {}
    try:
        for step in range(run.start_step, stop_at):
            t0 = time.perf_counter()
            batch, epoch, order, index = batch_at(run, step, cfg)
            lr = lr_at(step, run.total_steps, cfg.lr, run.warmup_steps, cfg.min_lr_ratio, cfg.lr_schedule)
            stats = optimizer_step(run, batch, cfg, lr, step, epoch)
            dt, n_input = time.perf_counter() - t0, stats.pop("input_tokens")
            last = {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4), **stats,
                    "tokens_per_s": round(n_input / dt, 1), "step_time_s": round(dt, 4),
                    "elapsed_s": round(time.perf_counter() - t_start, 2)}
            if run.model.device.type == "cuda":
                last["cuda_max_mem_gb"] = round(torch.cuda.max_memory_allocated(run.model.device) / 2**30, 3)
            if metrics:
                metrics.write(last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", kl=f"{last['kl']:.4f}", lr=f"{lr:.2e}")
            save = (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or (step + 1 == stop_at < run.total_steps)
            if save and world.is_main:
                extra = {"config": run.fingerprint, "data_sha256": run.data_sha256, "epoch": epoch,
                         "epoch_order": order, "batch_index": index + 1}
                save_checkpoint(out, step + 1, run.model, run.optimizer, extra, cfg.keep_checkpoints, cfg.model)
    except KeyboardInterrupt:
        raise interrupted(out) from None
    finally:
        if metrics:
            metrics.close()
        bar.close()

    adapter = dist.on_main(world, lambda: finish(out, run.model, cfg.model, stop_at, run.total_steps, say))
    summary = {"steps": stop_at, "total_steps": run.total_steps, "n_truncated": run.info["n_truncated"],
               "metrics": str(metrics_path), "last": last, "adapter": adapter, "world_size": world.size}
    if cfg.plot and world.is_main:
        summary["plot"] = str(plot_metrics(metrics_path, out / "metrics.png"))
        say(f"plot saved to {summary['plot']}")
    return summary


def main(argv=None) -> int:
    cfg = parse_args(argv)

    def body():
        last = train(cfg)["last"]
        if last and cfg.progress and dist.launched().is_main:
            print(f"step {last['step']}: loss {last['loss']:.4g}, kl {last['kl']:.4g}, ce {last['ce']:.4g}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
