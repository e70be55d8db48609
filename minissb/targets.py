"""Teacher targets captured while the teacher writes (SSB stage 2): one file per kept pair.

Teacher and student are the same weights and the LM head carries no adapter, so the
teacher's final normed hidden state at a position fixes its logits there exactly:
logits = lm_head(hidden). The engine returns those hidden states from the teacher's own
generation (no extra forward), and for a kept pair with teacher prompt length P and solution
length S they are the rows of

    [teacher prompt ids | solution ids | <|im_end|>]
     0 ........... P-1   P ..... P+S-1   P+S

at positions P-1 ... P+S-1 (S+1 rows), which predict solution token 0 ... S-1 and finally
the end of turn. train.py (--teacher captured) turns them into logits chunk by chunk inside
the loss: hidden_size numbers per token on disk instead of a vocabulary of logits.

Layout, in `<pairs stem>.targets/`:
    meta.json                        {"format", "model", "teacher_dtype", "dtype", "hidden_size"}
    <pair id, made safe>.safetensors "hidden" (S+1, hidden_size); metadata: id, solution_sha256

Under torchrun every rank writes its pairs' files into the one folder; rank 0 alone writes
meta.json and removes orphans, before the others start.

Crash safety: a pair's file is written whole (atomic_write) BEFORE its line is appended to the
pairs file, so a pair never lacks its targets; a killed run can leave a file whose pair line was
never written, and the next start removes such orphans (and temporaries). Rejected solutions
store nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from minissb.runs import atomic_write, remove_temp_files, write_json_atomic

FORMAT = "minissb-captured-hidden-v1"
FLOAT32_LOGIT_BYTES = 4  # what the original SSB code stores per vocabulary entry and token (.npz, float32)


def targets_dir_for(pairs_path: str | os.PathLike) -> Path:
    p = Path(pairs_path)
    stem = p.with_suffix("") if p.suffix == ".jsonl" else p
    return stem.with_name(stem.name + ".targets")


def solution_sha256(solution_ids: Sequence[int]) -> str:
    """Identifies the solution a file's rows belong to (a pairs file from another run differs)."""
    return hashlib.sha256(",".join(map(str, solution_ids)).encode()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_name(pair_id: str) -> str:
    # Ids like "gsm8k/train/17" are not file names; the hash keeps distinct ids distinct.
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", pair_id)[:80]
    return f"{safe}-{hashlib.sha256(pair_id.encode()).hexdigest()[:10]}.safetensors"


class CapturedTargets:
    """The targets folder of one pairs file: meta.json and one safetensors file per pair."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.meta_path = self.dir / "meta.json"

    # -- writing (sample.py)

    def open_for_writing(self, model: str, teacher_dtype: torch.dtype, dtype: torch.dtype, hidden_size: int,
                         kept_ids: Iterable[str], clean: bool = True) -> None:
        """Create the folder (or check it belongs to this model and these dtypes: the teacher ran in
        teacher_dtype, rows are stored in dtype) and remove what a killed run left: temporaries
        and the files of pairs that were never recorded. clean=False (the other ranks under
        torchrun, after rank 0 opened it): only the check, the folder is left as it is."""
        meta = {"format": FORMAT, "model": model, "teacher_dtype": dtype_name(teacher_dtype), "dtype": dtype_name(dtype),
                "hidden_size": hidden_size}
        if self.meta_path.is_file():
            stored = self.read_meta()
            if stored != meta:
                diff = ", ".join(f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in meta.items() if stored.get(k) != v)
                raise ValueError(f"{self.dir} holds targets captured with other settings ({diff}): pass a new --out")
        else:
            assert clean, f"{self.meta_path} is written by rank 0 before the other ranks open the folder"
            write_json_atomic(self.meta_path, meta)
        if not clean:
            return  # rank 0 has removed the leftovers already
        remove_temp_files(self.dir)
        keep = {_file_name(i) for i in kept_ids}
        for f in self.dir.glob("*.safetensors"):
            if f.name not in keep:
                f.unlink()

    def write(self, pair_id: str, solution_ids: Sequence[int], hidden: torch.Tensor) -> int:
        """Store one pair's S+1 rows; returns the bytes written."""
        from safetensors.torch import save_file

        assert hidden.dim() == 2 and hidden.shape[0] == len(solution_ids) + 1, (tuple(hidden.shape), len(solution_ids))
        path = self.dir / _file_name(pair_id)
        meta = {"id": pair_id, "solution_sha256": solution_sha256(solution_ids)}
        atomic_write(path, lambda tmp: save_file({"hidden": hidden.contiguous()}, tmp, metadata=meta))
        return path.stat().st_size

    # -- reading (train.py)

    def read_meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{self.dir} has no meta.json: not a folder of captured targets") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.meta_path}: not valid JSON ({e})") from None

    def has(self, pair_id: str) -> bool:
        return (self.dir / _file_name(pair_id)).is_file()

    def read(self, pair_id: str, solution_ids: Sequence[int]) -> torch.Tensor:
        """The (S+1, hidden_size) rows of one pair, checked against its solution."""
        from safetensors import SafetensorError, safe_open

        path = self.dir / _file_name(pair_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, hidden = f.metadata() or {}, f.get_tensor("hidden")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read the targets of pair {pair_id} ({e}): rerun sample.py to capture them again") from None
        if meta.get("id") != pair_id or meta.get("solution_sha256") != solution_sha256(solution_ids):
            raise ValueError(f"{path}: captured for another solution than pair {pair_id}'s: the targets do not belong to this pairs file")
        if hidden.shape[0] != len(solution_ids) + 1:
            raise ValueError(f"{path}: {hidden.shape[0]} rows, pair {pair_id} needs {len(solution_ids) + 1} (S+1)")
        return hidden

    def bytes_per_token(self) -> tuple[int, int, float]:
        """(files' bytes, rows, bytes per row) over every stored pair."""
        total = rows = 0
        from safetensors import safe_open

        for f in self.dir.glob("*.safetensors"):
            total += f.stat().st_size
            with safe_open(str(f), framework="pt") as h:
                rows += h.get_slice("hidden").get_shape()[0]
        return total, rows, (total / rows if rows else 0.0)


__all__ = ["CapturedTargets", "targets_dir_for", "solution_sha256", "dtype_name", "FLOAT32_LOGIT_BYTES"]
