"""Distillation loss: KL(teacher || student) at temperature T, from final hidden states.

For each trained position (a solution token whose next-token distribution the student
should match) with student logits z_s and teacher logits z_t:

    p = softmax(z_t / T)        teacher, temperature-softened
    q = softmax(z_s / T)        student, temperature-softened
    KL = sum_v p_v (log p_v - log q_v)
    CE = logsumexp(z_s) - z_s[y]          optional, at T = 1 on the true next token y

    loss = kd_weight * T^2 * mean(KL) + ce_weight * mean(CE)

The means run over all trained positions of the batch together (a token-level mean, so
a long solution weighs more than a short one), the usual convention for LM losses. The
T^2 keeps the gradient scale independent of T (Hinton et al., 2015): d KL / d z_s is
(q - p) / T.

Memory. Logits for 4 x 1024 tokens over Qwen2.5's 151,936-token vocabulary are 2.5 GB in
float32, twice with the teacher's, and autograd would keep several such tensors alive.
So the loss takes final hidden states (N, D) and the LM head weight (V, D) and applies the
head itself, a chunk of rows at a time, in a custom autograd.Function: forward computes
each chunk's logits, reduces them to per-row losses and drops them; backward recomputes
each chunk's logits (the price: one more LM-head matmul per side) and turns them straight
into the gradient w.r.t. the hidden states (and w.r.t. the LM head weight, if it requires
grad). Nothing larger than (chunk_size, V) is ever alive.

Precision. The LM-head matmul runs in the weights' dtype (bf16 matmuls accumulate in
float32 internally and round the result once, exactly as a bf16 model's logits are);
everything after it (log-softmax, KL, CE, sums) is float32 (float64 for float64 inputs).

Teacher, three ways (exactly one):
- online: teacher_hidden (N, D), the teacher's final hidden states at the same positions;
  its logits are computed per chunk with teacher_weight (default: the student's LM head,
  as in SSB, where teacher = the same weights with the adapter off).
- full logits: teacher_logits (N, V).
- sparse top-k: topk_logprobs (N, k), topk_ids (N, k) from `topk_targets`, e.g. stored
  offline. The KL is taken over k + 1 buckets: the teacher's k most likely tokens, and one
  "rest" bucket holding the remaining mass (teacher: 1 - sum exp(topk_logprobs); student:
  its probability on every token outside those k ids). This is the KL between the two
  distributions coarsened to those buckets, so it never exceeds the full KL, and equals it
  when k = V. Within the rest bucket the student is free: the gradient pushes its rest
  mass toward the teacher's as a whole, keeping its own shape inside the bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class LossError(ValueError):
    """Inputs to the loss are inconsistent; the message says what to fix."""


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar float32: kd_weight * T^2 * kl + ce_weight * ce; call .backward() on it
    kl: torch.Tensor | None  # mean KL(teacher || student) per token at T, in nats, before T^2; detached
    ce: torch.Tensor | None  # mean cross-entropy per token at T = 1 on the targets; detached
    n_tokens: int  # number of positions the means run over


# ----------------------------------------------------------------------------- sparse targets


def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 2.0, chunk_size: int = 256):
    """The teacher's k most likely tokens and their log-probabilities at `temperature`.

    teacher_logits: (..., V). Returns topk_logprobs (..., k) float32 (float64 for float64
    logits), sorted descending, and topk_ids (..., k) int64. The mass left outside the top k is 1 - sum(exp(topk_logprobs)),
    so store targets at the temperature you will train at.
    """
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise LossError(f"k={k} must be between 1 and the vocabulary size {V}")
    if temperature <= 0:
        raise LossError(f"temperature={temperature} must be > 0")
    rows = teacher_logits.reshape(-1, V)  # (N, V)
    logprobs, ids = [], []
    for start in range(0, rows.shape[0], chunk_size):  # chunks bound the float32 copy
        lp = _log_softmax(rows[start : start + chunk_size], temperature, _compute_dtype(rows))
        values, indices = lp.topk(k, dim=-1)
        logprobs.append(values)
        ids.append(indices)
    shape = (*teacher_logits.shape[:-1], k)
    if not logprobs:  # no rows
        return torch.empty(shape, dtype=_compute_dtype(rows), device=rows.device), torch.empty(shape, dtype=torch.long, device=rows.device)
    return torch.cat(logprobs).reshape(shape), torch.cat(ids).reshape(shape)


# ----------------------------------------------------------------------------- the loss


def kd_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = 256,
) -> LossOutput:
    """Chunked KD (+ optional CE) loss from final hidden states; see the module docstring.

    student_hidden: (B, T, D) or (N, D) final (normed) hidden states; lm_head_weight: (V, D).
    mask: bool, student_hidden.shape[:-1]; True = a position whose next-token distribution
    is trained. None = every position. The N selected rows are what the means run over.
    Teacher tensors (teacher_hidden, teacher_logits, topk_*) and targets either have the
    student's leading shape (then the same mask selects their rows) or are already the N
    selected rows, in order. Aligning teacher and student positions (the teacher's prompt is
    longer) is the caller's job: gather each side's solution positions into (N, ...) rows.
    Teacher inputs are targets: no gradient flows into them.
    targets: int next-token ids, needed when ce_weight > 0 (CE is also reported when given).
    """
    if student_hidden.dim() not in (2, 3):
        raise LossError(f"student_hidden must be (B, T, D) or (N, D), got shape {tuple(student_hidden.shape)}")
    D = student_hidden.shape[-1]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != D:
        raise LossError(f"lm_head_weight must be (V, {D}), got shape {tuple(lm_head_weight.shape)}")
    V = lm_head_weight.shape[0]
    if student_hidden.dtype != lm_head_weight.dtype:
        raise LossError(f"student_hidden is {student_hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}")
    if temperature <= 0:
        raise LossError(f"temperature={temperature} must be > 0")
    if kd_weight < 0 or ce_weight < 0 or kd_weight == ce_weight == 0:
        raise LossError(f"kd_weight={kd_weight} and ce_weight={ce_weight} must be >= 0 and not both 0")
    if chunk_size < 1:
        raise LossError(f"chunk_size={chunk_size} must be >= 1")

    lead = student_hidden.shape[:-1]  # (B, T) or (N,)
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    if mask.dtype != torch.bool or mask.shape != lead:
        raise LossError(f"mask must be a bool tensor of shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}")
    hidden = student_hidden[mask]  # (N, D), differentiable gather
    N = hidden.shape[0]
    if N == 0:
        raise LossError("mask selects no positions: nothing to train on")

    def rows(x: torch.Tensor, name: str, feature_dims: int) -> torch.Tensor:
        # (lead..., F...) -> x[mask]; (N, F...) -> as is
        if x.dim() == len(lead) + feature_dims and x.shape[: len(lead)] == lead:
            return x[mask]
        if x.dim() == 1 + feature_dims and x.shape[0] == N:
            return x
        raise LossError(
            f"{name} has shape {tuple(x.shape)}: expected leading dims {tuple(lead)} (masked like the student) "
            f"or {N} rows (the already-gathered trained positions)"
        )

    if (topk_logprobs is None) != (topk_ids is None):
        raise LossError("topk_logprobs and topk_ids go together: pass both or neither")
    given = {"teacher_hidden": teacher_hidden, "teacher_logits": teacher_logits, "topk_logprobs/topk_ids": topk_ids}
    sources = [name for name, x in given.items() if x is not None]
    if len(sources) > 1:
        raise LossError(f"pass one teacher source, got {', '.join(sources)}")
    if kd_weight > 0 and not sources:
        raise LossError("kd_weight > 0 needs a teacher: teacher_hidden, teacher_logits or topk_logprobs/topk_ids")
    if teacher_weight is not None and teacher_hidden is None:
        raise LossError("teacher_weight is only used with teacher_hidden")

    teacher = None
    if teacher_hidden is not None:
        tw = lm_head_weight if teacher_weight is None else teacher_weight
        if tw.dim() != 2 or tw.shape[0] != V:
            raise LossError(f"teacher_weight must be ({V}, D), got shape {tuple(tw.shape)}")
        th = rows(teacher_hidden.detach(), "teacher_hidden", 1)
        if th.shape[1] != tw.shape[1] or th.dtype != tw.dtype:
            raise LossError(
                f"teacher_hidden ({th.shape[1]}, {th.dtype}) does not match teacher_weight ({tw.shape[1]}, {tw.dtype})"
            )
        teacher = _Teacher("hidden", th, tw.detach())
    elif teacher_logits is not None:
        tl = rows(teacher_logits.detach(), "teacher_logits", 1)
        if tl.shape[1] != V:
            raise LossError(f"teacher_logits has {tl.shape[1]} columns, the LM head has vocabulary {V}")
        teacher = _Teacher("logits", tl)
    elif topk_ids is not None:
        lp = rows(topk_logprobs.detach(), "topk_logprobs", 1)
        ids = rows(topk_ids, "topk_ids", 1)
        if lp.shape != ids.shape:
            raise LossError(f"topk_logprobs {tuple(lp.shape)} and topk_ids {tuple(ids.shape)} differ in shape")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise LossError(f"topk_ids must be integer token ids, got {ids.dtype}")
        ids = ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= V):
            raise LossError(f"topk_ids must lie in [0, {V})")
        if (ids.sort(dim=1).values.diff(dim=1) == 0).any():
            raise LossError("topk_ids repeats a token id within a row")
        teacher = _Teacher("topk", lp, ids, vocab_size=V)

    if targets is not None:
        targets = rows(targets, "targets", 0)
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise LossError(f"targets must be integer token ids, got {targets.dtype}")
        targets = targets.long()
        if targets.min() < 0 or targets.max() >= V:
            raise LossError(f"targets must lie in [0, {V}); mask out positions without a next token")
    elif ce_weight > 0:
        raise LossError("ce_weight > 0 needs targets (the true next-token ids)")

    loss, kl, ce = _ChunkedDistillLoss.apply(
        hidden, lm_head_weight, teacher, targets, float(temperature), float(kd_weight), float(ce_weight), chunk_size
    )
    return LossOutput(loss=loss, kl=kl if teacher is not None else None, ce=ce if targets is not None else None, n_tokens=N)


# ----------------------------------------------------------------------------- internals
#
# Memory discipline: per chunk, at most three (C, V) float32 buffers are alive at once. The
# chunk functions below take ownership of the logits z they are given (callers pass the
# expression, not a variable) and overwrite or drop it as soon as it is spent.


@dataclass
class _Teacher:
    kind: str  # "hidden" (a = hidden (N, D), b = weight (V, D)) | "logits" (a = (N, V)) | "topk" (a = logprobs, b = ids)
    a: torch.Tensor
    b: torch.Tensor | None = None
    vocab_size: int = 0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the scaling happens in place on our own copy, never on the caller's tensor
    return logits.to(dtype, copy=True).div_(temperature).log_softmax(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both ends (Maechler, 2012)."""
    x = x.clamp(max=0.0)  # rounding can push a log-mass a hair above 0
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _teacher_chunk(teacher: _Teacher, sl: slice, temperature: float, dtype: torch.dtype):
    """Full-vocab teacher log-probs (C, V) at T, or (topk log-probs (C, k), ids (C, k), log rest mass (C,))."""
    if teacher.kind == "topk":
        lp, ids = teacher.a[sl].to(dtype), teacher.b[sl]
        if ids.shape[1] == teacher.vocab_size:  # no rest bucket: 1 - sum p would only be rounding noise
            return lp, ids, torch.full_like(lp[:, 0], float("-inf"))
        return lp, ids, _log1mexp(lp.logsumexp(-1))
    if teacher.kind == "hidden":
        return _log_softmax(F.linear(teacher.a[sl], teacher.b), temperature, dtype)
    # A -inf logit (a banned token) gives log p = -inf; a finite floor keeps p * (log p - log q) = 0, not nan.
    return _log_softmax(teacher.a[sl], temperature, dtype).clamp_(min=torch.finfo(dtype).min)


def _chunk_losses(z, teacher, t_chunk, y, temperature):
    """Per-row KL at T and CE at 1 for one chunk of student logits z (C, V), consumed; either may be None."""
    kl = ce = None
    if y is not None:
        ce = z.logsumexp(-1) - z.gather(1, y[:, None]).squeeze(1)
    if teacher is None:
        return kl, ce
    s = z.div_(temperature).log_softmax(-1)  # (C, V) student log q at T
    del z
    if teacher.kind == "topk":
        lp, ids, log_p_rest = t_chunk
        s_top = s.gather(1, ids)  # (C, k)
        log_q_rest = s.scatter_(1, ids, float("-inf")).logsumexp(-1)  # student mass outside the k ids, exactly
        p_rest = log_p_rest.exp()
        kl = (lp.exp() * (lp - s_top)).sum(-1) + torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), 0.0)
    else:
        kl = t_chunk.exp().mul_(t_chunk.sub_(s)).sum(-1)  # p * (log p - log q); overwrites t_chunk
    return kl, ce


def _chunk_grad_logits(z, teacher, t_chunk, y, temperature, kd_scale, ce_scale):
    """d loss / d z for one chunk of student logits z (C, V), consumed:
    kd_scale * (q - p) + ce_scale * (softmax(z) - onehot(y)). teacher or y is None for a term with weight 0."""
    grad = None
    if y is not None:
        grad = z.softmax(-1)
        grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), -1.0))
        grad.mul_(ce_scale)
    if teacher is None:
        return grad
    if teacher.kind == "topk":
        # With the rest bucket the target for a token v outside the k ids is p_rest * q_v / q_rest:
        # the teacher's rest mass spread in the student's own proportions. So d KL / d(z/T) = q - p_eff.
        lp, ids, log_p_rest = t_chunk
        s = z.div_(temperature).log_softmax(-1)  # (C, V)
        del z
        q_top = s.gather(1, ids).exp()  # (C, k)
        log_q_rest = s.scatter_(1, ids, float("-inf")).logsumexp(-1)  # (C,); s is now 0 mass on the k ids
        p_rest = log_p_rest.exp()
        rest_ratio = torch.where(p_rest > 0, (log_p_rest - log_q_rest).exp(), 0.0)  # p_rest / q_rest
        g = s.exp_().mul_((1.0 - rest_ratio)[:, None])  # q_v - p_rest q_v / q_rest outside the k ids
        g.scatter_(1, ids, q_top - lp.exp())  # q_v - p_v on them
    else:
        g = z.div_(temperature).softmax(-1)  # (C, V) student q at T
        del z
        g.sub_(t_chunk.exp_())  # q - p; overwrites t_chunk
    g.mul_(kd_scale)
    return g if grad is None else grad.add_(g)


class _ChunkedDistillLoss(torch.autograd.Function):
    """(hidden (N, D), weight (V, D)) -> (loss, mean KL, mean CE), never holding more than
    (chunk_size, V) logits; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, targets, temperature, kd_weight, ce_weight, chunk_size):
        N = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        kl_sum = hidden.new_zeros((), dtype=dtype)
        ce_sum = hidden.new_zeros((), dtype=dtype)
        for start in range(0, N, chunk_size):
            sl = slice(start, start + chunk_size)
            t_chunk = _teacher_chunk(teacher, sl, temperature, dtype) if teacher is not None else None
            y = targets[sl] if targets is not None else None
            kl, ce = _chunk_losses(F.linear(hidden[sl], weight).to(dtype), teacher, t_chunk, y, temperature)
            del t_chunk
            if kl is not None:
                kl_sum += kl.sum()
            if ce is not None:
                ce_sum += ce.sum()
        kl_mean, ce_mean = kl_sum / N, ce_sum / N
        loss = kd_weight * temperature**2 * kl_mean + ce_weight * ce_mean

        ctx.save_for_backward(hidden, weight)
        ctx.teacher, ctx.targets = teacher, targets
        ctx.temperature, ctx.kd_weight, ctx.ce_weight, ctx.chunk_size = temperature, kd_weight, ce_weight, chunk_size
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return loss, kl_mean, ce_mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        hidden, weight = ctx.saved_tensors
        T = ctx.temperature
        # A term with weight 0 was only reported; it has no gradient to recompute.
        teacher = ctx.teacher if ctx.kd_weight else None
        targets = ctx.targets if ctx.ce_weight else None
        N = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        grad_loss = grad_loss.to(dtype)
        # d(T^2 KL)/dz = T^2 (q - p) / T = T (q - p); the 1/N is the mean.
        kd_scale = grad_loss * ctx.kd_weight * T / N
        ce_scale = grad_loss * ctx.ce_weight / N
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_weight else None
        for start in range(0, N, ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]  # (C, D)
            t_chunk = _teacher_chunk(teacher, sl, T, dtype) if teacher is not None else None
            y = targets[sl] if targets is not None else None
            # the chunk's logits (C, V), recomputed and handed over (no reference kept here)
            g = _chunk_grad_logits(F.linear(h, weight).to(dtype), teacher, t_chunk, y, T, kd_scale, ce_scale)
            del t_chunk  # g: (C, V) d loss / d logits
            if want_hidden:
                grad_hidden[sl] = g.to(weight.dtype) @ weight  # (C, D)
            if want_weight:
                grad_weight.addmm_(g.T, h.to(dtype))  # (V, D), accumulated in float32
            del g
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
