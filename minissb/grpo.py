"""GRPO: the reinforcement-learning baseline SSB is compared with, on the same model, LoRA,
checker, prompt and engine, so the paper's SSB-vs-GRPO table can be rerun (grpo.py).

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) without a value model. Each
step takes Q training questions; for each, the policy (base model + LoRA) samples a group of G
completions with the student prompt (prompts.student_chat, as at evaluation). Completion i gets
the reward r_i = 1 if minissb.grader says its final answer is right, else 0 (+ --format-reward
if it has a \\boxed{}), and the group-normalised advantage, the same for all its tokens,

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)     std with Bessel's correction, as TRL
    A_i =  r_i - mean(r)                         --no-std (Dr. GRPO, Liu et al. 2025)

For each completion token t, with rho = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t):

    l_t  = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta KL_t
    KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1      (the k3 estimator of DeepSeekMath and TRL)
    loss = sum_i sum_t l_t / sum_i |o_i|                    token level (DAPO, Yu et al. 2025; TRL's default)
    loss = mean_i (1/|o_i|) sum_t l_t                       --loss-norm sequence (the original GRPO)

pi_old is the policy that sampled the batch: with --inner-steps 1 (the default) rho = 1 and the
loss is the plain policy gradient -A_i log pi_theta; with K inner steps the clip keeps later steps
near pi_old. pi_ref is the same weights with the adapter off (lora.adapters_disabled). A group
whose rewards are all equal has A = 0: it is counted (frac_all_equal) and left out of the loss and
its normaliser. Log-probs come from a training forward pass, never from the sampler. The defaults
(GRPOConfig, with their sources) make only the algorithm differ from SSB (train.py); --match-ssb
takes the problems, batch size, epochs and step count from a train.py run (same order, same --seed).

Sampling from merged weights (the default). Unmerged, each adapted projection adds two small
matmuls, two casts and an add to every decode step: for a 3B model ~1,000 more kernel launches
per step (36 layers x 7 projections x ~4) next to the ~1,400 of an eager decode step, launch-bound
on a GPU (an ESTIMATE from the shapes; not yet measured on a GPU). On this 2-core CPU it makes no
measurable difference (Qwen2.5-0.5B shapes, random weights, bf16, one thread, 32 rows, 4 x 8 samples
of 16 tokens, shared machine: 1.27-1.50 s per decode step merged, 1.26-1.45 s unmerged, four runs;
merging and restoring cost 2-5 s per step, ~1% of 512 decode steps). A bf16 merge + unmerge leaves
~6% of entries one ulp off (minissb.lora), a random walk of the frozen base (the KL reference) over
hundreds of steps; so the adapted base weights are copied to host memory once (0.7 GB for 0.5B,
5.5 GB for 3B in bf16) and copied back after each sampling phase: the base is bit for bit the same
at every step (tested). Merged and unmerged sample the same tokens in float32 (tested); in bf16
rounding lets some long samples diverge.

Determinism: step s's questions are a permutation drawn from (seed, epoch), as train.py draws its
pairs, each question's completions are seeded from (seed, "grpo", "s:<problem id>") whatever the
pool size, and the lr is a function of the step; so a checkpoint (adapter, AdamW, RNG) continues
the same curve (tested in float32).

Read top to bottom: config -> problems and budget (--match-ssb) -> sampling, rewards, advantages ->
log-probs, the loss and the update (inner steps x micro-batches) -> the run. grpo.py holds the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from minissb import distill, dist, grader, prompts
from minissb.data import Problem, data_file, load_problems
from minissb.dist import World
from minissb.engine import Engine, Request
from minissb.lora import (DEFAULT_TARGETS, adapters_disabled, apply_lora, lora_modules, lora_parameters, merge_lora,
                          same_model_name)
from minissb.model import Qwen2ForCausalLM, from_pretrained, resolve_model_dir
from minissb.runs import (file_sha256, float_range, int_range, problem_seed, read_json, read_jsonl, resolve_dtype_name,
                          torch_device, torch_dtype)
from minissb.tokenizer import Tokenizer
from minissb.training import (TIMING_FIELDS, NonFiniteLossError, autocast, check_options, check_plot_and_out,
                              enable_gradient_checkpointing, epoch_order, load_checkpoint, option_flag, plan_run,
                              read_run_json, write_run_json)

# The budget when --match-ssb does not set it: SSB's default run (256 pairs, batch 4, 3 epochs = 192 steps).
DEFAULT_QUESTIONS_PER_STEP, DEFAULT_EPOCHS, DEFAULT_MAX_STEPS = 4, 1, 192
ADVANTAGE_EPS = 1e-4  # TRL's: keeps a group whose rewards barely differ from blowing up
# Timing fields of a metrics line: the only ones a resumed run may write differently.
GRPO_TIMING_FIELDS = (*TIMING_FIELDS, "sample_time_s", "train_time_s", "train_tokens_per_s")


# ----------------------------------------------------------------------------- config


@dataclass
class GRPOConfig:
    out: str = "runs/grpo"
    model: str = "Qwen/Qwen2.5-3B-Instruct"
    tokenizer: str | None = None  # None: the model directory
    dataset: str = "gsm8k"
    split: str = "train"
    data: str | None = None  # local mirror dir or .jsonl/.parquet file; None: the hub (as sample.py)
    limit: int | None = None  # only the first N problems
    match_ssb: str | None = None  # a train.py run dir: its problems, batch size, epochs and steps
    system_prompt_file: str | None = None  # None: prompts.SYSTEM_PROMPT
    device: str = "auto"
    dtype: str = "auto"  # bf16 on CUDA and on CPUs with native bf16, else fp32
    lora_r: int = 32  # r 32, alpha 32, q/k/v/o/gate/up/down, dropout 0: the SSB run's (the paper's)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    grad_checkpointing: bool = False
    group_size: int = 8  # G: TRL GRPOConfig.num_generations
    questions_per_step: int | None = None  # Q; None: DEFAULT_QUESTIONS_PER_STEP (SSB's 4 pairs a step) or the SSB run's batch
    max_new_tokens: int = 512  # Qwen2.5's GSM8K solutions take ~150-400
    temperature: float = 1.0  # T 1.0, no top-k, no top-p: TRL's defaults; samples from exactly pi_theta
    top_k: int | None = None  # 0/None: off
    top_p: float | None = None  # None/1: off
    batch_size: int | None = None  # engine slots; None: Q x G (one step's completions decode together)
    sample_unmerged: bool = False  # sample through the LoRA branch instead of merged weights
    cuda_graphs: bool = False
    format_reward: float = 0.0  # added for a \boxed{} answer, right or wrong
    no_std: bool = False  # advantages r - mean(r), not divided by the group's std (Dr. GRPO); TRL: scale_rewards "group"
    loss_norm: str = "token"  # "token" (DAPO; TRL's loss_type "dapo") or "sequence" (GRPO)
    clip_eps: float = 0.2  # PPO / DeepSeekMath
    beta: float = 0.0  # KL(pi_theta || pi_ref) weight (TRL: KL off by default); 0: no reference forward at all
    inner_steps: int = 1  # optimizer steps per sampled batch
    micro_batch_size: int = 4  # completions per forward/backward (gradients accumulate; same result)
    loss_chunk_size: int = 256  # positions per LM-head chunk: memory is chunk x vocab float32
    # TRL's and DeepSeekMath's GRPO lr for full fine-tuning is 1e-6; LoRA wants ~10x (Schulman et al. 2025, "LoRA
    # Without Regret", rank-free at alpha 32; TRL reproduced it at 1e-5). SSB's 2e-4 is for a supervised loss.
    lr: float = 1e-5
    lr_schedule: str = "linear"  # linear decay, no warmup: SSB's schedule
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # weight decay 0 and grad clip 1.0: the Trainer's defaults, as SSB
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    epochs: int | None = None  # None: DEFAULT_EPOCHS or the SSB run's
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS (SSB's 256 pairs x 3 epochs / 4) or the SSB run's; 0: no cap
    seed: int = 0
    save_every: int = 25
    keep_checkpoints: int = 1
    resume: bool = False
    stop_after_steps: int | None = None
    plot: bool = False
    progress: bool = True


# Options that define the trajectory: a checkpoint made with other values is not continued.
TRAJECTORY_FIELDS = (
    "model", "dtype", "dataset", "split", "limit", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
    "group_size", "questions_per_step", "max_new_tokens", "temperature", "top_k", "top_p", "sample_unmerged",
    "format_reward", "no_std", "loss_norm", "clip_eps", "beta", "inner_steps", "lr", "lr_schedule", "warmup_ratio",
    "min_lr_ratio", "weight_decay", "max_grad_norm", "epochs", "max_steps", "seed",
)
# The allowed values of every numeric option: grpo.py parses with these, check_config checks a
# GRPOConfig with them (library callers skip argparse). None means unset.
OPTION_TYPES = {
    "limit": int_range(1), "lora_r": int_range(1), "lora_alpha": float_range(0, low_open=True),
    "lora_dropout": float_range(0, 1, high_open=True), "group_size": int_range(2), "questions_per_step": int_range(1),
    "max_new_tokens": int_range(1), "temperature": float_range(0, low_open=True), "top_k": int_range(0),
    "top_p": float_range(0, 1, low_open=True), "batch_size": int_range(1), "format_reward": float_range(0),
    "clip_eps": float_range(0, 1, low_open=True, high_open=True), "beta": float_range(0), "inner_steps": int_range(1),
    "micro_batch_size": int_range(1), "loss_chunk_size": int_range(1), "lr": float_range(0, low_open=True),
    "warmup_ratio": float_range(0, 1), "min_lr_ratio": float_range(0, 1), "weight_decay": float_range(0),
    "max_grad_norm": float_range(), "epochs": int_range(1), "max_steps": int_range(0), "seed": int_range(0, 2**32 - 1),
    "save_every": int_range(0), "keep_checkpoints": int_range(0), "stop_after_steps": int_range(1),
}


def check_config(cfg: GRPOConfig) -> GRPOConfig:
    """A one-line ValueError for a bad value, before anything loads; cfg with --dtype auto resolved."""
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype_name(cfg.dtype, torch_device(cfg.device)),
                              lora_targets=tuple(cfg.lora_targets))
    if cfg.loss_norm not in ("token", "sequence") or cfg.lr_schedule not in ("linear", "cosine"):  # grpo.py's choices
        raise ValueError(f"--loss-norm must be token or sequence and --lr-schedule linear or cosine, "
                         f"got {cfg.loss_norm!r} and {cfg.lr_schedule!r}")
    check_options(cfg, OPTION_TYPES)
    if cfg.batch_size is not None and cfg.batch_size < cfg.group_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than --group-size {cfg.group_size}: "
                         "a question's completions decode together, one engine slot each")
    given = [n for n in ("questions_per_step", "epochs", "max_steps", "limit") if getattr(cfg, n) is not None]
    if cfg.match_ssb is not None and given:
        raise ValueError(f"--match-ssb sets the problems, the questions per step, the epochs and the steps from "
                         f"the SSB run; drop {option_flag(given[0])}")
    check_plot_and_out(cfg)
    return cfg


# ----------------------------------------------------------------------------- problems and budget


def wall_clock(metrics_path: Path) -> float | None:
    """Seconds of training a metrics.jsonl records (None: no file). elapsed_s restarts at 0 in a
    resumed process, so each stretch counts up to its last line: the whole run is their sum."""
    if not metrics_path.is_file():
        return None
    total = prev = 0.0
    for m in read_jsonl(metrics_path):
        e = float(m.get("elapsed_s") or 0.0)
        total, prev = total + (prev if e < prev else 0.0), e
    return round(total + prev, 2)


def read_ssb_run(run_dir: str | Path) -> dict:
    """The train.py run in run_dir, checked against its pairs file: its run.json plus dir, pairs, questions (id ->
    question, in the pairs' order), system_prompt, train_seconds (train.py's), sample_seconds (sample.py's) or None."""
    run_dir = Path(run_dir)
    info = read_run_json(run_dir)
    if info is None or "pairs" not in info["config"] or "total_steps" not in info:
        raise ValueError(f"--match-ssb {run_dir}: no run.json of a train.py run there")
    cfg = info["config"]
    bad = [k for k in ("batch_size", "epochs") if not isinstance(cfg.get(k), int)]
    if bad or not isinstance(cfg["pairs"], str) or not isinstance(info["total_steps"], int):
        raise ValueError(f"--match-ssb {run_dir}: run.json lacks {bad[0] if bad else 'pairs or total_steps'}: not a train.py run")
    pairs = Path(cfg["pairs"]).expanduser()
    if not pairs.is_file():
        raise ValueError(f"--match-ssb {run_dir}: its pairs file {pairs} (as recorded in run.json) is not found from "
                         "here: run grpo.py from the directory train.py ran in")
    if info.get("data_sha256") and file_sha256(pairs) != info["data_sha256"]:
        raise ValueError(f"--match-ssb {run_dir}: {pairs} changed since that run trained on it")
    records = read_jsonl(pairs, own_output=False)
    if not records or not all(isinstance(r.get("id"), str) and isinstance(r.get("question"), str) for r in records):
        raise ValueError(f"--match-ssb {run_dir}: {pairs} holds no pairs with an id and a question")
    summary = pairs.with_name((pairs.stem if pairs.suffix == ".jsonl" else pairs.name) + ".summary.json")
    chat = records[0].get("student_chat")
    system = chat[0].get("content") if isinstance(chat, list) and chat and isinstance(chat[0], dict) and chat[0].get("role") == "system" else None
    return {**info, "dir": str(run_dir), "pairs": str(pairs), "questions": {r["id"]: r["question"] for r in records},
            "system_prompt": system, "train_seconds": wall_clock(run_dir / "metrics.jsonl"),
            "sample_seconds": read_json(summary).get("generation_seconds") if summary.is_file() else None}


def training_problems(cfg: GRPOConfig) -> tuple[GRPOConfig, list[Problem], dict | None, str, str | None]:
    """(cfg with the budget: the defaults or the SSB run's, the problems: all or the SSB run's in its pairs'
    order, the SSB run, the hash of what is trained on, the system prompt)."""
    ssb = read_ssb_run(cfg.match_ssb) if cfg.match_ssb else None
    system = prompts.read_prompt_file(cfg.system_prompt_file, teacher=False) if cfg.system_prompt_file else None
    problems = load_problems(cfg.dataset, split=cfg.split, source=cfg.data, limit=cfg.limit)
    if not problems:
        raise ValueError(f"{cfg.dataset}/{cfg.split} has no problems to train on")
    if ssb is None:
        cfg = dataclasses.replace(cfg, questions_per_step=cfg.questions_per_step or DEFAULT_QUESTIONS_PER_STEP,
                                  epochs=cfg.epochs or DEFAULT_EPOCHS, max_steps=DEFAULT_MAX_STEPS if cfg.max_steps is None else cfg.max_steps)
    else:
        by_id, questions = {p.id: p for p in problems}, ssb["questions"]
        missing = [i for i in questions if i not in by_id]
        if missing:
            raise ValueError(f"--match-ssb: problem {missing[0]} of {ssb['pairs']} ({len(missing)} of {len(questions)}) is "
                             f"not in {cfg.dataset}/{cfg.split} as read from --data: pass the --data sample.py read")
        problems = [by_id[i] for i in questions]
        changed = [p.id for p in problems if p.question.strip() != questions[p.id].strip()]
        if changed:
            raise ValueError(f"--match-ssb: problem {changed[0]} reads differently in --data than in {ssb['pairs']}: "
                             "pass the --data sample.py read")
        cfg = dataclasses.replace(cfg, questions_per_step=ssb["config"]["batch_size"], epochs=ssb["config"]["epochs"],
                                  max_steps=ssb["total_steps"])
    # One hash for what is trained on: the data file, which of its problems, the system prompt.
    digest = hashlib.sha256(file_sha256(data_file(cfg.dataset, cfg.split, cfg.data)).encode())
    digest.update(json.dumps([[p.id for p in problems], system]).encode())
    return cfg, problems, ssb, digest.hexdigest(), system


def ssb_mismatches(ssb: dict, cfg: GRPOConfig, system: str | None = None) -> list[str]:
    """Settings that should match for a fair comparison but differ from the SSB run's (warned about)."""
    ours = {"model": cfg.model, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_targets": list(cfg.lora_targets),
            "dtype": cfg.dtype}
    theirs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in ssb["config"].items() if k in ours}
    if "model" in theirs:  # a hub id and a local copy of it are the same model: compare the last path part
        theirs["model"], ours["model"] = same_model_name(theirs["model"]), same_model_name(ours["model"])
    out = [f"{option_flag(k)} is {ours[k]!r} here but {theirs[k]!r} in the SSB run" for k in theirs if theirs[k] != ours[k]]
    if ssb["system_prompt"] not in (None, prompts.SYSTEM_PROMPT if system is None else system):
        out.append("the system prompt differs from the one in the SSB run's pairs (pass the --system-prompt-file sample.py read)")
    return out


def step_problems(problems: list[Problem], step: int, per_step: int, seed: int) -> tuple[list[Problem], int]:
    """(the questions of step `step`, its epoch): consecutive slices of each epoch's order."""
    epoch, index = divmod(step, math.ceil(len(problems) / per_step))
    order = epoch_order(len(problems), seed, epoch)
    return [problems[i] for i in order[index * per_step : (index + 1) * per_step]], epoch


# ----------------------------------------------------------------------------- sampling, rewards and advantages


@dataclass
class Rollout:
    """One sampled completion of one question, with its reward and (later) its advantage."""

    problem_id: str
    prompt_ids: list[int]
    completion_ids: list[int]  # the sampled tokens, then the stop token when it stopped (trained too)
    finish_reason: str  # "stop" or "length"
    reward: float
    correct: bool
    advantage: float = 0.0


def base_weight_copy(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """The adapted layers' base weights, copied to host memory once, to restore after each merge."""
    return {name: m.weight.detach().to("cpu", copy=True) for name, m in lora_modules(model)}


@contextmanager
def sampling_weights(model: Qwen2ForCausalLM, base_copy: dict[str, torch.Tensor] | None):
    """Inside: the weights the engine samples with. base_copy None: unchanged (the LoRA branch runs
    at every decode step). Else W <- W + sBA, and on the way out W is copied back from base_copy:
    bit for bit the base, with none of unmerge_lora's rounding."""
    if base_copy is not None:
        merge_lora(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, m in lora_modules(model) if base_copy is not None else ():
                m.weight.copy_(base_copy[name])
                m.merged = False


def reward(text: str, finished: bool, problem: Problem, format_reward: float = 0.0) -> tuple[float, bool]:
    """(reward, right?): 1 when the checker says the final answer is right (a cut-off response
    counts only through a closed \\boxed{}, as in eval.py), plus format_reward for any \\boxed{}."""
    correct = grader.grade(text, problem.gold, problem.dataset, finished=finished)
    boxed = format_reward > 0 and grader.extract_answer(text, problem.dataset, fallback=False, finished=finished) is not None
    return float(correct) + (format_reward if boxed else 0.0), correct


def sample_groups(engine: Engine, problems: list[Problem], prompt_ids: dict[str, list[int]], step: int, cfg: GRPOConfig,
                  progress: bool = False) -> list[list[Rollout]]:
    """The step's groups of G rewarded rollouts, in question order (the engine finishes them in any
    order); each question's samples are seeded from (seed, step, problem id) alone."""
    requests = [Request(prompt=prompt_ids[p.id], max_new_tokens=cfg.max_new_tokens, num_samples=cfg.group_size,
                        temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                        seed=problem_seed(cfg.seed, "grpo", f"{step}:{p.id}"), tag=i) for i, p in enumerate(problems)]
    groups: list[list[Rollout] | None] = [None] * len(problems)
    for out in tqdm(engine.run(requests), total=len(problems), desc=f"sample {step + 1}", unit="q", leave=False,
                    disable=not progress, dynamic_ncols=True):
        p, group = problems[out.request.tag], []
        for c in out.completions:
            finished = c.finish_reason == "stop"
            r, correct = reward(c.text or "", finished, p, cfg.format_reward)
            ids = list(c.token_ids) + ([c.stop_id] if finished else [])
            group.append(Rollout(p.id, list(out.request.prompt), ids, c.finish_reason, r, correct))
        groups[out.request.tag] = group
    return groups


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = ADVANTAGE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (Q, G) -> (advantages (Q, G), all_equal (Q,) bool): r - mean(r) per group, over
    (std(r) + eps) with Bessel's correction unless not scale_by_std; an all-equal group gets exactly 0."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (questions, G >= 2), got shape {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    all_equal = (rewards == rewards[:, :1]).all(dim=1)
    return adv.masked_fill(all_equal[:, None], 0.0), all_equal


def assign_advantages(groups: list[list[Rollout]], cfg: GRPOConfig) -> list[bool]:
    """Set each rollout's advantage; returns, per group, whether its rewards are all equal."""
    rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float64)  # (Q, G)
    adv, all_equal = group_advantages(rewards, scale_by_std=not cfg.no_std)
    for g, row in zip(groups, adv.tolist()):
        for r, a in zip(g, row):
            r.advantage = a
    return all_equal.tolist()


# ----------------------------------------------------------------------------- log-probs, the loss and the update


@dataclass
class Batch(distill.Batch):  # ids (B, T) right-padded, loss_mask (B, T), attention_mask, n_real: distill.collate's
    labels: torch.Tensor  # (N,) the completion tokens, rollout by rollout (the loss mask's row-major order)


def _chunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(h W^T / T)[label] for a chunk of rows: (n, D) -> (n,), in float32 (float64 for float64)."""
    logits = torch.nn.functional.linear(hidden, weight)  # (n, V) in the weights' dtype, like the model's own logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return logits.log_softmax(dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def completion_logprobs(model: Qwen2ForCausalLM, batch: Batch, temperature: float = 1.0, chunk_size: int = 256) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of every completion token of `batch`: (N,), differentiable. With
    gradients on, each LM-head chunk is checkpointed: its (chunk, V) float32 logits are recomputed
    in backward, so no (N, V) tensor ever exists. temperature: the sampling one (as TRL)."""
    with autocast(model.device, model.dtype):
        hidden = model.hidden_states(batch.ids, attention_mask=batch.attention_mask)  # (B, T, D)
        rows, weight, out = hidden[batch.loss_mask], model.lm_head.weight, []  # rows (N, D), rollout by rollout
        for s in range(0, rows.shape[0], chunk_size):
            args = (rows[s : s + chunk_size], batch.labels[s : s + chunk_size], weight, temperature)
            if torch.is_grad_enabled():
                out.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                out.append(_chunk_logprobs(*args))
    return torch.cat(out)


@torch.no_grad()
def reference_logprobs(model: Qwen2ForCausalLM, batch: Batch, cfg: GRPOConfig) -> torch.Tensor:
    """log pi_ref of the completion tokens: the same weights with every adapter off."""
    with adapters_disabled(model):
        return completion_logprobs(model, batch, cfg.temperature, cfg.loss_chunk_size)


def token_weights(lengths: list[int], norm: str = "token") -> torch.Tensor:
    """(N,) weights w_t with loss = sum_t w_t l_t over all completions of the update:
    token: 1 / (all their tokens); sequence: 1 / (number of completions x its own length)."""
    if norm == "token":
        return torch.full((sum(lengths),), 1.0 / sum(lengths))
    return torch.cat([torch.full((n,), 1.0 / (len(lengths) * n)) for n in lengths])


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar sum_t w_t l_t; call .backward() on it
    kl_sum: float  # sum over these tokens of KL_t (0 without a reference)
    clipped: int  # tokens whose clip is active (their gradient is zero)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
              clip_eps: float = 0.2, beta: float = 0.0, ref_logprobs: torch.Tensor | None = None) -> LossParts:
    """The clipped GRPO objective over N tokens (all (N,)): sum_t w_t (-min(rho A, clip(rho) A) + beta KL_t),
    rho = exp(logprobs - old_logprobs). A token counts as clipped where the clipped term is the smaller
    one and flat: rho < 1 - eps with A < 0, or rho > 1 + eps with A > 0 (at 1 +- eps it still learns)."""
    ratio = torch.exp(logprobs - old_logprobs.detach())
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl_sum = 0.0
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        d = ref_logprobs.detach() - logprobs  # log(pi_ref / pi_theta)
        kl = d.exp() - d - 1  # k3: unbiased for KL(pi_theta || pi_ref) and never negative
        per_token = per_token + beta * kl
        kl_sum = kl.detach().sum().item()
    active = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0))
    return LossParts((weights * per_token).sum(), kl_sum, int(active.sum()))


@dataclass
class MicroBatch:
    rollouts: list[Rollout]
    batch: Batch
    advantages: torch.Tensor  # (N,) each token gets its completion's advantage
    weights: torch.Tensor  # (N,) its share of the whole update's loss
    old: torch.Tensor | None = None  # log pi_old, set on the first pass (pi_old = the sampling policy)
    ref: torch.Tensor | None = None  # log pi_ref, when beta > 0


def micro_batches(rollouts: list[Rollout], cfg: GRPOConfig, pad_id: int, device, world: World = World()) -> list[MicroBatch]:
    """The update's rollouts in forward-sized pieces, sorted by length (less padding), with their
    tokens' advantages and loss weights (over all rollouts: the pieces sum to the loss). Under
    torchrun a rank keeps every world-th rollout of that order (similar lengths per rank)."""
    rollouts = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
    lengths = [len(r.completion_ids) for r in rollouts]
    weights = token_weights(lengths, cfg.loss_norm).split(lengths)
    rollouts, weights, mb = rollouts[world.rank :: world.size], weights[world.rank :: world.size], cfg.micro_batch_size
    out = []
    for s in range(0, len(rollouts), mb):
        part = rollouts[s : s + mb]
        # A row is prompt + completion minus its last token (only ever a label): positions P-1 .. P+n-2 predict the completion.
        rows = [(r.prompt_ids + r.completion_ids[:-1], len(r.prompt_ids) - 1, len(r.completion_ids)) for r in part]
        labels = torch.tensor([t for r in part for t in r.completion_ids], device=device)
        batch = Batch(**vars(distill.collate(rows, pad_id, device)), labels=labels)
        adv = torch.tensor([r.advantage for r in part for _ in r.completion_ids], dtype=torch.float32, device=device)
        out.append(MicroBatch(part, batch, adv, torch.cat(weights[s : s + mb]).to(device)))
    return out


def accumulate_gradients(model: Qwen2ForCausalLM, micro: list[MicroBatch], cfg: GRPOConfig, where: str = "") -> dict:
    """One forward and backward over every micro-batch: the whole update's loss gradient ends up
    in the LoRA weights' .grad. The first call fixes pi_old (and pi_ref) for the later inner steps."""
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0, "tokens": 0, "input_tokens": 0, "non_finite": 0}
    for mb in micro:
        if cfg.beta > 0 and mb.ref is None:
            mb.ref = reference_logprobs(model, mb.batch, cfg)
            sums["input_tokens"] += mb.batch.n_real
        lp = completion_logprobs(model, mb.batch, cfg.temperature, cfg.loss_chunk_size)  # (N,)
        if mb.old is None:
            mb.old = lp.detach()  # on-policy: rho = 1 at the first inner step
        parts = grpo_loss(lp, mb.old, mb.advantages, mb.weights, cfg.clip_eps, cfg.beta, mb.ref)
        if not torch.isfinite(parts.loss):  # raised by policy_update after the sums: other ranks would wait forever
            sums["non_finite"] += 1
            ids = ", ".join(sorted({r.problem_id for r in mb.rollouts}))
            sums.setdefault("bad", f"loss ({parts.loss.item()}) {where}, problems {ids}")
            continue
        parts.loss.backward()
        for key, value in (("loss", parts.loss.item()), ("kl_sum", parts.kl_sum), ("clipped", parts.clipped),
                           ("tokens", lp.numel()), ("input_tokens", mb.batch.n_real)):
            sums[key] += value
    return sums


def policy_update(model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, rollouts: list[Rollout], cfg: GRPOConfig,
                  lrs: list[float], pad_id: int, where: str = "", world: World = World()) -> dict:
    """len(lrs) AdamW steps on one sampled batch (none without rollouts): the mean loss, KL and clip fraction,
    the last grad norm. Under torchrun every rank holds all rollouts, does its share of the forwards and
    backwards, and the gradients and sums are added over ranks before the (identical) AdamW step."""
    if not rollouts:
        return {"loss": None, "kl": None, "clip_frac": None, "grad_norm": None, "train_tokens": 0, "input_tokens": 0}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    micro = micro_batches(rollouts, cfg, pad_id, model.device, world)
    steps = []
    for k, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        s = accumulate_gradients(model, micro, cfg, f"{where}, inner step {k + 1}")
        bad = s.pop("bad", None)
        s = dict(zip(s, dist.sum_floats(world, list(s.values()))))
        if s["non_finite"]:
            raise NonFiniteLossError(f"non-finite {bad or f'loss on another rank {where}'}; "
                                     f"lower --lr ({cfg.lr:g}) or check --beta ({cfg.beta:g})")
        dist.sum_grads(world, params)
        s["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf).item()
        if not math.isfinite(s["grad_norm"]):
            raise NonFiniteLossError(f"non-finite gradient norm {where}, inner step {k + 1}; lower --lr ({cfg.lr:g})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(s)
    K = len(steps)
    return {"loss": sum(s["loss"] for s in steps) / K, "clip_frac": sum(s["clipped"] / s["tokens"] for s in steps) / K,
            "kl": sum(s["kl_sum"] / s["tokens"] for s in steps) / K if cfg.beta > 0 else None, "grad_norm": steps[-1]["grad_norm"],
            "train_tokens": sum(len(r.completion_ids) for r in rollouts), "input_tokens": sum(s["input_tokens"] for s in steps)}


# ----------------------------------------------------------------------------- the run


@dataclass
class GRPORun:
    """Everything grpo.py's loop reads, built by start_run."""

    cfg: GRPOConfig  # with the budget resolved
    model: Qwen2ForCausalLM
    tok: Tokenizer
    engine: Engine
    optimizer: torch.optim.Optimizer
    problems: list[Problem]
    prompt_ids: dict[str, list[int]]  # problem id -> the rendered student chat
    base_copy: dict[str, torch.Tensor] | None  # None: sample unmerged
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int  # in optimizer steps (total_steps x inner_steps of them)
    start_step: int
    fingerprint: dict  # the trajectory settings a checkpoint must match
    data_sha256: str
    ssb: dict | None  # read_ssb_run's, with --match-ssb


def start_run(cfg: GRPOConfig, say=print, world: World = World()) -> GRPORun | None:
    """Load the problems, the model and its adapter, and continue from the newest checkpoint when
    rerun; writes run.json. None when cfg.out holds this run finished (nothing to do). Refusals (other settings over a run with something to lose) come
    before the model loads. Under torchrun every rank loads the same and rank 0 alone writes."""
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    cfg, problems, ssb, data_sha, system = training_problems(cfg)
    fingerprint, start, note = plan_run(cfg, TRAJECTORY_FIELDS, data_sha, world, data_name="training problems")
    if start == "done":
        say(note)
        return None

    model_dir = resolve_model_dir(cfg.model)
    tok = Tokenizer.from_dir(cfg.tokenizer or model_dir)
    model = from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype), device=torch_device(cfg.device))
    texts = [tok.render_chat(prompts.student_chat(p.question, system), add_generation_prompt=True) for p in problems]
    prompt_ids = {p.id: ids for p, ids in zip(problems, tok.encode_batch(texts))}
    max_len = max(len(ids) for ids in prompt_ids.values()) + cfg.max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"the longest prompt + --max-new-tokens {cfg.max_new_tokens} = {max_len} tokens exceeds the model's "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # only LoRA dropout reads it; the engine samples in eval mode
    slots = cfg.batch_size or math.ceil(cfg.questions_per_step / world.size) * cfg.group_size  # this rank's questions
    engine = Engine(model, slots, max_len, stop_ids=tok.stop_ids, tokenizer=tok, cuda_graphs=cfg.cuda_graphs)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(problems) / cfg.questions_per_step)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    warmup_steps = round(cfg.warmup_ratio * total_steps * cfg.inner_steps)
    start_step = load_checkpoint(out, model, optimizer, model.device, fingerprint, data_sha, "training problems")["step"] if start == "resume" else 0
    base_copy = None if cfg.sample_unmerged else base_weight_copy(model)  # after loading: the base weights only
    info = {"world_size": world.size, "config": dataclasses.asdict(cfg), "data_sha256": data_sha, "n_problems": len(problems),
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "optimizer_steps": total_steps * cfg.inner_steps,
            "warmup_steps": warmup_steps, "device": str(model.device), "model_dir": str(model_dir),
            "engine_slots": engine.num_slots, "engine_max_len": engine.max_len,
            "trainable_params": sum(p.numel() for p in lora_parameters(model)),
            "match_ssb": None if ssb is None else {"dir": ssb["dir"], "pairs": ssb["pairs"], "n_pairs": len(ssb["questions"]),
                                                   "total_steps": ssb["total_steps"], "train_seconds": ssb["train_seconds"]}}
    if world.is_main:
        write_run_json(out, info, start_step)

    say(f"{len(problems)} problems, {cfg.questions_per_step} questions x {cfg.group_size} completions per step, "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs -> {total_steps} steps ({cfg.inner_steps} optimizer step(s) "
        f"each); {info['trainable_params']:,} LoRA parameters on {model.device}; sampling "
        f"{'unmerged' if cfg.sample_unmerged else 'merged'}, {engine.num_slots} slots")
    if ssb is not None:
        order = "the same order" if cfg.seed == int(ssb["config"].get("seed", 0)) else "another order (another --seed)"
        say(f"--match-ssb {ssb['dir']}: the SSB run's {len(problems)} problems, {cfg.questions_per_step} per step, "
            f"{cfg.epochs} epochs -> {ssb['total_steps']} steps, in {order}")
        for line in ssb_mismatches(ssb, cfg, system) if world.is_main else []:
            warnings.warn(f"--match-ssb: {line}: the comparison is not like for like")
    for line in filter(None, [note, start_step and f"resuming from step {start_step} of {total_steps}"]):
        say(line)
    return GRPORun(cfg, model, tok, engine, optimizer, problems, prompt_ids, base_copy, steps_per_epoch, total_steps,
                   warmup_steps, start_step, fingerprint, data_sha, ssb)

