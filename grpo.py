"""GRPO baseline: train a LoRA on GSM8K train with group-relative policy optimisation (minissb/grpo.py).

    python grpo.py --data ../shared/data --out runs/grpo
    python grpo.py --data ../shared/data --match-ssb runs/ssb/train --out runs/grpo   # SSB's problems and steps
    python eval.py --adapter ssb=runs/ssb/train/adapter --adapter grpo=runs/grpo/adapter

Each step: 4 questions x 8 completions sampled with the student prompt (T 1.0, <= 512 new
tokens), reward 1 for a right final answer (minissb.grader) else 0, group-normalised advantages,
the token-level clipped policy-gradient loss (DAPO normalisation, eps 0.2, no KL by default),
one AdamW step on the LoRA (r 32, alpha 32, lr 1e-5, linear decay); 192 steps, SSB's budget.
Writes into --out: adapter/ (PEFT, for eval.py), metrics.jsonl (one line per step), run.json,
checkpoints/step-N/. Rerunning the same command continues from the newest checkpoint; a finished run
rerun does nothing.

    torchrun --nproc_per_node 8 grpo.py --data ../shared/data --out runs/grpo

splits each step's questions over the ranks for sampling, gathers the rollouts, splits the
forwards and backwards, and adds the gradients (minissb/dist.py): the one-process step.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import minissb.grpo as G
from minissb import dist
from minissb.grpo import DEFAULT_EPOCHS, DEFAULT_MAX_STEPS, DEFAULT_QUESTIONS_PER_STEP, OPTION_TYPES as T, GRPOConfig
from minissb.lora import DEFAULT_TARGETS
from minissb.runs import DTYPE_HELP, ArgumentParser, HelpFormatter, run_main
from minissb.training import MetricsLog, finish, finished_summary, interrupted, lr_at, plot_metrics, save_checkpoint

D = GRPOConfig  # the defaults live on the dataclass, in one place; the allowed ranges in T, checked while parsing
PLOTTED = (("reward_mean", "reward (mean)"), ("accuracy", "accuracy of the samples"), ("frac_all_equal", "groups with equal rewards"),
           ("completion_len", "mean completion length"), ("loss", "loss"), ("kl", "KL to the reference (k3)"),
           ("clip_frac", "clipped tokens"), ("grad_norm", "grad norm"), ("lr", "learning rate"), ("tokens_per_s", "sampled tokens/s"))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="GRPO on a LoRA adapter: the RL baseline for SSB.", formatter_class=HelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--model", default=D.model, help="base model: hub repo id or local HF-format directory (the paper's by default)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dataset", default=D.dataset, help="gsm8k, math500 or aime24 (SSB and its GRPO baseline train on gsm8k)")
    g.add_argument("--split", default=D.split, help="dataset split")
    g.add_argument("--data", default=None, help="local data: a hub-layout mirror dir (e.g. ../shared/data), or a .jsonl/.parquet "
                                                "file; default: download from the hub")
    g.add_argument("--limit", type=T["limit"], default=None, help="use only the first N problems")
    g.add_argument("--match-ssb", default=None, metavar="RUN_DIR",
                   help="a train.py run directory: train on its pairs' problems with its batch size, epochs and step count "
                        "(same order with the same --seed), and print both runs' wall-clock")
    g.add_argument("--system-prompt-file", default=None, help="the student's system prompt from a text file (default: minissb's)")
    g.add_argument("--out", default=D.out, help="run directory: adapter/, metrics.jsonl, run.json, checkpoints/")

    g = p.add_argument_group("model and LoRA")
    g.add_argument("--device", default=D.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=D.dtype, help=DTYPE_HELP + "; LoRA and AdamW stay float32")
    g.add_argument("--lora-r", type=T["lora_r"], default=D.lora_r, help="LoRA rank r (SSB's)")
    g.add_argument("--lora-alpha", type=T["lora_alpha"], default=D.lora_alpha, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora-dropout", type=T["lora_dropout"], default=D.lora_dropout, help="dropout on the LoRA branch input")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated linear layers to adapt")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each decoder layer in backward: less memory")

    g = p.add_argument_group("sampling and reward")
    g.add_argument("--group-size", "-G", type=T["group_size"], default=D.group_size, help="completions per question, G")
    g.add_argument("--questions-per-step", type=T["questions_per_step"], default=None,
                   help=f"questions per step, Q (default: {DEFAULT_QUESTIONS_PER_STEP}, SSB's batch; --match-ssb: that run's)")
    g.add_argument("--max-new-tokens", type=T["max_new_tokens"], default=D.max_new_tokens, help="new-token cap per completion")
    g.add_argument("--temperature", type=T["temperature"], default=D.temperature,
                   help="sampling temperature; the loss's log-probs use it too (as TRL)")
    g.add_argument("--top-k", type=T["top_k"], default=None, help="top-k filter, 0 or unset = off (a filter makes the samples off-policy)")
    g.add_argument("--top-p", type=T["top_p"], default=None, help="nucleus filter in (0, 1], unset = off (off-policy too)")
    g.add_argument("--batch-size", type=T["batch_size"], default=None, help="engine slots (default: Q x G, one step at once)")
    g.add_argument("--sample-unmerged", action="store_true",
                   help="sample through the LoRA branch instead of merged weights (no host copy of the base weights)")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the decode step in CUDA graphs (not yet measured on a GPU)")
    g.add_argument("--format-reward", type=T["format_reward"], default=D.format_reward,
                   help="added to the reward of a completion with a \\boxed{} answer, right or wrong (0 = off)")

    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--no-std", action="store_true", help="advantages r - mean(r), not divided by the group's std (Dr. GRPO)")
    g.add_argument("--loss-norm", choices=("token", "sequence"), default=D.loss_norm,
                   help="token: sum over all tokens / their number (DAPO); sequence: mean over completions of their token means (GRPO)")
    g.add_argument("--clip-eps", type=T["clip_eps"], default=D.clip_eps, help="PPO clip range of the ratio, eps")
    g.add_argument("--beta", type=T["beta"], default=D.beta, help="weight of the k3 KL to the reference (the adapter off); 0 = none")
    g.add_argument("--inner-steps", type=T["inner_steps"], default=D.inner_steps,
                   help="optimizer steps per sampled batch (> 1: the clipped ratio matters)")
    g.add_argument("--micro-batch-size", type=T["micro_batch_size"], default=D.micro_batch_size,
                   help="completions per forward/backward; gradients accumulate to the same update")
    g.add_argument("--loss-chunk-size", type=T["loss_chunk_size"], default=D.loss_chunk_size,
                   help="positions per LM-head chunk (memory: chunk x vocab float32 logits)")
    g.add_argument("--lr", type=T["lr"], default=D.lr, help="peak AdamW learning rate")
    g.add_argument("--lr-schedule", choices=("linear", "cosine"), default=D.lr_schedule, help="decay after the warmup (SSB's: linear)")
    g.add_argument("--warmup-ratio", type=T["warmup_ratio"], default=D.warmup_ratio, help="linear warmup, as a fraction of all steps")
    g.add_argument("--min-lr-ratio", type=T["min_lr_ratio"], default=D.min_lr_ratio, help="the schedule decays to lr x this (1 = constant)")
    g.add_argument("--weight-decay", type=T["weight_decay"], default=D.weight_decay, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=T["max_grad_norm"], default=D.max_grad_norm, help="clip the gradient norm (<= 0: no clipping)")
    g.add_argument("--epochs", type=T["epochs"], default=None, help=f"passes over the problems (default: {DEFAULT_EPOCHS})")
    g.add_argument("--max-steps", type=T["max_steps"], default=None,
                   help=f"at most this many steps, the schedule spans them (default: {DEFAULT_MAX_STEPS}, SSB's 256 pairs x 3 "
                        "epochs / 4; 0 = until the epochs end)")
    g.add_argument("--seed", type=T["seed"], default=D.seed, help="seeds the LoRA init, the problem order and the sampling")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save-every", type=T["save_every"], default=D.save_every, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=T["keep_checkpoints"], default=D.keep_checkpoints, help="recent checkpoints kept (0: all)")
    g.add_argument("--resume", action="store_true", help="insist on continuing the run in --out (rerunning the same command "
                                                         "also continues from its newest checkpoint; a finished run rerun does nothing)")
    g.add_argument("--stop-after-steps", type=T["stop_after_steps"], default=None,
                   help="stop after this many steps with a checkpoint, as if interrupted (the schedule is unchanged)")
    g.add_argument("--plot", action="store_true", help="draw metrics.jsonl into <out>/metrics.png at the end (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    return p


def parse_args(argv=None) -> GRPOConfig:
    a = vars(build_parser().parse_args(argv))
    a["lora_targets"] = tuple(t.strip() for t in a["lora_targets"].split(",") if t.strip())
    a["progress"] = not a.pop("no_progress")
    return GRPOConfig(**a)


def train(cfg: GRPOConfig) -> dict:
    """Run (or continue) a GRPO run into cfg.out: adapter/ (PEFT), metrics.jsonl, run.json,
    checkpoints/step-N/. Returns a summary."""
    world, device = dist.setup(cfg.device)  # a world of one unless launched by torchrun
    cfg = G.check_config(dataclasses.replace(cfg, device=device))
    talk = cfg.progress and world.is_main  # rank 0 alone logs and writes
    out, say = Path(cfg.out), (tqdm.write if talk else (lambda s: None))
    run = G.start_run(cfg, say, world)
    if run is None:  # finished earlier with these settings: its adapter stays as it is
        return finished_summary(out)
    cfg, K = run.cfg, run.cfg.inner_steps  # the budget resolved (defaults or --match-ssb); optimizer steps per step
    stop_at = min(run.total_steps, cfg.stop_after_steps or run.total_steps)
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="grpo", unit="step", disable=not talk, dynamic_ncols=True)
    metrics_path = out / "metrics.jsonl"
    metrics = MetricsLog(metrics_path) if world.is_main else None
    t_start, last = time.perf_counter(), {}
    try:
        for step in range(run.start_step, stop_at):
            t0 = time.perf_counter()
            problems, epoch = G.step_problems(run.problems, step, cfg.questions_per_step, cfg.seed)
            with G.sampling_weights(run.model, run.base_copy):  # merged LoRA; the base weights restored bit for bit after
                groups = G.sample_groups(run.engine, dist.my_slice(problems, world), run.prompt_ids, step, cfg, talk)  # this rank's questions x G
            groups = dist.gather(world, groups)  # every rank holds all Q groups, in question order
            t_sampled = time.perf_counter()
            all_equal = G.assign_advantages(groups, cfg)  # a group whose rewards are all equal has no signal: skipped
            rollouts = [r for g, equal in zip(groups, all_equal) if not equal for r in g]
            # One lr per inner step: the schedule spans every optimizer step.
            lrs = [lr_at(step * K + i, run.total_steps * K, cfg.lr, run.warmup_steps, cfg.min_lr_ratio, cfg.lr_schedule) for i in range(K)]
            update = G.policy_update(run.model, run.optimizer, rollouts, cfg, lrs, run.tok.pad_id,
                                     where=f"at step {step + 1} (epoch {epoch + 1})", world=world)
            t_done, flat = time.perf_counter(), [r for g in groups for r in g]
            sampled, n = sum(len(r.completion_ids) for r in flat), len(flat)
            last = {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4),
                    "reward_mean": sum(r.reward for r in flat) / n, "accuracy": sum(r.correct for r in flat) / n,
                    "frac_all_equal": sum(all_equal) / len(groups), "groups_skipped": sum(all_equal),
                    "completion_len": sampled / n, "frac_truncated": sum(r.finish_reason == "length" for r in flat) / n,
                    "loss": update["loss"], "kl": update["kl"], "clip_frac": update["clip_frac"], "grad_norm": update["grad_norm"],
                    "lr": lrs[-1], "train_tokens": update["train_tokens"], "tokens_per_s": round(sampled / max(t_sampled - t0, 1e-9), 1),
                    "train_tokens_per_s": round(update["input_tokens"] / max(t_done - t_sampled, 1e-9), 1),
                    "sample_time_s": round(t_sampled - t0, 4), "train_time_s": round(t_done - t_sampled, 4),
                    "step_time_s": round(t_done - t0, 4), "elapsed_s": round(t_done - t_start, 2)}
            if run.model.device.type == "cuda":
                last["cuda_max_mem_gb"] = round(torch.cuda.max_memory_allocated(run.model.device) / 2**30, 3)
            if metrics:
                metrics.write(last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", equal=f"{last['frac_all_equal']:.2f}", len=f"{last['completion_len']:.0f}")
            save = (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or (step + 1 == stop_at < run.total_steps)
            if save and world.is_main:
                extra = {"config": run.fingerprint, "data_sha256": run.data_sha256}
                save_checkpoint(out, step + 1, run.model, run.optimizer, extra, cfg.keep_checkpoints, cfg.model)
    except KeyboardInterrupt:
        raise interrupted(out) from None
    finally:
        if metrics:
            metrics.close()
        bar.close()

    adapter = dist.on_main(world, lambda: finish(out, run.model, cfg.model, stop_at, run.total_steps, say))
    summary = {"steps": stop_at, "total_steps": run.total_steps, "metrics": str(metrics_path), "last": last,
               "adapter": adapter, "world_size": world.size, "wall_clock": wall_clock_line(run, metrics_path)}
    say(summary["wall_clock"])
    if cfg.plot and world.is_main:
        summary["plot"] = str(plot_metrics(metrics_path, out / "metrics.png", PLOTTED))
        say(f"plot saved to {summary['plot']}")
    return summary


def wall_clock_line(run: G.GRPORun, metrics_path: Path) -> str:
    """The wall-clock of this run's training, next to the SSB run's when --match-ssb."""
    text = f"wall-clock: GRPO {G.wall_clock(metrics_path) or 0.0:,.1f} s of training ({run.total_steps} steps)"
    if run.ssb is not None:
        train_s, sample_s = run.ssb["train_seconds"], run.ssb["sample_seconds"]
        train_s = "unknown (no metrics.jsonl)" if train_s is None else f"{train_s:,.1f} s"
        sample_s = "" if sample_s is None else f" after {sample_s:,.1f} s of sample.py generation"
        text += f"; SSB train.py {train_s} ({run.ssb['total_steps']} steps){sample_s}"
    return text


def main(argv=None) -> int:
    cfg = parse_args(argv)

    def body():
        last = train(cfg)["last"]
        if last and cfg.progress and dist.launched().is_main:
            print(f"step {last['step']}: reward {last['reward_mean']:.3f}, accuracy {last['accuracy']:.3f}, "
                  f"all-equal groups {last['frac_all_equal']:.2f}, completion length {last['completion_len']:.0f}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
