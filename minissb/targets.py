"""Offline teacher targets (SSB stage 2): the teacher's next-token distributions, computed once.

The teacher's target at each solution token is its distribution given the hinted prompt.
For a pair with teacher prompt ids (length P) and solution ids (length S) the teacher reads

    [teacher prompt ids | solution ids | <|im_end|>]
     0 ........... P-1   P ..... P+S-1   P+S

and the logits at positions P-1 ... P+S-1 (S+1 rows) predict solution token 0 ... S-1 and
finally <|im_end|>. (Position P-1 is the last prompt token: the off-by-one to get right.)

Stored next to the pairs file, in `<pairs stem>.targets/`:
    meta.json                 {"mode", "k", "temperature", "vocab_size", "model", "pairs_file", "count"}
    targets-00000.safetensors per pair "<id>.logprobs" (S+1, k) float32 + "<id>.ids" (S+1, k) int64 (topk)
    targets-00001.safetensors or "<id>.logits" (S+1, V) bfloat16 (full)
Top-k targets are log-softmax(logits / T) at the training temperature T, restricted to the k
most likely tokens; the mass outside them is 1 - sum(exp(logprobs)) (minissb.loss uses it as
one "rest" bucket). Full targets are the raw logits: the trainer applies its temperature.

Crash safety: shards are written whole (tmp file + os.replace), so a killed run loses only the
shard it was filling; a restart skips every pair already in a finished shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from minissb.data import read_jsonl, write_json_atomic
from minissb.loss import topk_targets

FULL_FLOAT32_BYTES = 4  # what the original code stores per vocabulary entry (.npz, float32)


class TargetsError(ValueError):
    """Targets cannot be computed or read; the message says what to fix."""


def targets_dir_for(pairs_path: str | os.PathLike) -> Path:
    p = Path(pairs_path)
    stem = p.with_suffix("") if p.suffix == ".jsonl" else p
    return stem.with_name(stem.name + ".targets")


def teacher_sequence(tokenizer, pair: dict) -> tuple[list[int], int, int]:
    """(ids, P, S): [teacher prompt | solution | <|im_end|>] and the prompt and solution lengths."""
    prompt = tokenizer.encode_chat(pair["teacher_chat"], add_generation_prompt=True)
    solution = list(pair["solution_ids"])
    return prompt + solution + [tokenizer.im_end_id], len(prompt), len(solution)


@torch.no_grad()
def teacher_logits_rows(model, sequences: Sequence[tuple[list[int], int, int]], chunk_size: int = 256):
    """Yield, per sequence, the teacher's logits at positions P-1 ... P+S-1, a chunk of rows at a time.

    Yields (sequence index, row offset, logits (c, V) in the model's dtype). Sequences are
    right-padded into one batch: with causal attention a real token never sees the padding
    after it, so no attention mask is needed and the real positions are exact.
    """
    device = model.device
    longest = max(len(ids) for ids, _, _ in sequences)
    batch = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)  # pad id is never read
    for b, (ids, _, _) in enumerate(sequences):
        batch[b, : len(ids)] = torch.tensor(ids, device=device)
    hidden = model.hidden_states(batch)  # (B, T, D)
    for b, (ids, P, S) in enumerate(sequences):
        rows = hidden[b, P - 1 : P + S]  # (S+1, D): the last prompt token .. the last solution token
        for off in range(0, S + 1, chunk_size):
            yield b, off, model.lm_head(rows[off : off + chunk_size])  # (c, V): one chunk of the LM head


def teacher_targets(
    model, tokenizer, pairs: Sequence[dict], mode: str = "topk", k: int | None = 64, temperature: float = 2.0, chunk_size: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Targets of a few pairs, computed in one batch: per pair {"logprobs", "ids"} or {"logits"}, on CPU."""
    if mode not in ("topk", "full"):
        raise TargetsError(f"teacher targets mode must be topk or full, got {mode!r}")
    sequences = [teacher_sequence(tokenizer, p) for p in pairs]
    parts: list[list[tuple]] = [[] for _ in pairs]
    for b, _, logits in teacher_logits_rows(model, sequences, chunk_size):
        if mode == "topk":
            logprobs, ids = topk_targets(logits, k, temperature)
            parts[b].append((logprobs.float().cpu(), ids.long().cpu()))
        else:
            parts[b].append((logits.to(torch.bfloat16).cpu(),))
    out = []
    for chunks in parts:
        if mode == "topk":
            out.append({"logprobs": torch.cat([c[0] for c in chunks]), "ids": torch.cat([c[1] for c in chunks])})
        else:
            out.append({"logits": torch.cat([c[0] for c in chunks])})
    return out


# ----------------------------------------------------------------------------- on disk


def _shard_name(i: int) -> str:
    return f"targets-{i:05d}.safetensors"


def _shards(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("targets-[0-9][0-9][0-9][0-9][0-9].safetensors"))


class TargetReader:
    """Read stored targets: `TargetReader(dir).get(pair_id)` -> {"logprobs", "ids"} or {"logits"}."""

    def __init__(self, out_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(out_dir)
        meta = self.dir / "meta.json"
        if not meta.is_file():
            raise TargetsError(f"{self.dir} has no meta.json: compute targets with `sample.py --teacher-targets topk|full`")
        try:
            self.meta = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TargetsError(f"{meta}: not valid JSON ({e})") from None
        self._where: dict[str, Path] = {}
        for shard in _shards(self.dir):
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    self._where[key.rsplit(".", 1)[0]] = shard

    def __contains__(self, pair_id: str) -> bool:
        return pair_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def ids(self) -> list[str]:
        return list(self._where)

    def get(self, pair_id: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if pair_id not in self._where:
            raise TargetsError(f"{self.dir} has no targets for pair {pair_id!r}: recompute with sample.py --teacher-targets")
        names = ("logprobs", "ids") if self.meta.get("mode") == "topk" else ("logits",)
        with safe_open(self._where[pair_id], framework="pt") as f:
            return {n: f.get_tensor(f"{pair_id}.{n}") for n in names}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_targets(
    model,
    tokenizer,
    pairs_path: str | os.PathLike,
    *,
    mode: str = "topk",
    k: int | None = 64,
    temperature: float = 2.0,
    model_name: str = "",
    batch_size: int = 1,
    chunk_size: int = 256,
    shard_bytes: int = 1 << 30,
    shard_pairs: int = 64,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Compute the teacher targets of every pair in `pairs_path` that has none yet; returns stats.

    Resumable: pairs already in a finished shard are skipped, and a meta.json written with
    other settings (mode, k, temperature, model) is refused rather than mixed.
    """
    from tqdm import tqdm

    if mode not in ("topk", "full"):
        raise TargetsError(f"--teacher-targets must be topk or full, got {mode!r}")
    vocab = model.config.vocab_size
    if mode == "topk" and (k is None or not 1 <= k <= vocab):
        raise TargetsError(f"--targets-k must be between 1 and the vocabulary size {vocab}, got {k}")
    if temperature <= 0:
        raise TargetsError(f"--targets-temperature must be > 0, got {temperature}")
    pairs_path = Path(pairs_path)
    if not pairs_path.is_file():
        raise TargetsError(f"pairs file {pairs_path} not found: run stage 1 first (sample.py without --targets-only)")
    pairs = read_jsonl(pairs_path)
    for n, p in enumerate(pairs, start=1):
        missing = [f for f in ("id", "teacher_chat", "solution_ids") if f not in p]
        if missing:
            raise TargetsError(f"{pairs_path}: record {n} has no {', '.join(missing)}: not a pairs file written by sample.py")

    out = Path(out_dir) if out_dir is not None else targets_dir_for(pairs_path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": mode,
        "k": k if mode == "topk" else None,
        "temperature": float(temperature),
        "vocab_size": vocab,
        "model": model_name,
        "pairs_file": pairs_path.name,
    }
    if (out / "meta.json").is_file():
        old = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        diffs = [key for key in meta if old.get(key) != meta[key]]
        if diffs:
            shown = "; ".join(f"{key}: {old.get(key)!r} there, {meta[key]!r} now" for key in diffs)
            raise TargetsError(f"{out} holds targets computed with other settings ({shown}): remove it or use the same settings")
    for tmp in out.glob("*.tmp"):
        tmp.unlink()  # a shard cut off by a kill
    done = set(TargetReader(out).ids()) if (out / "meta.json").is_file() else set()
    write_json_atomic(out / "meta.json", {**meta, "count": None})  # count None = in progress

    todo = [p for p in pairs if p["id"] not in done]
    next_shard = max((int(s.name[8:13]) for s in _shards(out)), default=-1) + 1  # never overwrite a shard
    pending: dict[str, torch.Tensor] = {}
    pending_pairs = 0
    tokens = 0

    def flush():
        nonlocal pending, pending_pairs, next_shard
        if pending:
            _write_shard(out / _shard_name(next_shard), pending)
            next_shard += 1
            pending, pending_pairs = {}, 0

    bar = tqdm(total=len(todo), desc=f"teacher targets ({mode})", unit="pair", disable=not progress, dynamic_ncols=True)
    model_was_training = model.training
    model.eval()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        for pair, tensors in zip(batch, teacher_targets(model, tokenizer, batch, mode, k, temperature, chunk_size)):
            for name, t in tensors.items():
                pending[f"{pair['id']}.{name}"] = t.contiguous()
            pending_pairs += 1
            tokens += next(iter(tensors.values())).shape[0]
        if pending_pairs >= shard_pairs or sum(t.numel() * t.element_size() for t in pending.values()) >= shard_bytes:
            flush()
        bar.update(len(batch))
    flush()
    bar.close()
    model.train(model_was_training)

    count = len(TargetReader(out))
    write_json_atomic(out / "meta.json", {**meta, "count": count})
    all_tokens = sum(len(p["solution_ids"]) + 1 for p in pairs)
    disk = sum(s.stat().st_size for s in _shards(out))
    return {
        "dir": str(out),
        "mode": mode,
        "k": meta["k"],
        "pairs": count,
        "tokens": all_tokens,
        "new_tokens": tokens,
        "bytes": disk,
        "bytes_per_token": disk / max(all_tokens, 1),
        "full_float32_bytes_per_token": vocab * FULL_FLOAT32_BYTES,
    }


def format_target_stats(stats: dict) -> str:
    ratio = stats["full_float32_bytes_per_token"] / max(stats["bytes_per_token"], 1e-9)
    what = f"top-{stats['k']}" if stats["mode"] == "topk" else "full bf16"
    return (
        f"teacher targets ({what}): {stats['pairs']} pairs, {stats['tokens']} tokens, {stats['bytes'] / 1e6:.1f} MB in {stats['dir']}\n"
        f"bytes per token:   {stats['bytes_per_token']:,.0f} (full-vocabulary float32: {stats['full_float32_bytes_per_token']:,}; "
        f"{ratio:,.0f}x smaller)"
    )


__all__ = [
    "TargetsError",
    "TargetReader",
    "targets_dir_for",
    "teacher_sequence",
    "teacher_logits_rows",
    "teacher_targets",
    "write_targets",
    "format_target_stats",
]
