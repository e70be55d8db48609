"""Qwen2.5 (Qwen2 architecture) decoder in plain PyTorch, and loading of HF checkpoints.

Read top to bottom: config -> RMSNorm -> rotary embeddings -> attention -> MLP -> block
-> model -> KV cache -> loading. Module names mirror Hugging Face's Qwen2ForCausalLM
(`model.layers.0.self_attn.q_proj`, ...) so checkpoint keys and PEFT adapter keys map
one to one, with no renaming table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minissb.runs import read_json


# ----------------------------------------------------------------------------- config


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2Config":
        # HF configs carry many keys we do not use (sliding_window, use_cache, ...): keep ours.
        known = {f.name for f in fields(cls)}
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d = {**d, "rope_theta": d["rope_parameters"].get("rope_theta")}  # transformers >= 5 nests it
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling={d['rope_scaling']} is not supported by minissb")
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as the reference does), then cast back before the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for integer positions (B, T) -> each (B, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # "rotate half" layout: two copies, not interleaved
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, T, D) -> broadcast over heads
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: "KVCache | None", layer: int, start: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write the new keys into their slots and attend over every slot filled so far.
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        # SDPA, also for decode steps: on the 2-core Xeon (avx512_bf16), one query per row over
        # 64 rows x 1,300 cached positions took 32 ms per layer in SDPA against 145 ms as two
        # explicit matmuls in bf16 (equal in fp32), and SDPA reads the cache's strided views.
        group = self.n_heads // self.n_kv_heads
        if T == 1 and group > 1:
            # Decode: a KV head's group of query heads is just more queries against the same
            # keys, so fold it into the query axis, (B, H, 1, D) -> (B, Hkv, group, D), and
            # attend without a GQA broadcast; the (B, 1, 1, S) mask covers all of them alike.
            # bench/decode_attention.py on the Xeon: 1.4-1.8x faster in bf16, 1.4-2.1x in fp32.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, group, self.head_dim), k, v, attn_mask=mask)
        else:
            # enable_gqa shares each KV head across its query heads without a copy; mask None
            # means plain causal over this chunk, and is_causal lets SDPA pick a fused kernel.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=group > 1)
            y = y.transpose(1, 2)  # (B, T, H, D)
        y = y.reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Body(nn.Module):
    """The decoder stack; called `model` inside Qwen2ForCausalLM, as in HF checkpoints."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        # Zero-initialised (weights come from a checkpoint or init_weights): nn.Embedding's own
        # normal_ init on the meta device imports torch._dynamo, over a second per process.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, start+T): query slot i sees key slot j iff j <= i and key j is real.

    key_valid: (B, start+T) bool, True where the slot holds a real token (False for padding).
    A padding query would see no key at all and SDPA would return NaN for it, so every
    query also sees its own slot; padded rows are never read, this only keeps them finite.
    """
    Tk = key_valid.shape[1]
    q_slot = torch.arange(start, start + T, device=key_valid.device)[:, None]  # (T, 1)
    k_slot = torch.arange(Tk, device=key_valid.device)[None, :]  # (1, Tk)
    causal = k_slot <= q_slot  # (T, Tk)
    mask = causal[None] & key_valid[:, None, :]  # (B, T, Tk)
    mask = mask | (k_slot == q_slot)[None]
    return mask[:, None]  # (B, 1, T, Tk)


def positions_from_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Per-row positions (B, T) that count only real tokens: a left-padded row starts at 0."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: "KVCache | None" = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Final (normed) hidden states (B, T, hidden) for token ids (B, T).

        attention_mask: (B, start+T), 1/True for real tokens and 0 for padding (left or right).
            With a cache it covers every slot from 0 to start+T. None means no padding.
            A 4-D bool (B, 1, T, start+T) is taken as the attention mask itself.
        positions: (B, T) rotary positions; by default each row counts its real tokens from 0,
            so left-padded prompts get the same positions as when run alone.
        cache/start: write keys and values into `cache` at slots start..start+T-1 and attend
            to all earlier slots too (prefill with start=0, then one token at a time).
        """
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            # Already the (B, 1, T, start+T) bool mask (the engine's decode step, where rows
            # of different lengths share a step): used as given, positions must be given too.
            assert positions is not None and attention_mask.shape[-1] == start + T
            mask = attention_mask
        else:
            if attention_mask is None:
                key_valid = torch.ones(B, start + T, dtype=torch.bool, device=input_ids.device)
            else:
                key_valid = attention_mask.bool()
                if key_valid.shape != (B, start + T):
                    raise ValueError(f"attention_mask must be (B, start+T)={(B, start + T)}, got {tuple(key_valid.shape)}")
            if positions is None:
                positions = positions_from_mask(key_valid)[:, start:]
            # No padding and no cache: plain causal attention (mask None lets SDPA fuse it).
            mask = None if attention_mask is None and cache is None else attention_mask_4d(key_valid, start, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, positions=None, cache=None, start=0) -> torch.Tensor:
        """Logits (B, T, vocab) in the model's dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, positions, cache, start))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Static key/value cache: one preallocated (B, Hkv, max_len, D) buffer per layer.

    Slots are absolute: slot t holds the t-th token of the (padded) row, so nothing is ever
    concatenated; a batch shares one write position per step, a rows() view has one per row.
    """

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    write_positions: torch.Tensor | None = None  # set on a rows() view: one write slot per row

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} slots needed, {self.max_len} allocated")
        if self.write_positions is None:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        else:  # one new token per row, each at its own slot (rows of different lengths)
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, self.write_positions] = k[:, :, 0]  # (B, Hkv, D) into (B, Hkv, slot, D)
            self.v[layer][rows, :, self.write_positions] = v[:, :, 0]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def row(self, i: int) -> "KVCache":
        """A one-row view of this cache: what is written through it lands in row i."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, i : i + 1], self.v[:, i : i + 1]
        return view

    def rows(self, n: int, write_positions: torch.Tensor) -> "KVCache":
        """A view of rows 0..n-1 whose update() writes one token per row at write_positions (n,)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.write_positions = self.k[:, :n], self.v[:, :n], write_positions
        return view



# ----------------------------------------------------------------------------- loading

HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "*.safetensors", "*.safetensors.index.json"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local HF-format directory as is, or a hub repo id downloaded (config, tokenizer, safetensors only)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the model directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: is it an HF-format model directory?")
        return path
    name = str(name_or_path)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ValueError(f"model path {name} does not exist (and is not a hub repo id like Qwen/Qwen2.5-3B-Instruct)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, no network: one line that says which
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ValueError(f"could not get {name} from the Hugging Face hub{hint}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# Qwen2Config's field types (annotations are strings here) -> accepted JSON types, and how to say so.
_CONFIG_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false")}


def load_config(model_dir: str | os.PathLike) -> Qwen2Config:
    """A model directory's config.json as a Qwen2Config, every field it sets checked for its type
    and range first, so a bad value is one error naming the file and the key."""
    path = Path(model_dir) / "config.json"
    fix = "fix it or download the model again"
    d = read_json(path, fix)
    rope = d.get("rope_parameters")
    values = {**({"rope_theta": rope.get("rope_theta")} if isinstance(rope, dict) else {}), **d}
    for f in fields(Qwen2Config):
        value = values.get(f.name)
        if value is None:
            continue  # the default
        want, kind = _CONFIG_TYPES[f.type]
        if not isinstance(value, want) or (isinstance(value, bool) and f.type != "bool"):
            raise ValueError(f"{path}: {f.name} must be {kind}, got {value!r}; {fix}")
        if f.type != "bool" and not (0 < value < float("inf") or (f.name == "head_dim" and value == 0)):
            raise ValueError(f"{path}: {f.name} must be a finite number > 0, got {value!r}; {fix}")
    try:
        return Qwen2Config.from_dict(d)
    except ValueError as e:  # inconsistent values (heads) or unsupported ones (rope_scaling)
        raise ValueError(f"{path}: {e}") from None


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "download the model again").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to file names; download the model again")
        for fname in sorted(set(weight_map.values())):
            if not (model_dir / fname).is_file():
                raise ValueError(f"{model_dir / fname} (named in {index.name}) not found; download the model again")
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except SafetensorError as e:
        raise _unreadable(single, e) from None


def _unreadable(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({e}): it is truncated or corrupt; "
                          "download or save the model again")


def from_pretrained(name_or_path, dtype: torch.dtype = torch.bfloat16, device="cpu") -> Qwen2ForCausalLM:
    """Load a Qwen2/Qwen2.5 HF checkpoint straight into `dtype` on `device`.

    The model is built on the meta device (no memory), then each tensor is read from its
    safetensors file, cast and placed on `device` one at a time, so peak memory is the model
    in `dtype` plus one tensor.
    """
    from safetensors import SafetensorError, safe_open

    model_dir = resolve_model_dir(name_or_path)
    cfg = load_config(model_dir)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")  # shares embed_tokens.weight
    files = _checkpoint_files(model_dir)
    # Tied checkpoints saved by some tools still carry lm_head.weight: it is the same tensor, skip it.
    unexpected = sorted(n for n in files if n not in expected and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    missing = sorted(n for n in expected if n not in files)
    if missing:
        raise ValueError(f"{model_dir}: tensor {missing[0]} is missing from the checkpoint ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected tensor {unexpected[0]} in {files[unexpected[0]].name} ({len(unexpected)} unexpected in all)")

    loaded: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for fpath, names in by_file.items():
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    if tuple(t.shape) != tuple(expected[name].shape):
                        raise ValueError(
                            f"{fpath.name}: tensor {name} has shape {tuple(t.shape)}, "
                            f"config.json implies {tuple(expected[name].shape)}"
                        )
                    loaded[name] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise _unreadable(fpath, e) from None
    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True broke the tie: restore it
    model.eval().requires_grad_(False)
    return model


def save_pretrained(model: Qwen2ForCausalLM, out_dir: str | os.PathLike) -> None:
    """Write config.json + model.safetensors (HF layout); used by tests and tools."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.config)
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", torch_dtype=str(model.dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def init_weights(model: Qwen2ForCausalLM, std: float = 0.02, seed: int = 0) -> Qwen2ForCausalLM:
    """Random init (normal(0, std) for matrices and biases, ones for norms) for tests and benches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "KVCache",
    
    "from_pretrained",
    "load_config",
    "save_pretrained",
    "init_weights",
    "num_params",
    "attention_mask_4d",
    "positions_from_mask",
]
