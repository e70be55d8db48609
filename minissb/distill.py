"""SSB stage 3: distil the teacher's token distributions into a LoRA student.

One training example is one pair written by sample.py. The student reads the chat it will see
at evaluation (system prompt + bare question, rendered with the model's chat template), then
the teacher's solution; the teacher read the hinted prompt, then the same solution:

    student: encode_chat(student_chat, add_generation_prompt=True) + solution_ids + [<|im_end|>]
    teacher: encode_chat(teacher_chat, add_generation_prompt=True) + solution_ids + [<|im_end|>]

With P the prompt length and S = len(solution_ids), positions P-1 .. P+S-1 of each side are
trained (S+1 positions: each predicts the next solution token, the last one <|im_end|>); the
prompt and the padding are masked. The loss (minissb.loss.kd_loss) is T^2 * KL(teacher ||
student) at temperature T, a mean over every trained position of the batch, computed from the
final hidden states with the LM head applied a chunk at a time, so no (batch, seq, vocab)
logits tensor ever exists.

The teacher is either online (the same weights with the LoRA branches switched off, run on
the hinted prompt under no_grad: one extra forward pass per step, no second model in memory)
or captured (the default: sample.py stored the teacher's final hidden states while it wrote
each solution; the loss turns them into logits with the frozen LM head, chunk by chunk, so
training runs no teacher forward at all and holds no teacher activations).

Precision: the base model is held in --dtype (bf16 by default). On CUDA a bf16 model runs
under bf16 autocast; on the CPU it runs in its own dtype with no autocast. Either way the LoRA
weights, their gradients and the AdamW state are float32 (the LoRA branch computes in the
activations' dtype): late in the cosine schedule an update of ~lr = 1e-6 is far below one bf16
step of a weight of ~0.03 (~1e-4), so bf16 adapter weights would stop learning.

Resuming: the data order of epoch e is a permutation drawn from (seed, e) alone, and the
learning rate is a pure function of the step, so a checkpoint needs only the step, the
adapter, the AdamW state and the RNG states to continue exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minissb import dist
from minissb.dist import World
from minissb.lora import DEFAULT_TARGETS, adapters_disabled, apply_lora, lora_parameters
from minissb.loss import LossOutput, kd_loss
from minissb.model import Qwen2ForCausalLM, from_pretrained, resolve_model_dir
from minissb.runs import file_sha256, float_range, int_range, model_identity, resolve_dtype_name, torch_device, torch_dtype
from minissb.targets import CapturedTargets, dtype_name, targets_dir_for
from minissb.tokenizer import Tokenizer
from minissb.training import (NonFiniteLossError, autocast, check_options, check_plot_and_out, enable_gradient_checkpointing,
                              epoch_order, load_checkpoint, plan_run, write_run_json)


@dataclass
class TrainConfig:
    pairs: str
    out: str = "runs/train"
    model: str = "Qwen/Qwen2.5-3B-Instruct"
    tokenizer: str | None = None  # None: the model directory
    teacher: str = "captured"  # "captured" (sample.py's stored hidden states) | "online"
    targets: str | None = None  # captured targets dir; None: <pairs stem>.targets next to the pairs
    device: str = "auto"
    dtype: str = "auto"  # bf16 on CUDA and on CPUs with native bf16, else fp32
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    lr: float = 2e-4
    lr_schedule: str = "linear"  # "linear" decay to lr * min_lr_ratio (the original's Trainer default) or "cosine"
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    warmup_ratio: float = 0.0  # linear warmup, as a fraction of all steps (the original: none)
    student_input: str = "chat"  # "chat": the chat template, as at evaluation; "flat": the original's " ".join(system, question)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    batch_size: int = 4
    micro_batch_size: int | None = None  # None: = batch_size (no accumulation)
    epochs: int = 3
    max_steps: int | None = None  # cap on the total number of steps (the schedule spans it)
    stop_after_steps: int | None = None  # stop early with a checkpoint; the schedule is unchanged
    max_seq_len: int = 4096
    truncate: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard the frozen base layers over the ranks (FSDP2)
    loss_chunk_size: int = 256
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 1
    resume: bool = False
    plot: bool = False
    progress: bool = True


# Options that define the optimisation trajectory: --resume refuses a checkpoint that differs in any.
TRAJECTORY_FIELDS = (
    "model", "teacher", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "temperature",
    "kd_weight", "ce_weight", "lr", "lr_schedule", "min_lr_ratio", "warmup_ratio", "weight_decay", "max_grad_norm",
    "student_input",
    "batch_size", "epochs", "max_steps", "max_seq_len", "truncate", "seed",
)
# The allowed values of every numeric option: train.py parses its options with these types, and
# train() checks a TrainConfig with them (library callers skip argparse). None means unset.
OPTION_TYPES = {
    "max_seq_len": int_range(1), "lora_r": int_range(1), "batch_size": int_range(1), "micro_batch_size": int_range(1),
    "epochs": int_range(1), "max_steps": int_range(1), "stop_after_steps": int_range(1), "loss_chunk_size": int_range(1),
    "seed": int_range(0, 2**32 - 1), "save_every": int_range(0), "keep_checkpoints": int_range(0),
    "lora_alpha": float_range(0, low_open=True),  # 0 would train an adapter that changes nothing
    "lora_dropout": float_range(0, 1, high_open=True), "temperature": float_range(0, low_open=True),
    "kd_weight": float_range(0), "ce_weight": float_range(0), "lr": float_range(0, low_open=True),
    "warmup_ratio": float_range(0, 1), "min_lr_ratio": float_range(0, 1), "weight_decay": float_range(0),
    "max_grad_norm": float_range(),  # <= 0: no clipping
}


# ----------------------------------------------------------------------------- pairs -> examples


@dataclass
class Example:
    """One pair as token ids. Position start+j of `*_ids` predicts labels[j], for j < n."""

    id: str
    student_ids: list[int]
    student_start: int  # P_student - 1
    teacher_ids: list[int] | None  # online teacher only
    teacher_start: int | None
    labels: list[int]  # solution_ids + [<|im_end|>], cut to n when truncated
    solution_len: int  # S before any truncation (captured targets have S + 1 rows)
    truncated: bool

    @property
    def n(self) -> int:
        return len(self.labels)


def load_pairs(path: str | os.PathLike, need_teacher_chat: bool = True) -> list[tuple[int, dict]]:
    """(line number, record) for every pair in a pairs JSONL file, each checked for the fields training reads."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs file {path} not found (write it with sample.py)")
    pairs, seen = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line): was the file edited "
                                 "by hand? re-save it as UTF-8, or write it again with sample.py") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object (a pair), got {type(rec).__name__}")
            pid = rec.get("id")
            if not isinstance(pid, str) or not pid:
                raise ValueError(f"{where}: missing or empty 'id'")
            where = f"{where} (id {pid})"
            if pid in seen:
                raise ValueError(f"{where}: duplicate id, first seen on line {seen[pid]}")
            seen[pid] = line_no
            keys = ("student_chat", "teacher_chat") if need_teacher_chat else ("student_chat",)
            for key in keys:
                chat = rec.get(key)
                if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) for m in chat):
                    raise ValueError(f"{where}: '{key}' must be a non-empty list of chat messages")
            sol = rec.get("solution_ids")
            if not isinstance(sol, list) or not sol or not all(isinstance(t, int) and not isinstance(t, bool) for t in sol):
                raise ValueError(f"{where}: 'solution_ids' must be a non-empty list of token ids")
            if rec.get("finish_reason", "stop") != "stop":
                raise ValueError(f"{where}: finish_reason is {rec['finish_reason']!r}: a solution cut off by the "
                                 "length limit has no real end to learn; drop this pair")
            pairs.append((line_no, rec))
    if not pairs:
        raise ValueError(f"pairs file {path} is empty: no pairs to train on (did sample.py keep any?)")
    return pairs


def build_examples(
    pairs: list[tuple[int, dict]],
    tok: Tokenizer,
    *,
    vocab_size: int,
    max_seq_len: int,
    truncate: bool,
    online_teacher: bool,
    pairs_path: str = "pairs",
    student_input: str = "chat",
) -> list[Example]:
    """Tokenize every pair; a pair longer than max_seq_len is an error, or is cut with truncate=True.

    student_input "flat" is the original code's student: the system prompt and the question
    joined by a space, no chat template, then the solution with no end of turn (S trained
    positions instead of S+1); the teacher side keeps its chat template, as in the original.

    Truncation keeps the first tokens of the solution on both sides alike (the teacher's
    prompt is the longer one), so the student and the teacher stay aligned position by position.
    """
    examples = []
    for line_no, rec in pairs:
        where = f"{pairs_path}:{line_no} (id {rec['id']})"
        solution = rec["solution_ids"]
        bad = next((t for t in solution if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{where}: solution_ids holds token id {bad}, outside the model's vocabulary of "
                             f"{vocab_size}: were the pairs sampled with another model?")
        try:
            if student_input == "flat":
                student_prompt = tok.encode(" ".join(m["content"] for m in rec["student_chat"]).strip())
            else:
                student_prompt = tok.encode_chat(rec["student_chat"], add_generation_prompt=True)
            teacher_prompt = tok.encode_chat(rec["teacher_chat"], add_generation_prompt=True) if online_teacher else None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        completion = solution + ([] if student_input == "flat" else [tok.im_end_id])
        longest_prompt = max(len(student_prompt), len(teacher_prompt) if teacher_prompt else 0)
        n = len(completion)
        if longest_prompt + n > max_seq_len:
            side = "teacher" if teacher_prompt and len(teacher_prompt) > len(student_prompt) else "student"
            if not truncate:
                raise ValueError(f"{where}: the {side} sequence has {longest_prompt + n} tokens, more than --max-seq-len "
                                 f"{max_seq_len}; raise --max-seq-len or pass --truncate")
            n = max_seq_len - longest_prompt
            if n < 1:
                raise ValueError(f"{where}: the {side} prompt alone has {longest_prompt} tokens, leaving no room "
                                 f"for the solution within --max-seq-len {max_seq_len}; raise --max-seq-len")
        labels = completion[:n]
        examples.append(Example(
            id=rec["id"],
            # Input = prompt + the first n completion tokens: the last one is only ever a label.
            student_ids=student_prompt + labels, student_start=len(student_prompt) - 1,
            teacher_ids=teacher_prompt + labels if teacher_prompt else None,
            teacher_start=len(teacher_prompt) - 1 if teacher_prompt else None,
            labels=labels, solution_len=len(solution), truncated=n < len(completion),
        ))
    return examples


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded with pad_id
    attention_mask: torch.Tensor | None  # (B, T) bool, None when no row is padded
    loss_mask: torch.Tensor  # (B, T) bool: the trained positions, row by row
    n_real: int  # real (non-pad) tokens


def collate(rows: list[tuple[list[int], int, int]], pad_id: int, device) -> Batch:
    """Right-pad (ids, start, n) rows into one batch; loss_mask marks positions start .. start+n-1."""
    T = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.bool)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, (row, start, n) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = True
        loss_mask[b, start : start + n] = True
    n_real = int(attn.sum())
    # No padding: leave the mask out so attention takes SDPA's plain causal path.
    attention_mask = None if n_real == attn.numel() else attn.to(device)
    return Batch(ids.to(device), attention_mask, loss_mask.to(device), n_real)


# ----------------------------------------------------------------------------- captured targets


class CapturedTeacher:
    """The teacher's hidden states captured by sample.py (minissb.targets), checked once against
    the model, the dtype and every pair before training starts."""

    def __init__(self, targets_dir: Path, model: str, dtype: torch.dtype, hidden_size: int, pairs: list[tuple[int, dict]]):
        store = CapturedTargets(targets_dir)
        if not targets_dir.is_dir():
            raise ValueError(f"captured teacher targets {targets_dir} not found: sample.py stores them unless --no-targets; "
                             "or train with --teacher online")
        meta = store.read_meta()
        want = {"model": model_identity(model), "teacher_dtype": dtype_name(dtype), "hidden_size": hidden_size}
        for key, value in want.items():
            if meta.get(key) != value:
                raise ValueError(f"{targets_dir} was captured with {key} {meta.get(key)!r}, this run has {value!r}: "
                                 "the teacher's distributions would not be this model's; train with --teacher online")
        self.solutions = {rec["id"]: list(rec["solution_ids"]) for _, rec in pairs}
        missing = [pid for pid in self.solutions if not store.has(pid)]
        if missing:
            raise ValueError(f"{targets_dir} has no targets for pair {missing[0]} ({len(missing)} of {len(self.solutions)} "
                             "missing): were they captured for this pairs file?")
        self.store = store

    def rows(self, ex: Example) -> torch.Tensor:
        """This example's (n, hidden) teacher rows: positions P-1 ... of the hinted sequence."""
        return self.store.read(ex.id, self.solutions[ex.id])[: ex.n]


# ----------------------------------------------------------------------------- the loop


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The one check of a TrainConfig (train.py's options, or a library caller's): a one-line
    ValueError for a bad value; returns it with --dtype auto resolved for this machine."""
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype_name(cfg.dtype, torch_device(cfg.device)))
    if cfg.teacher not in ("captured", "online"):
        raise ValueError(f"--teacher must be captured or online, got {cfg.teacher!r}")
    assert cfg.lr_schedule in ("linear", "cosine") and cfg.student_input in ("chat", "flat"), "train.py's choices"
    check_options(cfg, OPTION_TYPES)
    mb = cfg.micro_batch_size
    if mb is not None and not mb <= cfg.batch_size:
        raise ValueError(f"--micro-batch-size must be between 1 and --batch-size {cfg.batch_size}, got {mb}")
    if cfg.fsdp and not dist.launched().distributed:
        raise ValueError("--fsdp shards the base over torchrun's ranks: launch with torchrun --nproc_per_node 2 or more")
    if cfg.kd_weight == cfg.ce_weight == 0:
        raise ValueError("--kd-weight and --ce-weight are both 0: nothing to train on; set one of them > 0")
    check_plot_and_out(cfg)
    return cfg


def _non_finite(what: str, batch: list[Example], step: int, epoch: int, cfg: TrainConfig) -> NonFiniteLossError:
    """The error for a non-finite loss or gradient norm, with the likely cause: before any update
    it is the settings of the loss or the pairs, after one it is most often a too large --lr."""
    where = f"at step {step + 1} (epoch {epoch + 1}), pairs {', '.join(ex.id for ex in batch)}"
    if step == 0:
        hint = (f"the adapter has not been updated yet, so check --temperature ({cfg.temperature}), --kd-weight "
                f"({cfg.kd_weight}) and --ce-weight ({cfg.ce_weight}), and those pairs")
    else:
        hint = f"lower --lr ({cfg.lr:g}) or --lora-alpha ({cfg.lora_alpha:g}), or check those pairs"
    return NonFiniteLossError(f"non-finite {what} {where}; {hint}")


@torch.no_grad()
def online_teacher_hidden(model: Qwen2ForCausalLM, batch: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """The online teacher: the same weights with the LoRA branches off read the hinted prompts.
    Returns its final hidden states at the trained positions (N, D), pair by pair and position
    by position (the student's order too), and the number of real input tokens."""
    assert all(ex.teacher_ids is not None for ex in batch), "build_examples(online_teacher=True) gives teacher sequences"
    device = model.device
    teacher = collate([(ex.teacher_ids, ex.teacher_start, ex.n) for ex in batch], pad_id, device)
    with adapters_disabled(model), autocast(device, model.dtype):
        hidden = model.hidden_states(teacher.ids, attention_mask=teacher.attention_mask)  # (B, T, D)
    return hidden[teacher.loss_mask], teacher.n_real  # row-major order of the mask


def micro_batch_loss(model: Qwen2ForCausalLM, batch: list[Example], cfg: TrainConfig, pad_id: int,
                     captured: CapturedTeacher | None = None) -> tuple[LossOutput, int]:
    """The loss of one micro-batch (a token mean over its trained positions) and its number of input
    tokens. The teacher's hidden states come from online_teacher_hidden (captured None) or from
    disk; either way kd_loss applies the LM head."""
    device, dtype = model.device, model.dtype
    student = collate([(ex.student_ids, ex.student_start, ex.n) for ex in batch], pad_id, device)
    labels = torch.tensor([t for ex in batch for t in ex.labels], device=device)  # (N,)
    n_input = student.n_real
    if captured is None:
        teacher_hidden, n_teacher = online_teacher_hidden(model, batch, pad_id)
        n_input += n_teacher
    else:  # pair by pair, position by position: the order of the student's loss mask
        teacher_hidden = torch.cat([captured.rows(ex) for ex in batch]).to(device, dtype)  # (N, D)
    with autocast(device, dtype):
        hidden = model.hidden_states(student.ids, attention_mask=student.attention_mask)  # (B, T, D)
        res = kd_loss(hidden, model.lm_head.weight, mask=student.loss_mask, targets=labels, temperature=cfg.temperature,
                      kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight, chunk_size=cfg.loss_chunk_size,
                      teacher_hidden=teacher_hidden)
    return res, n_input


@dataclass
class TrainRun:
    """Everything train.py's loop reads, built by start_run."""

    model: Qwen2ForCausalLM
    tok: Tokenizer
    examples: list[Example]
    captured: CapturedTeacher | None  # None: the online teacher
    params: list[torch.nn.Parameter]  # the LoRA weights, the only trained ones
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_step: int  # > 0 when continuing from a checkpoint
    fingerprint: dict  # the trajectory settings a checkpoint must match
    data_sha256: str
    info: dict  # run.json
    world: World = World()  # torchrun's ranks (minissb.dist); a world of one without it


def start_run(cfg: TrainConfig, say=print, world: World = World()) -> TrainRun | None:
    """Load the pairs, the model and its adapter, and continue from the newest checkpoint when
    rerun; writes run.json. None when cfg.out holds this run finished (nothing to do). Refusals (other settings over a run with something to lose) come
    before the model loads. Under torchrun every rank loads the same and rank 0 alone writes."""
    out = Path(cfg.out)
    device, dtype = torch_device(cfg.device), torch_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    online = cfg.teacher == "online"
    pairs = load_pairs(cfg.pairs, need_teacher_chat=online)
    data_sha = file_sha256(cfg.pairs)
    fingerprint, start, note = plan_run(cfg, TRAJECTORY_FIELDS, data_sha, world)
    if start == "done":
        say(note)
        return None

    model_dir = resolve_model_dir(cfg.model)
    tok = Tokenizer.from_dir(cfg.tokenizer or model_dir)
    model = from_pretrained(model_dir, dtype=dtype, device="cpu" if cfg.fsdp else device)  # --fsdp: shards go to the GPU
    if cfg.max_seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    examples = build_examples(pairs, tok, vocab_size=model.config.vocab_size, max_seq_len=cfg.max_seq_len, truncate=cfg.truncate,
                              online_teacher=online, pairs_path=str(cfg.pairs), student_input=cfg.student_input)
    captured = None
    if not online:
        targets_dir = Path(cfg.targets) if cfg.targets else targets_dir_for(Path(cfg.pairs))
        captured = CapturedTeacher(targets_dir, cfg.model, dtype, model.config.hidden_size, pairs)

    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.fsdp:
        dist.shard_base(model, world, device)
    model.train()  # only LoRA dropout reads it
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)

    # The checkpoint holds nothing per rank (the LoRA weights and AdamW state are the same on every
    # rank), so a run continues at any world size.
    start_step = load_checkpoint(out, model, optimizer, device, fingerprint, data_sha)["step"] if start == "resume" else 0
    n_truncated = sum(ex.truncated for ex in examples)
    info = {"config": dataclasses.asdict(cfg), "data_sha256": data_sha, "n_pairs": len(examples), "n_truncated": n_truncated,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": round(cfg.warmup_ratio * total_steps),
            "device": str(device), "world_size": world.size, "model_dir": str(model_dir),
            "trainable_params": sum(p.numel() for p in params)}
    if world.is_main:
        write_run_json(out, info, start_step)

    ranks = f", {world.size} ranks of ~{cfg.batch_size / world.size:.3g} pairs" if world.distributed else ""
    say(f"{len(examples)} pairs, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs -> {total_steps} steps (batch "
        f"{cfg.batch_size}{ranks}, micro-batch {cfg.micro_batch_size or cfg.batch_size}); teacher {cfg.teacher}; "
        f"{info['trainable_params']:,} LoRA parameters on {device}")
    if n_truncated:
        dropped = sum(ex.solution_len + 1 - ex.n for ex in examples)
        say(f"--truncate: cut {n_truncated} of {len(examples)} pairs to --max-seq-len {cfg.max_seq_len} "
            f"({dropped} solution tokens not trained)")
    for line in filter(None, [note, start_step and f"resuming from step {start_step} of {total_steps}"]):
        say(line)
    return TrainRun(model, tok, examples, captured, params, optimizer, steps_per_epoch, total_steps,
                    info["warmup_steps"], start_step, fingerprint, data_sha, info, world)


def batch_at(run: TrainRun, step: int, cfg: TrainConfig) -> tuple[list[Example], int, list[int], int]:
    """(the pairs of optimizer step `step`, its epoch, that epoch's order, the batch's index in it)."""
    epoch, index = divmod(step, run.steps_per_epoch)
    order = epoch_order(len(run.examples), cfg.seed, epoch)
    return [run.examples[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]], epoch, order, index


def optimizer_step(run: TrainRun, batch: list[Example], cfg: TrainConfig, lr: float, step: int, epoch: int) -> dict:
    """Forward and backward over `batch` a micro-batch at a time, clip, one AdamW step; the step's metrics.

    Each micro-batch's loss is a token mean over its positions, weighted by its share of the
    batch's positions, so the sum is the token mean over the whole batch whatever the micro-batch size.
    Under torchrun each rank does its slice of the batch (same weights: the whole batch's token
    count is known to all), and the gradients and sums are added over ranks: the one-process step."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    n_batch = sum(ex.n for ex in batch)  # the whole batch's: every rank holds all pairs
    micro = cfg.micro_batch_size or cfg.batch_size
    sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "input_tokens": 0, "non_finite": 0}
    my_pairs, bad = dist.my_slice(batch, run.world), None
    pieces = [my_pairs[m : m + micro] for m in range(0, len(my_pairs), micro)]
    if cfg.fsdp:  # every rank runs as many forwards and backwards as the busiest one: the padding has weight 0
        pieces += [None] * (math.ceil(math.ceil(len(batch) / run.world.size) / micro) - len(pieces))
    for mb in pieces:
        if mb is None:
            res, _ = micro_batch_loss(run.model, batch[:1], cfg, run.tok.pad_id, run.captured)
            (res.loss * 0.0).backward()
            continue
        res, n_real = micro_batch_loss(run.model, mb, cfg, run.tok.pad_id, run.captured)
        sums["input_tokens"] += n_real
        if not torch.isfinite(res.loss):  # raised after the sums: other ranks would wait for this one forever
            sums["non_finite"] += 1
            bad = bad or (f"loss ({res.loss.item()})", mb)
            continue
        weight = res.n_tokens / n_batch
        (res.loss * weight).backward()
        sums["loss"] += res.loss.item() * weight
        sums["kl"] += res.kl.item() * weight if res.kl is not None else math.nan
        sums["ce"] += res.ce.item() * weight
    sums = dict(zip(sums, dist.sum_floats(run.world, list(sums.values()))))
    if sums.pop("non_finite"):
        raise _non_finite(*(bad or ("loss on another rank", batch)), step, epoch, cfg)
    dist.sum_grads(run.world, run.params)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm).item()
    if not math.isfinite(grad_norm):
        raise _non_finite("gradient norm", batch, step, epoch, cfg)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**sums, "grad_norm": grad_norm, "lr": lr, "train_tokens": n_batch,
            "completion_len": n_batch / len(batch), "input_tokens": int(sums["input_tokens"])}


__all__ = ["TrainConfig", "NonFiniteLossError", "Example", "load_pairs", "build_examples", "collate", "epoch_order",
           "micro_batch_loss", "online_teacher_hidden", "CapturedTeacher", "TrainRun", "start_run", "batch_at", "optimizer_step",
           "check_config"]
