"""A small inference engine: a pool of KV-cache slots that refills as sequences finish.

Every SSB stage is bound by generation (K rollouts per problem, a teacher solution per kept
problem, thousands of evaluation answers), so this module is the one that decides how long
a run takes. It follows the shape of nano-vllm and gpt-fast, cut down to what SSB needs:

    engine = Engine(model, num_slots=64, max_len=2048, stop_ids=tok.stop_ids, tokenizer=tok)
    for out in engine.run(requests):          # requests: any iterable, pulled lazily
        grade(out.completions)                # each request comes out once all its samples are done
        engine.add(follow_up_request)         # may be called while run() is going

Read top to bottom: Request / Completion / RequestOutput -> sampling noise -> sampling math
-> the Engine (admit = one prefill per prompt and K copies of its cache row; step = one
token for every busy slot; finish = free the slot at once) -> the CUDA-graph decode step.

The KV cache is allocated once: (layers, num_slots, kv_heads, max_len, head_dim). Slot s
holds one sequence from position 0, so a slot's write position is its sequence length, and
slots advance together even though their lengths differ (the decode step writes each row at
its own position and masks keys past it). A prompt is prefilled alone, on exactly its own
tokens (no padding), into its first slot; its K samples get copies of that cache row.

Determinism. A sequence's noise is a counter-based draw from (request seed, sample index,
step): nothing is shared between sequences, so the tokens of a sequence depend only on its
own seed, its index within its request and its own logits, never on the pool size, on the
slot it got, or on what else runs. The logits themselves come from matmuls over whichever rows
share the step, and a CPU kernel may round a row differently for another row count: in float32
that flips a sample only if its uniform lands within ~1e-7 of a CDF boundary (never seen in the
tests), but in bf16 the rounding is coarse enough that, over hundreds of tokens, some samples
of a real model do diverge (measured: rerunning 20 teacher solutions of Qwen2.5-Coder-1.5B in
another pool changed the verdict of one). Exact replays need float32.

CPU. The decode step runs only over the slots up to the highest busy one (rounded up to a
multiple of 4: small-M matmuls are slower per row on CPU), and when the queue is empty the
busy sequences are moved down into free low slots, so a draining pool shrinks. CUDA can
capture the decode step in CUDA graphs (cuda_graphs=True): shapes are static per
(rows bucket, attention-span bucket), so each bucket is captured once. That path has not yet
run on a GPU here, so it stays off by default.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minissb.model import KVCache, Qwen2ForCausalLM


@dataclass
class Request:
    """One prompt to sample num_samples continuations of.

    temperature 0 is greedy (top_k, top_p and the noise are then unused). top_k None / top_p
    None or 1.0 / repetition_penalty 1.0 mean off. repetition_penalty follows Hugging Face:
    the logit of every token already in the sequence (prompt included) is divided by the
    penalty when positive and multiplied by it when negative, before temperature.
    return_hidden: also return the final normed hidden state (the LM head's input) at the
    last prompt position and every generated position: one row per sampled token.
    tag: anything; it comes back with the output.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    return_logprobs: bool = False
    return_hidden: bool = False
    tag: Any = None


@dataclass
class Completion:
    """One sampled continuation: sample sample_index of request prompt_index.

    token_ids are the generated ids WITHOUT the stop token: callers that train on them append
    the end-of-turn token themselves. stop_id says which stop token ended the row.
    """

    prompt_index: int  # the request's number in submission order (generate(): the prompt's index)
    sample_index: int
    token_ids: list[int]
    text: str | None  # tokenizer.decode(token_ids) when the engine has a tokenizer
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    stop_id: int | None = None
    # return_logprobs: log p(token) under the raw model logits (temperature 1, unfiltered,
    # before any repetition penalty) for each token of token_ids, then for the stop token.
    logprobs: list[float] | None = None
    # return_hidden: (len(token_ids) + (1 if stopped), hidden_size) on the CPU, in the model's
    # dtype: row i is the hidden state at prompt position P-1+i, from which token i was sampled.
    hidden: torch.Tensor | None = None


@dataclass
class RequestOutput:
    request: Request
    completions: list[Completion]  # by sample_index


# ----------------------------------------------------------------------------- sampling noise

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sequence_key(seed: int, sample_index: int) -> int:
    """64-bit key of one sequence's noise stream."""
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniforms(keys: np.ndarray, steps: np.ndarray) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): one per (key, step), independent of any other row.

    SplitMix64's finaliser over key + (step+1)·golden (uint64 arithmetic wraps by definition
    in numpy arrays); the top 24 bits make an exactly representable float32."""
    x = keys.astype(np.uint64) + (steps.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24))


# ----------------------------------------------------------------------------- sampling math


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (..., V), True for the k largest logits of each row (all ties of the k-th kept)."""
    if k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits >= kth


def _top_p_mask_sorted(sorted_logits: torch.Tensor, p) -> torch.Tensor:
    """top_p_mask for logits already sorted in descending order; p a float or (n, 1)."""
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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Hugging Face's repetition penalty: logits (n, V), seen (n, V) bool, penalty (n,)."""
    pen = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    return torch.where(seen, penalised, logits)


def sample_tokens(logits, uniforms, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """Next token ids (n,) from logits (n, V), one uniform per row.

    temperature, top_k, top_p: one value for all rows, or one per row (a list or tensor of n;
    temperature 0 = greedy for that row, top_k 0/None = off, top_p 1/None = off). Order as in
    Hugging Face: temperature, top-k, top-p; then the inverse CDF of the kept candidates at
    the row's uniform. A row's token is a function of its own logits, settings and uniform.

    The (n, V) logits are read as few times as possible, in their own dtype: on the 2-core
    Xeon (avx512_bf16) each full pass over 64 x 151,936 bf16 logits costs ~10 ms (upcast,
    divide by temperature, argmax) against ~215 ms for the whole decode step. Dividing by a
    positive temperature keeps the order, so the candidates are chosen on the raw logits and
    only they are upcast and scaled (the same float32 values as scaling first).
    """
    n, V = logits.shape
    temps = _per_row(temperature, n, 0.0).to(logits.device)
    sampled_rows = temps > 0
    if not sampled_rows.any():
        # max(dim) returns the first maximal index, like argmax, at a quarter of its time in bf16.
        return logits.max(dim=-1).indices
    ks = _per_row(top_k, n, 0).long().to(logits.device)
    ks = torch.where((ks <= 0) | (ks > V), V, ks)
    ps = _per_row(top_p, n, 1.0).to(logits.device)
    # Candidates sorted by logit: a topk of the largest k any row needs (cheap next to
    # sorting the ~150k vocabulary), then each row keeps its own first k.
    kmax = int(ks.max())
    if kmax < V:
        cand, cand_ids = logits.topk(kmax, dim=-1)  # (n, kmax), descending
    else:
        cand, cand_ids = logits.sort(dim=-1, descending=True)  # (n, V)
    cand = cand.float() / torch.where(sampled_rows, temps, 1.0)[:, None]
    ranks = torch.arange(kmax, device=logits.device)[None, :]
    cand = cand.masked_fill(ranks >= ks[:, None], float("-inf"))
    if (ps < 1).any():
        cand = cand.masked_fill(~_top_p_mask_sorted(cand, ps[:, None]), float("-inf"))
    # Inverse CDF: the first candidate whose cumulative probability exceeds u. Masked
    # candidates add zero mass, so they can never be the first to pass u.
    cdf = cand.softmax(dim=-1).cumsum(dim=-1)  # (n, kmax)
    target = uniforms.to(cdf.device, torch.float32)[:, None] * cdf[:, -1:]  # (n, 1); cdf[-1] ~ 1
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=kmax - 1)  # (n, 1)
    sampled = cand_ids.gather(-1, pick).squeeze(-1)
    if sampled_rows.all():
        return sampled
    return torch.where(sampled_rows, sampled, logits.max(dim=-1).indices)


def _per_row(value, n: int, off) -> torch.Tensor:
    if value is None:
        value = off
    if isinstance(value, torch.Tensor):
        return value.float() if value.dim() else value.float().expand(n)
    if isinstance(value, (list, tuple)):
        return torch.tensor([off if v is None else v for v in value], dtype=torch.float32)
    return torch.full((n,), float(value), dtype=torch.float32)


def check_request(req: Request, vocab_size: int, max_len: int, num_slots: int) -> None:
    """One-line errors for a request the engine cannot run."""
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {req.max_new_tokens!r}")
    if not (req.temperature >= 0 and np.isfinite(req.temperature)):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {req.temperature}")
    if req.top_k is not None and req.top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {req.top_k}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {req.top_p}")
    if not (req.repetition_penalty > 0 and np.isfinite(req.repetition_penalty)):
        raise ValueError(f"repetition_penalty must be finite and > 0 (1 = off), got {req.repetition_penalty}")
    if not 1 <= req.num_samples <= num_slots:
        raise ValueError(f"num_samples must be in [1, {num_slots}] (the engine's slots), got {req.num_samples}")
    if len(req.prompt) == 0:
        raise ValueError("a prompt is empty: every prompt needs at least one token")
    bad = [t for t in req.prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"a prompt has token id {bad[0]} outside the model's vocabulary [0, {vocab_size})")
    if len(req.prompt) + req.max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {len(req.prompt)} tokens + max_new_tokens {req.max_new_tokens} exceeds the engine's "
            f"max_len {max_len}: raise max_len or lower max_new_tokens"
        )


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, or MemAvailable on a Linux CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(model: Qwen2ForCausalLM, num_slots: int, max_len: int) -> None:
    """Refuse, with the numbers, a KV cache that cannot fit (instead of an out-of-memory kill)."""
    cfg = model.config
    elem = torch.finfo(model.dtype).bits // 8
    need = 2 * cfg.num_hidden_layers * num_slots * cfg.num_key_value_heads * max_len * cfg.head_dim * elem
    free = available_memory(model.device)
    if free is not None and need > 0.9 * free:
        raise ValueError(
            f"the KV cache for {num_slots} slots x {max_len} positions needs {need / 2**30:.1f} GiB and "
            f"{free / 2**30:.1f} GiB are free: lower --batch-size or --max-new-tokens"
        )


# ----------------------------------------------------------------------------- the engine


@dataclass
class _Sequence:
    request: Request
    index: int  # the request's number
    sample: int
    key: int  # noise stream
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    stop_id: int | None = None
    slot: int = -1

    @property
    def length(self) -> int:
        """Tokens in the cache once the last sampled token is fed: its write position."""
        return self.prompt_len + len(self.tokens)


@dataclass
class _Pending:
    request: Request
    index: int
    done: dict[int, Completion] = field(default_factory=dict)


class Engine:
    """A pool of num_slots sequences of at most max_len tokens each (prompt + generated)."""

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        num_slots: int,
        max_len: int,
        stop_ids: Sequence[int] = (),
        tokenizer=None,
        cuda_graphs: bool = False,
    ):
        assert num_slots >= 1 and max_len >= 2
        self.model, self.num_slots, self.max_len = model, num_slots, max_len
        self.stop_ids = {int(s) for s in stop_ids}
        self.tokenizer = tokenizer
        self.device = model.device
        check_memory(model, num_slots, max_len)
        self.cache = KVCache(model.config, num_slots, max_len, model.dtype, self.device)
        self.slots: list[_Sequence | None] = [None] * num_slots
        self.queue: deque[Request] = deque()  # added with add(): served before the feed
        self.pending: dict[int, _Pending] = {}
        self.seen: torch.Tensor | None = None  # (num_slots, V) bool, allocated when a request uses a penalty
        self.hidden: torch.Tensor | None = None  # (num_slots, max_len, hidden), allocated on return_hidden
        self.graphs = _DecodeGraphs(self) if cuda_graphs else None
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.n_requests = 0
        self.stats = {"tokens": 0, "prefill_tokens": 0, "decode_steps": 0, "row_steps": 0}

    # -- public

    def add(self, request: Request) -> None:
        """Queue a request ahead of the feed (e.g. a follow-up decided from an output)."""
        check_request(request, self.model.config.vocab_size, self.max_len, self.num_slots)
        self.queue.append(request)

    @torch.no_grad()
    def run(self, requests: Iterable[Request] = ()) -> Iterator[RequestOutput]:
        """Run until the feed, the queue and the pool are empty, yielding each request's
        output as soon as all its samples are done. `requests` is pulled only when slots are
        free, so it may be a long or endless generator."""
        feed = iter(requests)
        was_training = self.model.training
        self.model.eval()  # e.g. LoRA dropout off while sampling
        try:
            while True:
                finished = self._admit(feed)
                if not any(self.slots):
                    yield from finished
                    if not self.queue and not self._feed_has_more(feed):
                        return
                    continue
                finished += self._decode_step()
                yield from finished
        finally:
            self.model.train(was_training)

    # -- admission

    def _feed_has_more(self, feed) -> bool:
        nxt = next(feed, None)
        if nxt is None:
            return False
        self.add(nxt)
        return True

    def _admit(self, feed) -> list[RequestOutput]:
        """Prefill waiting requests into free slots, lowest first, while they fit."""
        out = []
        while True:
            if not self.queue:
                if self.slots.count(None) == 0 or not self._feed_has_more(feed):
                    return out
            free = [s for s, seq in enumerate(self.slots) if seq is None]
            req = self.queue[0]
            if len(free) < req.num_samples:
                return out  # it waits for slots (FIFO: nothing overtakes it)
            self.queue.popleft()
            out += self._prefill(req, free[: req.num_samples])

    def _prefill(self, req: Request, slots: list[int]) -> list[RequestOutput]:
        index = self.n_requests
        self.n_requests += 1
        self.pending[index] = _Pending(req, index)
        P = len(req.prompt)
        first = slots[0]
        ids = torch.tensor([list(req.prompt)], dtype=torch.long, device=self.device)  # (1, P)
        hidden = self.model.hidden_states(ids, cache=self.cache.row(first), start=0)[:, -1]  # (1, hidden)
        self.stats["prefill_tokens"] += P
        seqs = []
        for j, s in enumerate(slots):
            if s != first:  # the K samples share one prefill: copy the cache row
                self.cache.k[:, s, :, :P] = self.cache.k[:, first, :, :P]
                self.cache.v[:, s, :, :P] = self.cache.v[:, first, :, :P]
            seq = _Sequence(req, index, j, sequence_key(req.seed, j), P, slot=s)
            self.slots[s] = seq
            seqs.append(seq)
        if req.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.num_slots, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            prompt_ids = ids[0]
            for s in slots:
                self.seen[s] = False
                self.seen[s, prompt_ids] = True
        if req.return_hidden:
            if self.hidden is None:
                self.hidden = torch.zeros(self.num_slots, self.max_len, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)
            self.hidden[slots, P - 1] = hidden.to(self.hidden.dtype)
        logits = self.model.lm_head(hidden).expand(len(seqs), -1)  # (K, V): one prefill, K samples
        return self._sample_and_accept(logits, seqs)

    # -- one decode step

    def _rows(self) -> int:
        """Rows the decode step runs over: up to the highest busy slot, rounded up to 4."""
        top = max(s for s, seq in enumerate(self.slots) if seq is not None) + 1
        if self.graphs is not None:
            return self.graphs.rows_bucket(top)
        return min(self.num_slots, -(-top // 4) * 4) if top > 1 else 1

    def _decode_step(self) -> list[RequestOutput]:
        self._compact()
        n = self._rows()
        last = [0] * n
        pos = [0] * n  # idle rows write their garbage at slot position 0 of their own row
        for s in range(n):
            seq = self.slots[s]
            if seq is not None:
                last[s], pos[s] = seq.tokens[-1], seq.length - 1
        ids = torch.tensor(last, dtype=torch.long, device=self.device)[:, None]  # (n, 1)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)  # (n,)
        span = max(pos) + 1
        if self.graphs is not None:
            hidden, logits = self.graphs.step(ids, positions, span)
        else:
            hidden = decode_hidden(self.model, self.cache, ids, positions, span)  # (n, hidden)
            logits = self.model.lm_head(hidden)  # (n, V)
        busy = [s for s in range(n) if self.slots[s] is not None]
        if self.hidden is not None:
            rows = torch.tensor(busy, device=self.device)
            self.hidden[rows, positions[rows]] = hidden[rows].to(self.hidden.dtype)
        self.stats["decode_steps"] += 1
        self.stats["row_steps"] += n
        seqs = [self.slots[s] for s in busy]
        return self._sample_and_accept(logits[busy] if len(busy) < n else logits, seqs)

    def _sample_and_accept(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[RequestOutput]:
        """Sample one token for each sequence (logits row i is seqs[i]'s) and record it."""
        reqs = [q.request for q in seqs]
        raw = logits  # (n, V) in the model's dtype: sample_tokens upcasts only what it keeps
        penalties = [r.repetition_penalty for r in reqs]
        if any(p != 1.0 for p in penalties):
            slots = torch.tensor([q.slot for q in seqs], device=self.device)
            logits = apply_repetition_penalty(logits.float(), self.seen[slots], torch.tensor(penalties, device=self.device))
        keys = np.array([q.key for q in seqs], dtype=np.uint64)
        steps = np.array([len(q.tokens) for q in seqs], dtype=np.uint64)  # step i draws the i-th token
        noise = uniforms(keys, steps)
        temps = [r.temperature for r in reqs]
        tokens_t = sample_tokens(logits, noise, temps, [r.top_k for r in reqs], [r.top_p for r in reqs])
        tokens = tokens_t.tolist()
        lps = None
        if any(r.return_logprobs for r in reqs):
            lps = raw.float().log_softmax(dim=-1).gather(-1, tokens_t[:, None]).squeeze(-1).tolist()
        if self.seen is not None:
            self.seen[[q.slot for q in seqs], tokens_t] = True
        self.stats["tokens"] += len(seqs)
        out = []
        for i, (q, tok) in enumerate(zip(seqs, tokens)):
            if q.request.return_logprobs:
                q.logprobs.append(lps[i])
            if tok in self.stop_ids:
                q.finish, q.stop_id = "stop", tok
            else:
                q.tokens.append(tok)
                if len(q.tokens) == q.request.max_new_tokens:
                    q.finish = "length"
            if q.finish is not None:
                done = self._finish(q)
                if done is not None:
                    out.append(done)
        return out

    def _finish(self, q: _Sequence) -> RequestOutput | None:
        """Free q's slot; the request's output once its last sample is done."""
        hidden = None
        if q.request.return_hidden:
            n_rows = len(q.tokens) + (q.finish == "stop")
            hidden = self.hidden[q.slot, q.prompt_len - 1 : q.prompt_len - 1 + n_rows].to("cpu", copy=True)  # the slot is reused
        self.slots[q.slot] = None
        text = self.tokenizer.decode(q.tokens) if self.tokenizer is not None else None
        pend = self.pending[q.index]
        pend.done[q.sample] = Completion(
            q.index, q.sample, q.tokens, text, q.finish, q.stop_id, q.logprobs if q.request.return_logprobs else None, hidden
        )
        if len(pend.done) < pend.request.num_samples:
            return None
        del self.pending[q.index]
        return RequestOutput(pend.request, [pend.done[j] for j in range(pend.request.num_samples)])

    def _compact(self) -> None:
        """Move busy sequences from high slots into free low ones while nothing waits, so a
        draining pool runs fewer rows. Outputs do not depend on slots, only the cost does."""
        if self.queue:
            return
        while True:
            busy = [s for s, q in enumerate(self.slots) if q is not None]
            free = [s for s, q in enumerate(self.slots) if q is None]
            if not busy or not free or free[0] > busy[-1]:
                return
            src, dst = busy[-1], free[0]
            q = self.slots[src]
            n = q.length - 1  # cache positions written so far
            self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
            self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
            if self.seen is not None:
                self.seen[dst] = self.seen[src]
            if self.hidden is not None:
                self.hidden[dst, : n + 1] = self.hidden[src, : n + 1]
            self.slots[dst], self.slots[src], q.slot = q, None, dst


def decode_hidden(model: Qwen2ForCausalLM, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
    """Final normed hidden states (n, hidden) of one decode step over cache rows 0..n-1.

    ids (n, 1): each row's newest token; positions (n,): where each row writes it (its
    length so far). Each row attends to its keys 0..positions[row] within the first `span`
    cache positions (span > every position), so rows of different lengths step together."""
    n = ids.shape[0]
    key_pos = torch.arange(span, device=ids.device)
    mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]  # (n, 1, 1, span)
    view = cache.rows(n, write_positions=positions)
    hidden = model.hidden_states(ids, attention_mask=mask, positions=positions[:, None], cache=view, start=span - 1)
    return hidden[:, -1]


# ----------------------------------------------------------------------------- CUDA graphs


class _DecodeGraphs:
    """The decode step (model + LM head) captured as one CUDA graph per (rows, span) bucket.

    Static input buffers (token ids, positions) are filled before each replay; the mask is
    built from the positions inside the graph, and the cache is written in place, so a graph
    replays correctly for any lengths within its span bucket."""

    SPAN_BUCKET = 256  # attention reads span keys per row: round up, at most this much waste

    def __init__(self, engine: Engine):
        self.engine = engine
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        n = engine.num_slots
        self.buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < n} | {n})

    def rows_bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, span: int):
        eng = self.engine
        n = ids.shape[0]
        span = min(eng.max_len, -(-span // self.SPAN_BUCKET) * self.SPAN_BUCKET)
        key = (n, span)
        if key not in self.graphs:
            self.graphs[key] = self._capture(n, span, ids, positions)
        graph, static_ids, static_pos, hidden, logits = self.graphs[key]
        static_ids.copy_(ids)
        static_pos.copy_(positions)
        graph.replay()
        return hidden, logits

    def _capture(self, n: int, span: int, ids, positions):
        eng = self.engine
        static_ids, static_pos = ids.clone(), positions.clone()

        def forward():
            h = decode_hidden(eng.model, eng.cache, static_ids, static_pos, span)
            return h, eng.model.lm_head(h)

        # Warm up on a side stream (allocator and kernel selection), then capture. The warm-up
        # writes this step's real keys and values, which the replay writes again unchanged.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden, logits = forward()
        self.pool = graph.pool()
        return graph, static_ids, static_pos, hidden, logits


__all__ = [
    "Engine",
    "Request",
    "RequestOutput",
    "Completion",
    
    "sample_tokens",
    "top_k_mask",
    "top_p_mask",
    "apply_repetition_penalty",
    "uniforms",
    "sequence_key",
    "decode_hidden",
]
