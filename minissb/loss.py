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

Teacher, two ways (at most one; needed when kd_weight > 0):
- online: teacher_hidden (N, D), the teacher's final hidden states at the same positions
  (computed now, or captured to disk earlier); its logits are computed per chunk with
  teacher_weight (default: the student's LM head, as in SSB, where teacher = the same
  weights with the adapter off).
- full logits: teacher_logits (N, V).

Inputs come from minissb's own code, already checked: kd_loss asserts its invariants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar float32: kd_weight * T^2 * kl + ce_weight * ce; call .backward() on it
    kl: torch.Tensor | None  # mean KL(teacher || student) per token at T, in nats, before T^2; detached
    ce: torch.Tensor | None  # mean cross-entropy per token at T = 1 on the targets; detached
    n_tokens: int  # number of positions the means run over


# ----------------------------------------------------------------------------- the loss


def kd_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 2.0, kd_weight: float = 1.0, ce_weight: float = 0.0, chunk_size: int = 256,
) -> LossOutput:
    """Chunked KD (+ optional CE) loss from final hidden states; see the module docstring.

    student_hidden: (B, T, D) or (N, D) final normed hidden states; lm_head_weight: (V, D).
    mask: bool, student_hidden.shape[:-1], True at a trained position (None: all); the means
    run over its N rows. Teacher tensors and targets (int next-token ids, needed when
    ce_weight > 0) have the student's leading shape (the mask selects their rows) or are the
    N selected rows already, in order: aligning teacher and student positions (the teacher's
    prompt is longer) is the caller's job. No gradient flows into teacher inputs.
    """
    lead, V = student_hidden.shape[:-1], lm_head_weight.shape[0]
    assert len(lead) in (1, 2) and lm_head_weight.shape[1:] == student_hidden.shape[-1:], (
        f"student_hidden {tuple(student_hidden.shape)} must be (B, T, D) or (N, D), lm_head_weight (V, D), "
        f"got {tuple(lm_head_weight.shape)}")
    assert student_hidden.dtype == lm_head_weight.dtype, f"{student_hidden.dtype} hidden, {lm_head_weight.dtype} head"
    assert temperature > 0 and chunk_size >= 1 and min(kd_weight, ce_weight) >= 0 and kd_weight + ce_weight > 0, (
        f"temperature {temperature}, chunk_size {chunk_size}, kd_weight {kd_weight}, ce_weight {ce_weight}")
    assert teacher_hidden is None or teacher_logits is None, "one teacher source: teacher_hidden or teacher_logits"
    assert kd_weight == 0 or teacher_hidden is not None or teacher_logits is not None, "kd_weight > 0 needs a teacher"
    assert teacher_weight is None or teacher_hidden is not None, "teacher_weight goes with teacher_hidden"
    assert ce_weight == 0 or targets is not None, "ce_weight > 0 needs targets (the true next-token ids)"
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    assert mask.dtype == torch.bool and mask.shape == lead, f"mask must be bool {tuple(lead)}, got {mask.dtype} {mask.shape}"
    hidden = student_hidden[mask]  # (N, D), differentiable gather
    N = hidden.shape[0]
    assert N > 0, "mask selects no positions: nothing to train on"

    def rows(x: torch.Tensor, feature_dims: int) -> torch.Tensor:
        # (lead..., F...) -> x[mask]; (N, F...) -> as is
        if x.dim() == len(lead) + feature_dims and x.shape[: len(lead)] == lead:
            return x[mask]
        assert x.dim() == 1 + feature_dims and x.shape[0] == N, f"shape {tuple(x.shape)}: want {tuple(lead)} or {N} rows"
        return x

    teacher = None
    if teacher_hidden is not None:
        tw = (lm_head_weight if teacher_weight is None else teacher_weight).detach()
        th = rows(teacher_hidden.detach(), 1)
        assert tw.shape[0] == V and th.shape[1] == tw.shape[1] and th.dtype == tw.dtype, (
            f"teacher_hidden {tuple(th.shape)} {th.dtype} does not fit teacher_weight {tuple(tw.shape)} {tw.dtype}")
        teacher = _Teacher(th, tw)
    elif teacher_logits is not None:
        teacher = _Teacher(rows(teacher_logits.detach(), 1))
        assert teacher.rows.shape[1] == V, f"teacher_logits has {teacher.rows.shape[1]} columns, vocabulary {V}"
    if targets is not None:
        targets = rows(targets, 0).long()
        assert 0 <= targets.min() and targets.max() < V, f"targets must lie in [0, {V}): mask out positions without one"

    loss, kl, ce = _ChunkedDistillLoss.apply(hidden, lm_head_weight, teacher, targets, float(temperature),
                                             float(kd_weight), float(ce_weight), chunk_size)
    return LossOutput(loss=loss, kl=kl if teacher is not None else None, ce=ce if targets is not None else None, n_tokens=N)


# ----------------------------------------------------------------------------- internals
#
# Memory discipline: per chunk, at most three (C, V) float32 buffers are alive at once. The
# chunk functions below take ownership of the logits z they are given (callers pass the
# expression, not a variable) and overwrite or drop it as soon as it is spent.


@dataclass
class _Teacher:
    rows: torch.Tensor  # (N, D) hidden states, with weight (V, D); or (N, V) logits, weight None
    weight: torch.Tensor | None = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    # copy=True: the scaling happens in place on our own copy, never on the caller's tensor
    return logits.to(dtype, copy=True).div_(temperature).log_softmax(-1)


def _teacher_chunk(teacher: _Teacher, sl: slice, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's log-probs (C, V) at T for rows sl."""
    if teacher.weight is not None:
        return _log_softmax(F.linear(teacher.rows[sl], teacher.weight), temperature, dtype)
    # A -inf logit (a banned token) gives log p = -inf; a finite floor keeps p * (log p - log q) = 0, not nan.
    return _log_softmax(teacher.rows[sl], temperature, dtype).clamp_(min=torch.finfo(dtype).min)


def _chunk_losses(z, t_chunk, y, temperature):
    """Per-row KL at T and CE at 1 for one chunk of student logits z (C, V), consumed; None where
    t_chunk (the teacher's log-probs, consumed) or y (the targets) is None."""
    kl = ce = None
    if y is not None:
        ce = z.logsumexp(-1) - z.gather(1, y[:, None]).squeeze(1)
    if t_chunk is None:
        return kl, ce
    s = z.div_(temperature).log_softmax(-1)  # (C, V) student log q at T
    del z
    kl = t_chunk.exp().mul_(t_chunk.sub_(s)).sum(-1)  # p * (log p - log q); overwrites t_chunk
    return kl, ce


def _chunk_grad_logits(z, t_chunk, y, temperature, kd_scale, ce_scale):
    """d loss / d z for one chunk of student logits z (C, V), consumed:
    kd_scale * (q - p) + ce_scale * (softmax(z) - onehot(y)). t_chunk or y is None for a term with weight 0."""
    grad = None
    if y is not None:
        grad = z.softmax(-1)
        grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), -1.0))
        grad.mul_(ce_scale)
    if t_chunk is None:
        return grad
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
            kl, ce = _chunk_losses(F.linear(hidden[sl], weight).to(dtype), t_chunk, y, temperature)
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
            g = _chunk_grad_logits(F.linear(h, weight).to(dtype), t_chunk, y, T, kd_scale, ce_scale)
            del t_chunk  # g: (C, V) d loss / d logits
            if want_hidden:
                grad_hidden[sl] = g.to(weight.dtype) @ weight  # (C, D)
            if want_weight:
                grad_weight.addmm_(g.T, h.to(dtype))  # (V, D), accumulated in float32
            del g
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None
