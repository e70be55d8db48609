"""Batched sampling from a Qwen2ForCausalLM with a static KV cache.

One call runs a batch of prompts of different lengths:

1. Prefill. Each distinct prompt is run once, on its own, right-aligned in its row of a
   KVCache allocated once for L + max_new_tokens slots (L = longest prompt), so padding costs
   no compute. With num_samples=K the prompt rows are then repeated K times in the cache
   (and so are their last logits): K rollouts of a prompt share one prefill.
2. Decode. One token per row per step, written into the next cache slot; attention reads
   only the slots filled so far. Each row stops on its own at a stop token or after
   max_new_tokens. Finished rows are dropped from the batch (and the cache) once enough of
   them pile up, so long rollouts do not drag short ones' dead slots along.

Sampling is done in float32 on the last position's logits: temperature, then top-k, then
top-p, then one uniform draw per row turned into a token by inverse CDF. The uniforms come
from one torch.Generator and are drawn for every original row at every step, whether the
row is still running or not, so a row's tokens depend only on the seed and its own
logits: dropping finished rows (or not) changes no output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from minissb.model import KVCache, Qwen2ForCausalLM


class GenerationError(ValueError):
    """Bad arguments to generate(); the message says what to fix."""


@dataclass
class Completion:
    """One sampled continuation of prompts[prompt_index] (sample sample_index of num_samples).

    token_ids are the generated ids WITHOUT the stop token: callers that train on them append
    the end-of-turn token themselves. stop_id says which stop token ended the row.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str | None  # tokenizer.decode(token_ids) when a tokenizer is given
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    stop_id: int | None = None  # the stop token sampled, when finish_reason == "stop"
    # With return_logprobs: log p(token) under the raw model logits (temperature 1, unfiltered)
    # for each token of token_ids, then for the stop token when finish_reason == "stop".
    logprobs: list[float] | None = None


# ----------------------------------------------------------------------------- sampling math


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (..., V), True for the k largest logits of each row (all ties of the k-th kept)."""
    if k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits >= kth


def _top_p_mask_sorted(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """top_p_mask for logits already sorted in descending order along the last dim."""
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep = mass_before < p  # a token is needed while the ones above it sum to less than p
    keep[..., 0] = True  # the most likely token always survives, whatever p is
    return keep


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask (..., V) of the nucleus: the smallest set of most likely tokens whose
    probabilities (softmax of `logits`) sum to >= p. Never empty."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    keep_sorted = _top_p_mask_sorted(sorted_logits, p)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), greedy when temperature == 0.

    uniforms: (B,) draws in [0, 1), one per row. A row's token is a function of its own
    logits and its own uniform only, so it does not depend on which other rows are in
    the batch.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    # Work on the candidates sorted by logit: top-k keeps the first k (a cheap topk instead
    # of sorting the whole ~150k vocabulary), top-p then cuts the sorted list.
    if top_k is not None and top_k < logits.shape[-1]:
        cand_logits, cand_ids = logits.topk(top_k, dim=-1)  # (B, k), descending
    else:
        cand_logits, cand_ids = logits.sort(dim=-1, descending=True)  # (B, V)
    if top_p is not None and top_p < 1.0:
        cand_logits = cand_logits.masked_fill(~_top_p_mask_sorted(cand_logits, top_p), float("-inf"))
    # Inverse CDF: the first candidate whose cumulative probability exceeds u. Masked
    # candidates add zero mass, so they can never be the first to pass u.
    cdf = cand_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, n)
    target = uniforms.to(cdf.device, torch.float32)[:, None] * cdf[:, -1:]  # (B, 1); cdf[-1] ~ 1
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    return cand_ids.gather(-1, pick).squeeze(-1)


# ----------------------------------------------------------------------------- generation


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples, compact_fraction):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}")
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    if compact_fraction is not None and not 0.0 <= compact_fraction <= 1.0:
        raise GenerationError(f"compact_fraction must be in [0, 1] or None, got {compact_fraction}")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and key-valid mask (P, L) for left-padded prompts (pads are id 0, masked out)."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    valid = torch.zeros(len(prompts), L, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[row, L - len(p) :] = True
    return ids.to(device), valid.to(device)


def _last_logits(model: Qwen2ForCausalLM, ids, valid, positions, cache, start) -> torch.Tensor:
    """Logits (B, V) of the last position only: the LM head over a whole prompt would cost
    T times more and those rows are never used."""
    hidden = model.hidden_states(ids, attention_mask=valid, positions=positions, cache=cache, start=start)
    return model.lm_head(hidden[:, -1])


def _compacted_batch_size(n_running: int) -> int:
    """Rows to keep when compacting: 1, or n_running rounded up to a multiple of 4 (topped
    up with finished rows). On CPU a float32 decode step with 2 or 3 rows is slower than with
    4 (small-M matmul kernels), and elsewhere 4 rows cost about what 2 do."""
    return n_running if n_running <= 1 else -(-n_running // 4) * 4


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    tokenizer=None,
    compact_fraction: float | None = 0.1,
    return_logprobs: bool = False,
    compile: bool = False,
    progress: bool = False,
) -> list[Completion]:
    """Sample num_samples continuations of each prompt (lists of token ids), in one batch.

    temperature 0 is greedy (top_k/top_p ignored). stop_ids: a row ends when it samples one
    of them (the token is not included in token_ids); None means tokenizer.stop_ids when a
    tokenizer is given (<|im_end|>, <|endoftext|> for Qwen2.5), else no stop tokens.
    seed / generator: the source of the sampling noise (a generator wins over a seed; with
    neither, the noise is fresh each call). Same seed -> same completions.
    compact_fraction: drop finished rows from the batch (KV cache included) once they make
    up at least this fraction of it; 0 = as soon as any finishes, None = never. The batch
    shrinks to the running rows rounded up to a multiple of 4 (or to 1 row). Outputs are
    identical either way; it only saves compute.
    compile: run the decode step through torch.compile (meant for CUDA; off by default and
    not worth it on CPU). It compiles with dynamic shapes, so neither the growing cache nor
    batch compaction recompiles; CUDA graphs ("reduce-overhead") are not used, as they need
    static shapes. The first call pays the compile time.
    progress: show a tqdm bar over decode steps.
    Returns Completions ordered prompt-major: row i * num_samples + j is sample j of prompt i.
    """
    prompts = [list(p) for p in prompts]
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples, compact_fraction)
    if not prompts:
        return []
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None and hasattr(tokenizer, "stop_ids") else ()
    stop_set = set(int(s) for s in stop_ids)
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()  # fresh, non-deterministic noise
    device = model.device
    n_rows = len(prompts) * num_samples

    was_training = model.training
    model.eval()  # e.g. LoRA dropout must be off while sampling
    try:
        step_logits = _compiled_decode if compile else _last_logits
        # Prefill each distinct prompt once, on its own: right-aligned at slots L-n..L-1 of its
        # cache row, so no compute goes to padding (a prompt of n tokens is already an n-row
        # matmul). Then each of its K samples gets a copy of its cache row.
        ids, prompt_valid = _left_pad(prompts, device)
        L = ids.shape[1]
        cache = KVCache(model.config, len(prompts), L + max_new_tokens, model.dtype, device)
        prompt_logits = []
        for i, p in enumerate(prompts):
            first = L - len(p)  # the prompt's first slot
            row_logits = _last_logits(model, ids[i : i + 1, first:], prompt_valid[i : i + 1], None, cache.row(i), first)
            prompt_logits.append(row_logits)
        logits = torch.cat(prompt_logits)  # (P, V)
        # Per-slot validity for the whole run: prompt slots as padded, new slots filled as we go.
        valid = torch.zeros(len(prompts), L + max_new_tokens, dtype=torch.bool, device=device)
        valid[:, :L] = prompt_valid
        next_pos = prompt_valid.sum(dim=1)  # (P,) position of each row's next token = its real length
        if num_samples > 1:
            cache.repeat_rows(num_samples, upto=L)
            logits = logits.repeat_interleave(num_samples, dim=0)
            valid = valid.repeat_interleave(num_samples, dim=0)
            next_pos = next_pos.repeat_interleave(num_samples, dim=0)

        rows = list(range(n_rows))  # original row index of each batch row still in the batch
        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        logps: list[list[float]] = [[] for _ in range(n_rows)]
        finish: list[str | None] = [None] * n_rows
        stopped_by: list[int | None] = [None] * n_rows
        n_done_in_batch = 0
        bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", disable=not progress, leave=False)
        for step in range(max_new_tokens):
            # Noise for every original row, always the same shape: a row's draw does not
            # depend on how many rows are still running.
            uniforms = torch.rand(n_rows, generator=generator, device=generator.device)
            batch_rows = torch.tensor(rows)
            next_ids = sample_tokens(logits, uniforms[batch_rows], temperature, top_k, top_p)  # (B,)
            chosen = next_ids.tolist()
            if return_logprobs:
                lp = logits.float().log_softmax(dim=-1).gather(-1, next_ids[:, None]).squeeze(-1).tolist()
            for b, r in enumerate(rows):
                if finish[r] is not None:
                    continue  # finished, waiting to be dropped: its tokens are ignored
                if chosen[b] in stop_set:
                    finish[r], stopped_by[r] = "stop", chosen[b]
                    n_done_in_batch += 1
                else:
                    tokens[r].append(chosen[b])
                if return_logprobs:
                    logps[r].append(lp[b])
            bar.update(1)
            bar.set_postfix(rows=len(rows) - n_done_in_batch)
            if step == max_new_tokens - 1 or n_done_in_batch == len(rows):
                break
            target = _compacted_batch_size(len(rows) - n_done_in_batch)
            if compact_fraction is not None and target < len(rows) and n_done_in_batch >= compact_fraction * len(rows):
                running = [b for b, r in enumerate(rows) if finish[r] is None]
                filler = [b for b, r in enumerate(rows) if finish[r] is not None][: target - len(running)]
                keep = sorted(running + filler)
                keep_t = torch.tensor(keep, device=device)
                cache.select_rows(keep_t, upto=L + step)  # slots past L+step are not written yet
                valid, next_pos, next_ids = valid[keep_t], next_pos[keep_t], next_ids[keep_t]
                rows = [rows[b] for b in keep]
                n_done_in_batch = len(filler)
            # Decode: write each row's new token into slot L+step, attend over slots 0..L+step.
            start = L + step
            valid[:, start] = True
            logits = step_logits(model, next_ids[:, None], valid[:, : start + 1], next_pos[:, None], cache, start)
            next_pos = next_pos + 1
        bar.close()
    finally:
        model.train(was_training)

    out = []
    for r in range(n_rows):
        reason = finish[r] or "length"
        text = tokenizer.decode(tokens[r]) if tokenizer is not None else None
        out.append(
            Completion(
                prompt_index=r // num_samples,
                sample_index=r % num_samples,
                token_ids=tokens[r],
                text=text,
                finish_reason=reason,
                stop_id=stopped_by[r],
                logprobs=logps[r] if return_logprobs else None,
            )
        )
    return out


_compiled = None


def _compiled_decode(model, ids, valid, positions, cache, start):
    # dynamic=True: the cache length and the batch size are symbolic, so neither the growing
    # attention span nor batch compaction triggers a recompile at every step.
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_last_logits, dynamic=True)
    return _compiled(model, ids, valid, positions, cache, start)


__all__ = ["Completion", "GenerationError", "generate", "sample_tokens", "top_k_mask", "top_p_mask"]
