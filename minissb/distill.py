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

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from minissb.cli import check_output_dir, float_range, int_range, resolve_dtype_name, torch_device, torch_dtype
from minissb.data import atomic_write, config_differences, file_sha256, names_file, remove_temp_files
from minissb.lora import DEFAULT_TARGETS, WEIGHTS_FILE, adapters_disabled, apply_lora, load_adapter, lora_parameters, save_adapter
from minissb.loss import LossOutput, kd_loss
from minissb.model import Qwen2ForCausalLM, from_pretrained, resolve_model_dir
from minissb.targets import CapturedTargets, TargetsError, dtype_name, targets_dir_for
from minissb.tokenizer import Tokenizer


class TrainError(ValueError):
    """Training cannot start or go on; the message says what to fix."""


class NonFiniteLossError(TrainError):
    """The loss or the gradient norm became inf/nan; the message names the step and the pairs."""


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
# Timing fields of a metrics line: the only ones that differ between a run and its resumed twin.
TIMING_FIELDS = ("tokens_per_s", "step_time_s", "elapsed_s", "cuda_max_mem_gb")
STATE_FILE = "state.pt"


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
        raise TrainError(f"pairs file {path} not found (write it with sample.py)")
    pairs, seen = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise TrainError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line): was the file edited "
                                 "by hand? re-save it as UTF-8, or write it again with sample.py") from None
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: malformed JSON ({e})") from None
            if not isinstance(rec, dict):
                raise TrainError(f"{where}: expected a JSON object (a pair), got {type(rec).__name__}")
            pid = rec.get("id")
            if not isinstance(pid, str) or not pid:
                raise TrainError(f"{where}: missing or empty 'id'")
            where = f"{where} (id {pid})"
            if pid in seen:
                raise TrainError(f"{where}: duplicate id, first seen on line {seen[pid]}")
            seen[pid] = line_no
            keys = ("student_chat", "teacher_chat") if need_teacher_chat else ("student_chat",)
            for key in keys:
                chat = rec.get(key)
                if not isinstance(chat, list) or not chat or not all(isinstance(m, dict) for m in chat):
                    raise TrainError(f"{where}: '{key}' must be a non-empty list of chat messages")
            sol = rec.get("solution_ids")
            if not isinstance(sol, list) or not sol or not all(isinstance(t, int) and not isinstance(t, bool) for t in sol):
                raise TrainError(f"{where}: 'solution_ids' must be a non-empty list of token ids")
            if rec.get("finish_reason", "stop") != "stop":
                raise TrainError(f"{where}: finish_reason is {rec['finish_reason']!r}: a solution cut off by the "
                                 "length limit has no real end to learn; drop this pair")
            pairs.append((line_no, rec))
    if not pairs:
        raise TrainError(f"pairs file {path} is empty: no pairs to train on (did sample.py keep any?)")
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
            raise TrainError(f"{where}: solution_ids holds token id {bad}, outside the model's vocabulary of "
                             f"{vocab_size}: were the pairs sampled with another model?")
        try:
            if student_input == "flat":
                student_prompt = tok.encode(" ".join(m["content"] for m in rec["student_chat"]).strip())
            else:
                student_prompt = tok.encode_chat(rec["student_chat"], add_generation_prompt=True)
            teacher_prompt = tok.encode_chat(rec["teacher_chat"], add_generation_prompt=True) if online_teacher else None
        except ValueError as e:
            raise TrainError(f"{where}: {e}") from None
        completion = solution + ([] if student_input == "flat" else [tok.im_end_id])
        longest_prompt = max(len(student_prompt), len(teacher_prompt) if teacher_prompt else 0)
        n = len(completion)
        if longest_prompt + n > max_seq_len:
            side = "teacher" if teacher_prompt and len(teacher_prompt) > len(student_prompt) else "student"
            need = longest_prompt + n
            if not truncate:
                raise TrainError(f"{where}: the {side} sequence has {need} tokens, more than --max-seq-len "
                                 f"{max_seq_len}; raise --max-seq-len or pass --truncate")
            n = max_seq_len - longest_prompt
            if n < 1:
                raise TrainError(f"{where}: the {side} prompt alone has {longest_prompt} tokens, leaving no room "
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n examples in `epoch`: a function of (seed, epoch) only, so a resumed run replays it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then a linear or cosine
    decay to lr * min_lr_ratio. Linear with no warmup is the Hugging Face Trainer's default
    (lr * (1 - step / total)), which the original SSB code trains with."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def enable_gradient_checkpointing(model: Qwen2ForCausalLM) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Peak activation memory drops from ~all layers' intermediates to one layer's plus each
    layer's input; the price is a second forward through every layer. Under no_grad (the
    online teacher) the layers run as usual.
    """
    for layer in model.model.layers:
        layer.forward = functools.partial(_checkpointed_call, layer.forward)


def _checkpointed_call(forward, *args):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


# ----------------------------------------------------------------------------- captured targets


def model_identity(name_or_path: str) -> str:
    """A local model path made absolute (as sample.py records it); a hub id as is."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else str(name_or_path)


class CapturedTeacher:
    """The teacher's hidden states captured by sample.py (minissb.targets), checked once against
    the model, the dtype and every pair before training starts."""

    def __init__(self, targets_dir: Path, model: str, dtype: torch.dtype, hidden_size: int, pairs: list[tuple[int, dict]]):
        store = CapturedTargets(targets_dir)
        if not targets_dir.is_dir():
            raise TrainError(f"captured teacher targets {targets_dir} not found: sample.py stores them unless --no-targets; "
                             "or train with --teacher online")
        try:
            meta = store.read_meta()
        except TargetsError as e:
            raise TrainError(str(e)) from None
        want = {"model": model_identity(model), "teacher_dtype": dtype_name(dtype), "hidden_size": hidden_size}
        for key, value in want.items():
            if meta.get(key) != value:
                raise TrainError(f"{targets_dir} was captured with {key} {meta.get(key)!r}, this run has {value!r}: "
                                 "the teacher's distributions would not be this model's; train with --teacher online")
        self.solutions = {rec["id"]: list(rec["solution_ids"]) for _, rec in pairs}
        missing = [pid for pid in self.solutions if not store.has(pid)]
        if missing:
            raise TrainError(f"{targets_dir} has no targets for pair {missing[0]} ({len(missing)} of {len(self.solutions)} "
                             "missing): were they captured for this pairs file?")
        self.store = store

    def rows(self, ex: Example) -> torch.Tensor:
        """This example's (n, hidden) teacher rows: positions P-1 ... of the hinted sequence."""
        try:
            return self.store.read(ex.id, self.solutions[ex.id])[: ex.n]
        except TargetsError as e:
            raise TrainError(str(e)) from None


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file object: torch reports a failed write (a full disk) as an
    opaque RuntimeError, so the OSError behind it, named after `path`, is raised instead."""
    errors: list[OSError] = []
    with names_file(path), open(path, "wb") as f:

        class Sink:
            def write(self, data):
                try:
                    return f.write(data)
                except OSError as e:
                    errors.append(e)
                    raise

            def flush(self):
                f.flush()

        try:
            torch.save(obj, Sink())
        except RuntimeError:
            if errors:
                raise errors[0] from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory named step-N is only ever created by a rename)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def save_checkpoint(out: Path, step: int, model, optimizer, extra: dict, keep: int, base_model: str) -> Path:
    """Write <out>/checkpoints/step-N/{adapter/, state.pt} under a temporary name, then rename it into place."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"  # a leftover one (killed, disk full) is removed at the next start
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp / "adapter", base_model=base_model)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }
    _torch_save(state, tmp / STATE_FILE)
    if final.exists():  # left by a run that went past this step before it was resumed from an earlier one
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_run_json(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{path}: not valid JSON ({e}): move it away, or choose another --out") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise TrainError(f"{path} is not a train.py run.json: move it away, or choose another --out")
    return info


def _resume_plan(out: Path, cfg: TrainConfig, fingerprint: dict, pairs_sha: str) -> tuple[bool, str | None]:
    """(continue from the newest checkpoint?, a note to print) for a run into `out`.

    Rerunning the same command continues from the newest checkpoint, or starts over when there
    is none (killed before the first, stopped on a non-finite loss). Other settings or pairs
    are refused while `out` holds something to lose (a checkpoint or a finished adapter), and
    start over otherwise.
    """
    checkpoints = _checkpoint_dirs(out)
    stored = _read_run_json(out)
    finished = (out / "adapter" / WEIGHTS_FILE).is_file()
    if cfg.resume and stored is None and not checkpoints:
        raise TrainError(f"--resume: {out} holds no training run to continue; drop --resume to start one")
    if stored is None and finished and not checkpoints:
        raise TrainError(f"{out} holds adapter/ but no run.json, so its settings are unknown: move adapter/ away, "
                         "or choose another --out")
    if stored is not None and (checkpoints or finished):
        then = {_option(k): stored["config"].get(k) for k in fingerprint}
        changes = [config_differences(then, {_option(k): v for k, v in fingerprint.items()})]
        changes.append("the pairs file changed" if stored.get("pairs_sha256") != pairs_sha else None)
        if any(changes):
            raise TrainError(f"{out} holds a training run with other settings ({'; '.join(filter(None, changes))}): "
                             "rerun with those to continue it, or choose another --out")
    if checkpoints:
        return True, None
    if stored is not None:
        return False, f"{out} holds no checkpoint of the earlier run (it stopped before writing one): starting over"
    return False, None


def load_checkpoint(out: Path, model, optimizer, device, config: dict, pairs_sha256: str) -> dict:
    """Restore the adapter, AdamW and RNG states from the newest checkpoint; returns its state dict.

    Refuses (before touching the model) a checkpoint trained with other trajectory settings or pairs.
    """
    dirs = _checkpoint_dirs(out)
    if not dirs:
        raise TrainError(f"{out / 'checkpoints'} holds no checkpoint to resume from")
    ckpt = dirs[-1]
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint is renamed into place only when complete: this is damage
        raise TrainError(f"{ckpt / STATE_FILE} is unreadable ({type(e).__name__}); delete {ckpt} to continue "
                         "from the checkpoint before it") from None
    for key, value in config.items():
        if state["config"].get(key) != value:
            raise TrainError(f"{_option(key)} is {value!r} but {out / 'checkpoints' / ckpt.name} was trained with "
                             f"{state['config'].get(key)!r}: rerun with the same settings to continue, or choose another --out")
    if state["pairs_sha256"] != pairs_sha256:
        raise TrainError(f"the pairs file changed since {ckpt.name} was written: rerun with the same pairs to continue, "
                         "or choose another --out")
    load_adapter(model, ckpt / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep only the metrics lines of steps <= upto_step, so a resumed run does not repeat lines."""
    if not path.is_file():
        return
    kept = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if rec.get("step", math.inf) <= upto_step:
            kept.append(raw)
    _atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the loop


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_config(cfg: TrainConfig) -> None:
    if cfg.teacher not in ("captured", "online"):
        raise TrainError(f"--teacher must be captured or online, got {cfg.teacher!r}")
    assert cfg.lr_schedule in ("linear", "cosine") and cfg.student_input in ("chat", "flat"), "train.py's choices"
    if cfg.dtype not in ("bf16", "fp32"):  # fp16 would need loss scaling
        raise TrainError(f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    for name, kind in OPTION_TYPES.items():
        value = getattr(cfg, name)
        if value is not None and kind.problem(value):
            raise TrainError(f"{_option(name)} {kind.problem(value)}")
    mb = cfg.micro_batch_size
    if mb is not None and not mb <= cfg.batch_size:
        raise TrainError(f"--micro-batch-size must be between 1 and --batch-size {cfg.batch_size}, got {mb}")
    if cfg.kd_weight == cfg.ce_weight == 0:
        raise TrainError("--kd-weight and --ce-weight are both 0: nothing to train on; set one of them > 0")
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:  # fail now, not after training
        raise TrainError(MATPLOTLIB_MISSING)
    check_output_dir(cfg.out)


def _non_finite(what: str, step: int, epoch: int, batch: list[Example], cfg: TrainConfig) -> NonFiniteLossError:
    """The error for a non-finite loss or gradient norm, with the likely cause: before any update
    it is the settings of the loss or the pairs, after one it is most often a too large --lr."""
    where = f"at step {step + 1} (epoch {epoch + 1}), pairs {', '.join(ex.id for ex in batch)}"
    if step == 0:
        hint = (f"the adapter has not been updated yet, so check --temperature ({cfg.temperature}), --kd-weight "
                f"({cfg.kd_weight}) and --ce-weight ({cfg.ce_weight}), and those pairs")
    else:
        hint = f"lower --lr ({cfg.lr:g}) or --lora-alpha ({cfg.lora_alpha:g}), or check those pairs"
    return NonFiniteLossError(f"non-finite {what} {where}; {hint}")


def _autocast(device: torch.device, dtype: torch.dtype):
    # bf16 autocast on CUDA also runs the float32 LoRA branches in bf16; on the CPU the model runs in its own dtype.
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def online_teacher_hidden(model: Qwen2ForCausalLM, batch: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """The online teacher: the same weights with the LoRA branches off read the hinted prompts.
    Returns its final hidden states at the trained positions (N, D), pair by pair and position
    by position (the student's order too), and the number of real input tokens."""
    assert all(ex.teacher_ids is not None for ex in batch), "build_examples(online_teacher=True) gives teacher sequences"
    device = model.device
    teacher = collate([(ex.teacher_ids, ex.teacher_start, ex.n) for ex in batch], pad_id, device)
    with adapters_disabled(model), _autocast(device, model.dtype):
        hidden = model.hidden_states(teacher.ids, attention_mask=teacher.attention_mask)  # (B, T, D)
    return hidden[teacher.loss_mask], teacher.n_real  # row-major order of the mask


def micro_batch_loss(model: Qwen2ForCausalLM, batch: list[Example], cfg: TrainConfig, pad_id: int,
                     captured: CapturedTeacher | None = None) -> tuple[LossOutput, int]:
    """The loss of one micro-batch (a token mean over its trained positions) and its number of input tokens.

    Online teacher (captured None): the same model with its LoRA branches off reads the hinted
    prompts, under no_grad; its hidden states at the trained positions become the targets.
    Captured: those hidden states come from disk. Either way kd_loss applies the LM head.
    """
    device, dtype = model.device, model.dtype
    student = collate([(ex.student_ids, ex.student_start, ex.n) for ex in batch], pad_id, device)
    labels = torch.tensor([t for ex in batch for t in ex.labels], device=device)  # (N,)
    n_input = student.n_real
    teacher_kw = {}
    if captured is None:
        teacher_kw["teacher_hidden"], n_teacher = online_teacher_hidden(model, batch, pad_id)
        n_input += n_teacher
    else:  # pair by pair, position by position: the order of the student's loss mask
        teacher_kw["teacher_hidden"] = torch.cat([captured.rows(ex) for ex in batch]).to(device, dtype)  # (N, D)
    with _autocast(device, dtype):
        hidden = model.hidden_states(student.ids, attention_mask=student.attention_mask)  # (B, T, D)
        res = kd_loss(hidden, model.lm_head.weight, mask=student.loss_mask, targets=labels,
                      temperature=cfg.temperature, kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight,
                      chunk_size=cfg.loss_chunk_size, **teacher_kw)
    return res, n_input


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a distillation run; returns a summary. Writes into cfg.out:
    adapter/ (PEFT), metrics.jsonl, run.json, checkpoints/step-N/."""
    _check_config(cfg)
    out = Path(cfg.out)
    metrics_path = out / "metrics.jsonl"
    device = torch_device(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype_name(cfg.dtype, device))  # "auto" -> what this machine runs
    dtype = torch_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    online = cfg.teacher == "online"
    pairs_path = Path(cfg.pairs)
    pairs = load_pairs(pairs_path, need_teacher_chat=online)
    pairs_sha = file_sha256(pairs_path)
    fingerprint = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k in TRAJECTORY_FIELDS}
    resume, note = _resume_plan(out, cfg, fingerprint, pairs_sha)  # before the model loads: a refusal costs nothing

    model_dir = resolve_model_dir(cfg.model)
    tok = Tokenizer.from_dir(cfg.tokenizer or model_dir)
    model = from_pretrained(model_dir, dtype=dtype, device=device)
    vocab_size = model.config.vocab_size
    if cfg.max_seq_len > model.config.max_position_embeddings:
        raise TrainError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    examples = build_examples(pairs, tok, vocab_size=vocab_size, max_seq_len=cfg.max_seq_len, truncate=cfg.truncate,
                              online_teacher=online, pairs_path=str(pairs_path), student_input=cfg.student_input)
    captured = None
    if not online:
        targets_dir = Path(cfg.targets) if cfg.targets else targets_dir_for(pairs_path)
        captured = CapturedTeacher(targets_dir, cfg.model, dtype, model.config.hidden_size, pairs)

    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # only LoRA dropout reads it
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    micro = cfg.micro_batch_size or cfg.batch_size
    n_truncated = sum(ex.truncated for ex in examples)

    start_step = 0
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "checkpoints", out / "adapter"):
        remove_temp_files(folder)  # left by a run killed mid-write or stopped by a full disk
    if resume:
        start_step = load_checkpoint(out, model, optimizer, device, fingerprint, pairs_sha)["step"]
    truncate_metrics(metrics_path, start_step)  # starting over (0) keeps no line of the earlier attempt
    run_info = {
        "config": dataclasses.asdict(cfg), "pairs_sha256": pairs_sha, "n_pairs": len(examples),
        "n_truncated": n_truncated, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "warmup_steps": warmup_steps, "device": str(device), "model_dir": str(model_dir),
        "trainable_params": sum(p.numel() for p in params),
    }
    _atomic_write_text(out / "run.json", json.dumps(run_info, indent=2) + "\n")

    say = tqdm.write if cfg.progress else (lambda s: None)
    say(f"{len(examples)} pairs, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs -> {total_steps} steps "
        f"(batch {cfg.batch_size}, micro-batch {micro}); teacher {cfg.teacher}"
        + f"; {run_info['trainable_params']:,} LoRA parameters on {device}")
    if n_truncated:
        dropped = sum(ex.solution_len + 1 - ex.n for ex in examples)
        say(f"--truncate: cut {n_truncated} of {len(examples)} pairs to --max-seq-len {cfg.max_seq_len} "
            f"({dropped} solution tokens not trained)")
    if note:
        say(note)
    if start_step:
        say(f"resuming from step {start_step} of {total_steps}")

    stop_at = min(total_steps, cfg.stop_after_steps) if cfg.stop_after_steps else total_steps
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    metrics_file = open(metrics_path, "a", encoding="utf-8")
    last = {}
    try:
        for step in range(start_step, stop_at):
            t0 = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            order = epoch_order(len(examples), cfg.seed, epoch)
            batch = [examples[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]]
            n_batch = sum(ex.n for ex in batch)
            lr = lr_at(step, total_steps, cfg.lr, warmup_steps, cfg.min_lr_ratio, cfg.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = kl_sum = ce_sum = 0.0
            n_input = 0
            for m in range(0, len(batch), micro):
                mb = batch[m : m + micro]
                res, n_real = micro_batch_loss(model, mb, cfg, tok.pad_id, captured)
                n_input += n_real
                if not torch.isfinite(res.loss):
                    raise _non_finite(f"loss ({res.loss.item()})", step, epoch, mb, cfg)
                # Each micro-batch's token mean, weighted by its share of the batch's tokens: the sum is
                # the token mean over the whole batch, whatever the micro-batch size.
                weight = res.n_tokens / n_batch
                (res.loss * weight).backward()
                loss_sum += res.loss.item() * weight
                kl_sum += res.kl.item() * weight if res.kl is not None else math.nan
                ce_sum += res.ce.item() * weight
                del res
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            if not math.isfinite(grad_norm):
                raise _non_finite("gradient norm", step, epoch, batch, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            dt = time.perf_counter() - t0
            last = {
                "step": step + 1,
                "epoch": round((step + 1) / steps_per_epoch, 4),
                "loss": loss_sum,
                "kl": kl_sum,
                "ce": ce_sum,
                "grad_norm": grad_norm,
                "lr": lr,
                "train_tokens": n_batch,
                "completion_len": sum(ex.n for ex in batch) / len(batch),
                "tokens_per_s": round(n_input / dt, 1),
                "step_time_s": round(dt, 4),
                "elapsed_s": round(time.perf_counter() - t_start, 2),
            }
            if device.type == "cuda":
                last["cuda_max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            with names_file(metrics_path):  # a full disk names the file
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", kl=f"{kl_sum:.4f}", lr=f"{lr:.2e}")

            done = step + 1
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or (done == stop_at < total_steps):
                extra = {"config": fingerprint, "pairs_sha256": pairs_sha, "epoch": epoch,
                         "epoch_order": order, "batch_index": index + 1}
                save_checkpoint(out, done, model, optimizer, extra, cfg.keep_checkpoints, cfg.model)
    except KeyboardInterrupt:
        saved = _checkpoint_dirs(out)
        where = f"continues from step {int(saved[-1].name[5:])}" if saved else "starts over (no checkpoint yet)"
        raise TrainError(f"interrupted; rerunning the same command {where}") from None
    finally:
        with names_file(metrics_path):
            metrics_file.close()
        bar.close()

    summary = {"steps": stop_at, "total_steps": total_steps, "n_truncated": n_truncated,
               "metrics": str(metrics_path), "last": last}
    if stop_at < total_steps:
        say(f"stopped after step {stop_at} of {total_steps}; rerun without --stop-after-steps to continue")
        summary["adapter"] = None
    else:
        save_adapter(model, out / "adapter", base_model=cfg.model)
        summary["adapter"] = str(out / "adapter")
        say(f"adapter saved to {out / 'adapter'}")
    if cfg.plot:
        summary["plot"] = str(plot_metrics(metrics_path, out / "metrics.png"))
        say(f"plot saved to {summary['plot']}")
    return summary


# ----------------------------------------------------------------------------- plot


MATPLOTLIB_MISSING = "plotting needs matplotlib: pip install 'minissb[plot]' (or pip install matplotlib)"
PLOTTED = (("loss", "loss"), ("kl", "KL at T (nats/token)"), ("ce", "CE (nats/token)"), ("grad_norm", "grad norm"),
           ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("completion_len", "mean completion length"))


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Draw the curves of a metrics.jsonl (one panel per quantity, against the step) into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError(MATPLOTLIB_MISSING) from None
    metrics_path, png_path = Path(metrics_path), Path(png_path)
    if not metrics_path.is_file():
        raise TrainError(f"{metrics_path} not found")
    records = []
    for n, raw in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as e:
                raise TrainError(f"{metrics_path}:{n}: malformed JSON ({e})") from None
    if not records:
        raise TrainError(f"{metrics_path} has no metrics lines to plot")
    panels = [(key, title) for key, title in PLOTTED if any(r.get(key) is not None for r in records)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


__all__ = [
    "TrainConfig", "TrainError", "NonFiniteLossError", "Example", "load_pairs", "build_examples", "collate",
    "epoch_order", "lr_at", "micro_batch_loss", "online_teacher_hidden", "enable_gradient_checkpointing", "CapturedTeacher", "train", "plot_metrics",
    "TIMING_FIELDS",
]
