"""minissb.loss against direct float64 computations on small vocabularies."""

import pytest
import torch
import torch.nn.functional as F

from minissb.loss import kd_loss


def make(N=13, D=8, V=37, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    W = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    th = (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, th, y


def naive_kl_rows(student_logits, teacher_logits, T):
    """sum_v p_v (log p_v - log q_v) per row, in float64, straight from the definition."""
    logq = torch.log_softmax(student_logits.double() / T, -1)
    logp = torch.log_softmax(teacher_logits.double() / T, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def naive_loss(h, W, teacher_logits, y, T, kd_weight, ce_weight):
    """The same loss through plain autograd with full logits (teacher treated as a constant)."""
    z = h @ W.T
    return kd_weight * T**2 * naive_kl_rows(z, teacher_logits.detach(), T).mean() + ce_weight * F.cross_entropy(z, y)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_kl_matches_naive_and_scales_with_t_squared(T):
    h, W, th, _ = make()
    ref = naive_kl_rows(h @ W.T, th @ W.T, T).mean()
    online = kd_loss(h, W, teacher_hidden=th, temperature=T, chunk_size=4)
    full = kd_loss(h, W, teacher_logits=th @ W.T, temperature=T, chunk_size=4)
    for out in (online, full):
        torch.testing.assert_close(out.kl, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.loss, T**2 * ref, rtol=1e-12, atol=1e-12)
        assert out.ce is None and out.n_tokens == 13
    weighted = kd_loss(h, W, teacher_hidden=th, temperature=T, kd_weight=0.3)
    torch.testing.assert_close(weighted.loss, 0.3 * T**2 * ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_kl_nonnegative_and_zero_for_identical_models(seed):
    h, W, th, _ = make(seed=seed, scale=3.0)
    assert kd_loss(h, W, teacher_hidden=th).kl >= 0
    same = kd_loss(h, W, teacher_hidden=h.clone())
    assert same.kl.abs() < 1e-12 and same.loss.abs() < 1e-12
    same_bf16 = kd_loss(h.bfloat16(), W.bfloat16(), teacher_hidden=h.bfloat16())
    assert same_bf16.kl.abs() < 1e-6


def test_masked_positions_contribute_nothing():
    B, T, D, V = 3, 6, 8, 29
    h, W, th, y = make(N=B * T, D=D, V=V, seed=1)
    h, th, y = h.view(B, T, D), th.view(B, T, D), y.view(B, T)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[0, 0] = False
    h.requires_grad_(True)

    out = kd_loss(h, W, teacher_hidden=th, mask=mask, targets=y, ce_weight=0.5, chunk_size=4)
    assert out.n_tokens == int(mask.sum())
    # the mean runs over the masked positions only: the same loss on the gathered rows
    ref = naive_loss(h[mask], W, th[mask] @ W.T, y[mask], 2.0, 1.0, 0.5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, h)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()

    # garbage (even nan) and out-of-range targets at unmasked positions change nothing
    h2, th2, y2 = h.detach().clone(), th.clone(), y.clone()
    h2[~mask], th2[~mask], y2[~mask] = float("nan"), 1e4, -100
    out2 = kd_loss(h2, W, teacher_hidden=th2, mask=mask, targets=y2, ce_weight=0.5, chunk_size=4)
    torch.testing.assert_close(out2.loss, out.loss.detach(), rtol=0, atol=0)

    # teacher rows and targets may also come already gathered, (N, ...)
    out3 = kd_loss(h, W, teacher_hidden=th[mask], mask=mask, targets=y[mask], ce_weight=0.5)
    torch.testing.assert_close(out3.loss, out.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 13, 64])
@pytest.mark.parametrize("mode", ["online", "logits"])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, mode):
    h, W, th, y = make(N=13)
    W0 = W.clone()  # the teacher's head: a constant, even when W trains
    tl = th @ W0.T
    teacher = {
        "online": dict(teacher_hidden=th, teacher_weight=W0),
        "logits": dict(teacher_logits=tl),
    }[mode]
    h.requires_grad_(True)
    W.requires_grad_(True)
    out = kd_loss(h, W, **teacher, targets=y, ce_weight=0.25, chunk_size=chunk_size)
    ref = naive_loss(h, W, tl, y, 2.0, 1.0, 0.25)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.loss, (h, W))
    want = torch.autograd.grad(ref, (h, W))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_online_teacher_sharing_the_trained_head_gets_no_gradient():
    # In SSB the teacher is the same weights: its logits are targets, so d/dW sees only the student side.
    h, W, th, _ = make()
    W.requires_grad_(True)
    out = kd_loss(h, W, teacher_hidden=th, chunk_size=5)
    ref = naive_loss(h, W, (th @ W.T).detach(), torch.zeros(13, dtype=torch.long), 2.0, 1.0, 0.0)
    torch.testing.assert_close(torch.autograd.grad(out.loss, W)[0], torch.autograd.grad(ref, W)[0])


@pytest.mark.parametrize("mode", ["online", "logits", "ce_only"])
def test_gradcheck_float64(mode):
    h, W, th, y = make(N=5, D=4, V=9, seed=3)
    W0 = W.clone()
    tl = th @ W0.T
    kwargs = dict(targets=y, ce_weight=0.4, chunk_size=2)
    if mode == "online":
        kwargs.update(teacher_hidden=th, teacher_weight=W0)
    elif mode == "logits":
        kwargs.update(teacher_logits=tl)
    else:
        kwargs.update(kd_weight=0.0)
    h.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, W: kd_loss(h, W, **kwargs).loss, (h, W))


def test_bf16_inputs_accumulate_in_float32():
    N, D, V = 40, 64, 3001
    h, W, th, y = make(N=N, D=D, V=V, dtype=torch.bfloat16, seed=4, scale=0.5)
    h.requires_grad_(True)
    out = kd_loss(h, W, teacher_hidden=th, targets=y, ce_weight=0.5, chunk_size=16)
    assert out.loss.dtype == torch.float32 and out.kl.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.ce)
    # Reference: float64 everything after the bf16 logits (the matmul's rounding is shared by design).
    zs = F.linear(h.detach(), W).double()
    zt = F.linear(th, W).double()
    ref_kl = naive_kl_rows(zs, zt, 2.0).mean()
    torch.testing.assert_close(out.kl.double(), ref_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.ce.double(), F.cross_entropy(zs, y), rtol=1e-5, atol=1e-6)
    # ... and within bf16 logit rounding of the exact float64 loss
    h64, W64, th64 = h.detach().double(), W.double(), th.double()
    torch.testing.assert_close(out.kl.double(), naive_kl_rows(h64 @ W64.T, th64 @ W64.T, 2.0).mean(), rtol=0.03, atol=1e-3)
    (grad,) = torch.autograd.grad(out.loss, h)
    h64.requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(naive_loss(h64, W64, th64 @ W64.T, y, 2.0, 1.0, 0.5), h64)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    rel = (grad.double() - ref_grad).norm() / ref_grad.norm()
    assert rel < 0.05


def test_ce_matches_cross_entropy():
    h, W, th, y = make(seed=8)
    h.requires_grad_(True)
    out = kd_loss(h, W, targets=y, kd_weight=0.0, ce_weight=1.0, chunk_size=4)
    ref = F.cross_entropy(h @ W.T, y)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ce, ref.detach(), rtol=1e-12, atol=1e-12)
    assert out.kl is None
    torch.testing.assert_close(torch.autograd.grad(out.loss, h)[0], torch.autograd.grad(ref, h)[0])
    # CE is reported (not trained) when targets come with ce_weight = 0, KL likewise with kd_weight = 0
    both = kd_loss(h, W, teacher_hidden=th, targets=y, kd_weight=0.0, ce_weight=2.0)
    torch.testing.assert_close(both.loss, 2 * ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.kl, naive_kl_rows(h @ W.T, th @ W.T, 2.0).mean(), rtol=1e-12, atol=1e-12)


def test_weight_gets_no_gradient_unless_it_requires_it():
    h, W, th, _ = make()
    h.requires_grad_(True)
    out = kd_loss(h, W, teacher_hidden=th)
    out.loss.backward()
    assert W.grad is None and h.grad is not None
    frozen = kd_loss(h.detach(), W, teacher_hidden=th)
    assert not frozen.loss.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "needs a teacher"),
        (dict(teacher_hidden="th", teacher_logits="tl"), "one teacher source"),
        (dict(teacher_logits="tl", teacher_weight="W"), "teacher_weight goes with teacher_hidden"),
        (dict(teacher_hidden="th", ce_weight=1.0), "needs targets"),
        (dict(teacher_hidden="th", mask="bad_mask"), "mask must be bool"),
        (dict(teacher_hidden="th", mask="empty_mask"), "no positions"),
        (dict(teacher_hidden="th_short"), r"shape \(5, 8\)"),
        (dict(teacher_logits="tl_narrow"), "vocabulary"),
        (dict(teacher_hidden="th", targets="y_big"), r"targets must lie in \[0, 37\)"),
        (dict(teacher_hidden="th", temperature=0.0), "temperature"),
        (dict(teacher_hidden="th", kd_weight=0.0), "kd_weight"),
        (dict(teacher_hidden="th", chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_fails_an_assert(kwargs, match):
    h, W, th, y = make()
    tl = th @ W.T
    values = dict(
        th=th, tl=tl, W=W, th_short=th[:5], tl_narrow=tl[:, :30], y_big=y + 37,
        bad_mask=torch.ones(13), empty_mask=torch.zeros(13, dtype=torch.bool),
    )
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(AssertionError, match=match):
        kd_loss(h, W, **kwargs)
