"""generate(): sample from a list of prompts in one call, through the engine.

The convenience form of minissb.engine for scripts and notebooks: every prompt becomes one
Request of num_samples samples, the engine runs them over a pool of slots, and the
completions come back in prompt-major order (row i * num_samples + j is sample j of prompt
i). Stages that stream their work (sample.py, eval.py) use the Engine directly.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from minissb.engine import Completion, Engine, GenerationError, Request, sample_tokens, top_k_mask, top_p_mask
from minissb.model import Qwen2ForCausalLM


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` in a call with `seed`: each prompt has its own noise."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def generate(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_samples: int = 1,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    tokenizer=None,
    return_logprobs: bool = False,
    return_hidden: bool = False,
    num_slots: int | None = None,
    cuda_graphs: bool = False,
) -> list[Completion]:
    """Sample num_samples continuations of each prompt (lists of token ids).

    temperature 0 is greedy. stop_ids: a row ends when it samples one of them (not included
    in token_ids); None means tokenizer.stop_ids when a tokenizer is given. seed: same seed ->
    same completions, whatever num_slots is (None: fresh noise each call). num_slots: the
    engine's pool (default: every row at once, as one batch).
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "stop_ids", ())
    if seed is None:
        seed = secrets.randbits(62)
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    slots = num_slots or len(prompts) * num_samples
    max_len = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, slots, max_len, stop_ids=stop_ids, tokenizer=tokenizer, cuda_graphs=cuda_graphs)
    requests = [
        Request(p, max_new_tokens, num_samples, temperature, top_k, top_p, repetition_penalty,
                prompt_seed(seed, i), return_logprobs, return_hidden, tag=i)
        for i, p in enumerate(prompts)
    ]
    for r in requests:  # every bad argument fails before any compute
        engine.add(r)
    out: list[Completion | None] = [None] * (len(prompts) * num_samples)
    for res in engine.run():
        i = res.request.tag
        for c in res.completions:
            c.prompt_index = i
            out[i * num_samples + c.sample_index] = c
    return out


__all__ = ["Completion", "GenerationError", "generate", "prompt_seed", "sample_tokens", "top_k_mask", "top_p_mask"]
