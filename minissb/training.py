"""What every LoRA training run needs, whatever its loss: SSB distillation (train.py) and GRPO
(grpo.py) both use it.

Read top to bottom:
  checks       what train.py's and grpo.py's check_config share
  schedule     lr_at: linear warmup, then a linear or cosine decay; a pure function of the
               step, so a resumed run needs no scheduler state
  memory       gradient checkpointing of the decoder layers; bf16 autocast on CUDA
  checkpoints  <out>/checkpoints/step-N/{adapter/, state.pt}, written under a temporary name
               and renamed into place (a directory called step-N is always complete); the
               resume plan that decides, before the model loads, whether a rerun continues,
               starts over or is refused (other settings or data while something would be lost);
               run.json, written once the plan is made
  metrics      metrics.jsonl cut back to a checkpoint's step on resume, and drawn as a PNG

A checkpoint holds the step, the adapter, the AdamW state, the RNG states and the settings
that define the trajectory (`config`) with the hash of the training data, so `--resume` can
refuse to continue a different run.
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
from pathlib import Path

import torch
import torch.utils.checkpoint

from minissb.dist import World, barrier
from minissb.lora import WEIGHTS_FILE, load_adapter, save_adapter
from minissb.model import Qwen2ForCausalLM
from minissb.runs import atomic_write, check_output_dir, config_differences, names_file, read_jsonl, remove_temp_files

STATE_FILE = "state.pt"
# Timing fields of a metrics line: the only ones that differ between a run and its resumed twin.
TIMING_FIELDS = ("tokens_per_s", "step_time_s", "elapsed_s", "cuda_max_mem_gb")


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm became inf/nan; the message names the step and the examples."""


def option_flag(name: str) -> str:
    """The command-line flag of a config field: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def check_options(cfg, option_types: dict) -> None:
    """A one-line ValueError for a bad --dtype (resolved already) or a numeric option out of its range (None: unset)."""
    if cfg.dtype not in ("bf16", "fp32"):  # fp16 would need loss scaling
        raise ValueError(f"--dtype must be bf16 or fp32, got {cfg.dtype!r}")
    for name, kind in option_types.items():
        value = getattr(cfg, name)
        if value is not None and kind.problem(value):
            raise ValueError(f"{option_flag(name)} {kind.problem(value)}")


def check_plot_and_out(cfg) -> None:
    """Fail now, not after training: --plot without matplotlib, or an --out that cannot be written."""
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(MATPLOTLIB_MISSING)
    check_output_dir(cfg.out)


# ----------------------------------------------------------------------------- order, schedule and memory


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of n examples in `epoch`: a function of (seed, epoch) only, so a resumed run
    replays it, and a GRPO run with --match-ssb and the same seed visits SSB's problems in step."""
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


def autocast(device: torch.device, dtype: torch.dtype):
    # bf16 autocast on CUDA also runs the float32 LoRA branches in bf16; on the CPU the model runs in its own dtype.
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- checkpoints


def atomic_write_text(path: Path, text: str) -> None:
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


def checkpoint_dirs(out: Path) -> list[Path]:
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
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **extra}
    _torch_save(state, tmp / STATE_FILE)
    if final.exists():  # left by a run that went past this step before it was resumed from an earlier one
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_run_json(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}): move it away, or choose another --out") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ValueError(f"{path} is not the run.json of a training run: move it away, or choose another --out")
    return info


def plan_run(cfg, fields: tuple[str, ...], data_sha256: str, world: World,
             data_name: str = "pairs file") -> tuple[dict, str, str | None]:
    """(fingerprint, start, note) for the run into cfg.out: cfg's `fields` as run.json stores them
    (tuples as lists), which a checkpoint must match; how to start ("new", "resume" from the
    newest checkpoint, or "done"); a note to print.

    Rerunning the same command after the run finished does nothing ("done": its adapter stays
    as the evaluation read it, so a rerun pipeline goes straight on); after a stop it continues
    from the newest checkpoint, or starts over when there is none (killed before the first,
    stopped on a non-finite loss). Other settings or data are refused while out holds something
    to lose (a checkpoint or a finished adapter), and start over otherwise.
    """
    out = Path(cfg.out)
    fingerprint = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    checkpoints, stored, finished = checkpoint_dirs(out), read_run_json(out), (out / "adapter" / WEIGHTS_FILE).is_file()
    if cfg.resume and stored is None and not checkpoints:
        raise ValueError(f"--resume: {out} holds no training run to continue; drop --resume to start one")
    if stored is None and finished and not checkpoints:
        raise ValueError(f"{out} holds adapter/ but no run.json, so its settings are unknown: move adapter/ away, "
                         "or choose another --out")
    if stored is not None and (checkpoints or finished):
        then = {option_flag(k): stored["config"].get(k) for k in fingerprint}
        changes = [config_differences(then, {option_flag(k): v for k, v in fingerprint.items()})]
        changes.append(f"the {data_name} changed" if stored.get("data_sha256") != data_sha256 else None)
        if any(changes):
            raise ValueError(f"{out} holds a training run with other settings ({'; '.join(filter(None, changes))}): "
                             "rerun with those to continue it, or choose another --out")
        if finished:
            return fingerprint, "done", f"{out} holds this run, finished: adapter/ is its result (another --out trains again)"
    note = None
    if stored is not None and not checkpoints:
        note = f"{out} holds no checkpoint of the earlier run (it stopped before writing one): starting over"
    barrier(world)  # every rank has read the old run.json before rank 0 writes the new one
    return fingerprint, "resume" if checkpoints else "new", note


def write_run_json(out: Path, info: dict, start_step: int) -> None:
    """Rank 0, once the run is planned: remove the temporaries a killed run left, cut metrics.jsonl
    back to start_step (starting over, 0, keeps no line of the earlier attempt), write run.json."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "checkpoints", out / "adapter"):
        remove_temp_files(folder)  # left by a run killed mid-write or stopped by a full disk
    truncate_metrics(out / "metrics.jsonl", start_step)
    atomic_write_text(out / "run.json", json.dumps(info, indent=2) + "\n")


def load_checkpoint(out: Path, model, optimizer, device, config: dict, data_sha256: str, data_name: str = "pairs file") -> dict:
    """Restore the adapter, AdamW and RNG states from the newest checkpoint; returns its state dict.

    Refuses (before touching the model) a checkpoint trained with other trajectory settings or pairs.
    """
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise ValueError(f"{out / 'checkpoints'} holds no checkpoint to resume from")
    ckpt = dirs[-1]
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a checkpoint is renamed into place only when complete: this is damage
        raise ValueError(f"{ckpt / STATE_FILE} is unreadable ({type(e).__name__}); delete {ckpt} to continue "
                         "from the checkpoint before it") from None
    for key, value in config.items():
        if state["config"].get(key) != value:
            raise ValueError(f"{option_flag(key)} is {value!r} but {out / 'checkpoints' / ckpt.name} was trained with "
                             f"{state['config'].get(key)!r}: rerun with the same settings to continue, or choose another --out")
    if state["data_sha256"] != data_sha256:
        raise ValueError(f"the {data_name} changed since {ckpt.name} was written: rerun with the same data to continue, "
                         "or choose another --out")
    load_adapter(model, ckpt / "adapter")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


class MetricsLog:
    """metrics.jsonl opened for appending: one JSON line per step, flushed as it is written (a
    kill loses at most the line being written; a full disk names the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        with names_file(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        with names_file(self.path):
            self.file.close()


def interrupted(out: Path) -> ValueError:
    """The one-line error for Ctrl-C, saying what rerunning the same command will do."""
    saved = checkpoint_dirs(out)
    where = f"continues from step {int(saved[-1].name[5:])}" if saved else "starts over (no checkpoint yet)"
    return ValueError(f"interrupted; rerunning the same command {where}")


def finish(out: Path, model, base_model: str, stop_at: int, total_steps: int, say) -> str | None:
    """After the loop: the adapter saved into out/adapter (its path), or None when stopped early."""
    if stop_at < total_steps:
        say(f"stopped after step {stop_at} of {total_steps}; rerun without --stop-after-steps to continue")
        return None
    save_adapter(model, out / "adapter", base_model=base_model)
    say(f"adapter saved to {out / 'adapter'}")
    return str(out / "adapter")


def finished_summary(out: Path) -> dict:
    """What rerunning a finished run returns, read back from its files: nothing is trained."""
    info = read_run_json(out)
    lines = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return {"steps": info["total_steps"], "total_steps": info["total_steps"], "metrics": str(out / "metrics.jsonl"),
            "last": lines[-1] if lines else {}, "adapter": str(out / "adapter"), "world_size": info.get("world_size", 1)}


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
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- plot


MATPLOTLIB_MISSING = "plotting needs matplotlib: pip install 'minissb[plot]' (or pip install matplotlib)"
PLOTTED = (("loss", "loss"), ("kl", "KL at T (nats/token)"), ("ce", "CE (nats/token)"), ("grad_norm", "grad norm"),
           ("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("completion_len", "mean completion length"))


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, panels=PLOTTED) -> Path:
    """Draw the curves of a metrics.jsonl (one panel per quantity, against the step) into a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(MATPLOTLIB_MISSING) from None
    metrics_path, png_path = Path(metrics_path), Path(png_path)
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path} not found")
    records = []
    for n, raw in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics_path}:{n}: malformed JSON ({e})") from None
    if not records:
        raise ValueError(f"{metrics_path} has no metrics lines to plot")
    panels = [(key, title) for key, title in panels if any(r.get(key) is not None for r in records)]
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 2.6 * rows), squeeze=False)
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
