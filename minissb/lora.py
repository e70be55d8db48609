"""LoRA adapters for Qwen2ForCausalLM, written by hand, stored in the PEFT on-disk format.

A wrapped linear layer computes

    y = x W^T + b  +  s * (dropout(x) A^T) B^T,      A: (r, in), B: (out, r), s = alpha / r

with W and b frozen and only A and B trained (s = alpha / sqrt(r) with rsLoRA). B starts at
zero, so a fresh adapter leaves the model unchanged. The wrapper keeps W and b registered under
their old names, so `model.layers.0.self_attn.q_proj.weight` is still a state-dict key.

The same weights serve as teacher and student: inside `adapters_disabled(model)` the branch is
skipped and the model is the base model, with no second copy of it in memory.

`merge_lora` folds s * B A into W for sampling at base-model speed; `unmerge_lora` subtracts it
again. Each rounds to W's dtype once, so a round trip is exact to float32 rounding in float32;
in bf16 it is not: unmerging recomputes W - s B A rather than keeping a copy of W, and some
entries come back one bf16 ulp (of |W| + |s B A|) off (about 6% of them for a delta 7% the size
of W, an rms change of 5e-4 x rms(W)), and repeated cycles can add up. Sample from a merged model;
train and run the teacher unmerged, and reload the base weights if bit-exactness matters.

Files: `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` /
`.lora_B.weight`, and `adapter_config.json` (peft_type "LORA"), as written by HF PEFT, so
adapters move between minissb, PEFT and vLLM.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minissb.runs import atomic_write, read_json, remove_temp_files

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEVER_WRAPPED = ("lm_head", "embed_tokens")  # tied to each other in Qwen2.5; LoRA here is out of scope
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our Qwen2ForCausalLM

# PEFT config fields that change the maths of the adapter: minissb implements plain LoRA only,
# so an adapter that sets any of these would load with the wrong outputs. Refuse it instead.
UNSUPPORTED_FIELDS = (
    "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
    "layers_to_transform", "layers_pattern", "exclude_modules", "layer_replication",
    "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
)


class BaseModelMismatchWarning(UserWarning):
    """An adapter's config names another base model than the one it is loaded into (the shapes fit)."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear (same `weight`/`bias` parameters) plus a trainable low-rank branch."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        # rsLoRA: alpha/sqrt(r) keeps the update's scale from shrinking as the rank grows.
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # The base tensors are moved over, not copied: same storage, same state-dict keys.
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", None if base.bias is None else base.bias.requires_grad_(False))
        # A like nn.Linear's default init (kaiming-uniform, a=sqrt(5)), as PEFT does; drawn on
        # the CPU so a seed gives the same adapter on every device.
        lora_A = torch.empty(r, self.in_features, dtype=dtype)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_A.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=base.weight.device))
        self.merged = False  # W currently holds W + s B A
        self.disabled = False  # set by adapters_disabled(): behave as the base layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        # The branch runs in the activations' dtype (float32 adapter weights are the optimiser's
        # master copy); a bf16 model then saves no float32 copy of x for the backward pass.
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        h = F.linear(h, self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(h, self.lora_B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s * B A as a float32 (out, in) matrix."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # Add in float32 and round to W's dtype once (adding a bf16 delta would round twice).
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}")


# ----------------------------------------------------------------------------- applying


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) for every LoRA layer, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _target_names(model: nn.Module, targets) -> list[str]:
    """Names of the linear layers to wrap: those whose last name part (or full name) is a target."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty: name the linear layers to adapt, e.g. q_proj, v_proj")
    for t in targets:
        if t.rsplit(".", 1)[-1] in NEVER_WRAPPED:
            raise ValueError(f"target {t!r}: minissb never puts LoRA on the LM head or the embeddings")
    names, matched = [], set()
    for name, module in model.named_modules():
        hits = [t for t in targets if name == t or name.rsplit(".", 1)[-1] == t]
        if not hits:
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"target {hits[0]!r} matches {name}, a {type(module).__name__}, not a linear layer")
        names.append(name)
        matched.update(hits)
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise ValueError(f"target {unmatched[0]!r} matches no layer of the model (expected names like {', '.join(DEFAULT_TARGETS)})")
    return names


def apply_lora(model: nn.Module, r: int = 32, alpha: float = 32, dropout: float = 0.0, targets=DEFAULT_TARGETS,
               use_rslora: bool = False, *, dtype: torch.dtype = torch.float32, seed: int | None = None) -> nn.Module:
    """Wrap the target linear layers in place and freeze everything but the new A and B.

    dtype is the adapter weights' dtype: float32 by default even for a bf16 model, since AdamW
    updates of small LoRA weights would be lost to bf16 rounding (PEFT does the same).
    """
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA layers; apply_lora once per model")
    names = _target_names(model, targets)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora, dtype, generator))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (A and B of every LoRA layer), for the optimiser."""
    modules = _require_lora(model)
    return [p for _, m in modules for p in (m.lora_A, m.lora_B)]


def _require_lora(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers: call apply_lora(model) or load_adapter(model, dir) first")
    return modules


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every LoRA branch is skipped inside the block (no-op without LoRA)."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        # W holds W + s B A while merged, so skipping the branch would not give the base model.
        raise ValueError("adapters_disabled() needs unmerged adapters: call unmerge_lora(model) first")
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was_disabled in zip(modules, previous):
            m.disabled = was_disabled


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W += s B A, in W's dtype); a no-op if merged.

    Do not train while merged: the branch is skipped, so A and B get no gradient, and changing
    them would make unmerge_lora subtract the wrong delta.
    """
    modules = _require_lora(model)
    if any(m.disabled for _, m in modules):
        raise ValueError("merge_lora() inside adapters_disabled(): merge outside the block")
    for _, m in modules:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract each adapter from its base weight again (exact in float32, within ~1 ulp in bf16)."""
    for _, m in _require_lora(model):
        m.unmerge()
    return model


# ----------------------------------------------------------------------------- PEFT files


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json in the PEFT layout.

    base_model is recorded as base_model_name_or_path (e.g. "Qwen/Qwen2.5-3B-Instruct").
    Each file is replaced atomically, weights first, so a reader never sees a torn file.
    """
    from safetensors.torch import save

    modules = _require_lora(model)
    first = modules[0][1]
    for name, m in modules:
        if (m.r, m.alpha, m.use_rslora, m.dropout) != (first.r, first.alpha, first.use_rslora, first.dropout):
            raise ValueError(f"{name} has r/alpha/rslora/dropout unlike {modules[0][0]}: one adapter config cannot describe both")
    tensors = {}
    for name, m in modules:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)  # left by a save that was killed or ran out of disk
    # Serialised here and written by Python, so a full disk is an OSError naming the file, not a SafetensorError.
    data = save(tensors, metadata={"format": "pt"})
    atomic_write(out / WEIGHTS_FILE, lambda p: Path(p).write_bytes(data))
    atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter directory {adapter_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{adapter_dir} has no {CONFIG_FILE}: is it a PEFT adapter directory?")
    config = read_json(path, "re-save the adapter")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; minissb loads only LORA adapters")
    for key in UNSUPPORTED_FIELDS:
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported by minissb (plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported by minissb (only \"none\")")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{path}: base_model_name_or_path must be a string, got {base!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    return config


def same_model_name(name_or_path: str) -> str:
    """What two spellings of one model share: the last path part (Qwen/Qwen2.5-3B-Instruct and
    /models/Qwen2.5-3B-Instruct are the same model), lower-cased."""
    return str(name_or_path).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def _check_base_model(adapter_dir: Path, config: dict, base_model: str | os.PathLike) -> None:
    """Warn (BaseModelMismatchWarning) when the adapter's config names another base model than
    `base_model`; the shapes may still fit, e.g. another fine-tune of the same architecture."""
    named = config.get("base_model_name_or_path")
    if named and same_model_name(named) != same_model_name(base_model):
        warnings.warn(f"{adapter_dir} was trained on base model {named}, but is loaded into {base_model}: "
                      "the shapes fit, so it loads; check that this is the model you meant",
                      BaseModelMismatchWarning, stacklevel=3)


def _read_lora_tensors(weights: Path, expected: dict, model: nn.Module, r: int, config: dict) -> dict[str, torch.Tensor]:
    """The A and B tensors of `weights`, each checked against the layer it goes into."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = sorted(expected.keys() - keys)
            unexpected = sorted(keys - expected.keys())
            if missing:
                raise ValueError(f"{weights}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
            if unexpected:
                raise ValueError(f"{weights}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all; "
                                f"target_modules is {config['target_modules']})")
            for key, (name, ab) in expected.items():
                t = f.get_tensor(key)
                base = model.get_submodule(name)
                want = (r, base.in_features) if ab == "A" else (base.out_features, r)
                got = tuple(t.shape)
                if got != want:
                    rank_dim = 0 if ab == "A" else 1
                    if t.ndim == 2 and got[rank_dim] != r:
                        raise ValueError(f"{weights}: {key} has rank {got[rank_dim]} but {CONFIG_FILE} says r={r}")
                    raise ValueError(f"{weights}: {key} has shape {got}, this model's {name} needs {want}: "
                                    "was the adapter trained on a different base model?")
                tensors[key] = t
    except SafetensorError as e:  # truncated, random bytes, not safetensors at all
        raise ValueError(f"{weights}: not a readable safetensors file ({e}); save or copy the adapter again") from None
    return tensors


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, base_model: str | os.PathLike | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter (from minissb, PEFT or elsewhere) into `model`.

    A model without LoRA gets it applied from adapter_config.json; a model that has it must
    match the file's rank, scaling and target layers. Everything is checked before the model
    is touched, so a bad file leaves the model as it was. With base_model (the model's name
    or path), an adapter whose config names another base model loads with a warning.
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        hint = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise ValueError(f"{adapter_dir} has no {WEIGHTS_FILE}{hint}")
    r, alpha = config["r"], config["lora_alpha"]
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout") or 0.0)
    try:
        names = _target_names(model, config["target_modules"])
    except ValueError as e:
        raise ValueError(f"{adapter_dir / CONFIG_FILE}: {e}") from None

    existing = dict(lora_modules(model))
    if existing:
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if set(existing) != set(names):
            raise ValueError(f"the model's LoRA layers differ from target_modules={config['target_modules']} in {adapter_dir}")
        m = next(iter(existing.values()))
        if (m.r, m.scaling) != (r, scaling):
            raise ValueError(f"the model has LoRA r={m.r}, scaling={m.scaling:g} but {adapter_dir} has r={r}, scaling={scaling:g}")
        if any(m.merged for m in existing.values()):
            raise ValueError("load_adapter() into a merged model: call unmerge_lora(model) first")

    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": (n, ab) for n in names for ab in "AB"}
    tensors = _read_lora_tensors(weights, expected, model, r, config)
    if base_model is not None:
        _check_base_model(adapter_dir, config, base_model)

    if not existing:
        apply_lora(model, r, alpha, dropout, config["target_modules"], use_rslora)
    with torch.no_grad():
        for key, (name, ab) in expected.items():
            getattr(model.get_submodule(name), f"lora_{ab}").copy_(tensors[key])
    return model


__all__ = [
    "DEFAULT_TARGETS",
    
    "LoRALinear",
    "apply_lora",
    "lora_modules",
    "lora_parameters",
    "adapters_disabled",
    "merge_lora",
    "unmerge_lora",
    "save_adapter",
    "load_adapter",
    "BaseModelMismatchWarning",
]
