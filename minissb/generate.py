"""generate(): sample from a list of prompts in one call, through the engine.

The convenience form of minissb.engine for scripts and notebooks: every prompt becomes one
Request of num_samples samples, the engine runs them all at once (one slot per sample), and
the completions come back in prompt-major order (row i * num_samples + j is sample j of
prompt i). Stages that stream their work (sample.py, eval.py), and anything that needs
log-probs, hidden states, a repetition penalty, a smaller pool or CUDA graphs, use the
Engine directly.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from minissb.engine import Completion, Engine, Request
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
    num_samples: int = 1,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    tokenizer=None,
) -> list[Completion]:
    """Sample num_samples continuations of each prompt (lists of token ids).

    temperature 0 is greedy. stop_ids: a row ends when it samples one of them (not included
    in token_ids); None means tokenizer.stop_ids when a tokenizer is given (which also fills
    each completion's text). seed: same seed -> same completions (None: fresh noise each call).
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    assert num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"
    if stop_ids is None:
        stop_ids = tokenizer.stop_ids if tokenizer is not None else ()
    if seed is None:
        seed = secrets.randbits(62)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, len(prompts) * num_samples, max_len, stop_ids=stop_ids, tokenizer=tokenizer)
    for i, p in enumerate(prompts):  # every bad argument fails here, before any compute
        engine.add(Request(p, max_new_tokens, num_samples, temperature, top_k, top_p, seed=prompt_seed(seed, i)))
    # The engine numbers requests in the order they were added: prompt_index is i.
    completions = [c for out in engine.run() for c in out.completions]
    return sorted(completions, key=lambda c: (c.prompt_index, c.sample_index))


__all__ = ["Completion", "generate", "prompt_seed"]
