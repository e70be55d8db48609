"""LoRA against HF PEFT on a tiny Qwen2: same logits, PEFT files both ways, merge, disable, grads."""

import json
import math
import os
import re
import stat

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from minissb import model as mm  # noqa: E402
from minissb.lora import (  # noqa: E402
    DEFAULT_TARGETS,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

TARGETS = list(DEFAULT_TARGETS)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random HF Qwen2 checkpoint (tied embeddings), with non-zero q/k/v biases."""
    cfg = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    hf.save_pretrained(path)
    # transformers 5 writes rope_theta only inside rope_parameters; state it at the top level too
    # (as real Qwen2.5 configs do) so this file tests LoRA whichever key the loader reads.
    config = json.loads((path / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def hf_model(base_dir):
    return transformers.Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def ours(base_dir, dtype=torch.float32):
    return mm.from_pretrained(base_dir, dtype=dtype)


def peft_model(base_dir, use_rslora=False):
    """PEFT LoRA with random A and B (init_lora_weights=False), so the adapter changes the logits."""
    torch.manual_seed(2)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                             init_lora_weights=False, use_rslora=use_rslora, task_type="CAUSAL_LM")
    return peft.get_peft_model(hf_model(base_dir), config).eval()


def copy_from_peft(model, pm):
    """Copy PEFT's A and B into minissb by PEFT's saved key names (which checks the naming too)."""
    state = peft.get_peft_model_state_dict(pm)
    assert len(state) == 2 * len(lora_modules(model))
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_A.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            m.lora_B.copy_(state[f"base_model.model.{name}.lora_B.weight"])


def randomize_B(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@torch.no_grad()
def logits(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_base_models_agree(base_dir, ids):
    # Everything below compares against PEFT on the HF model, so the bases must agree first.
    torch.testing.assert_close(logits(ours(base_dir), ids), logits(hf_model(base_dir), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_match_peft(base_dir, ids, use_rslora):
    pm = peft_model(base_dir, use_rslora)
    model = apply_lora(ours(base_dir), r=8, alpha=16, use_rslora=use_rslora)
    copy_from_peft(model, pm)
    assert len(lora_modules(model)) == 2 * 7
    assert lora_modules(model)[0][1].scaling == (16 / math.sqrt(8) if use_rslora else 2.0)
    expected = logits(pm, ids)
    assert (expected - logits(hf_model(base_dir), ids)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_dropout_is_on_the_branch_input_like_peft(base_dir, ids):
    # In train mode both draw the same dropout masks (same RNG, same layer order), so the
    # outputs match only if dropout sits where PEFT puts it: on x, before A.
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.3,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(2)
    pm = peft.get_peft_model(hf_model(base_dir), config).train()
    model = apply_lora(ours(base_dir), r=8, alpha=16, dropout=0.3).train()
    copy_from_peft(model, pm)
    torch.manual_seed(5)
    expected = logits(pm, ids)
    torch.manual_seed(5)
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model.eval()
    assert (logits(model, ids) - got).abs().max() > 1e-3  # dropout did something in train mode


def test_fresh_adapter_is_identity_and_A_follows_kaiming_uniform(base_dir, ids):
    base = logits(ours(base_dir), ids)
    model = apply_lora(ours(base_dir), seed=0)
    assert torch.equal(logits(model, ids), base)  # B = 0
    for name, m in lora_modules(model):
        assert m.r == 32 and m.scaling == 1.0 and m.lora_A.dtype == torch.float32
        assert torch.count_nonzero(m.lora_B) == 0
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in)
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound, name
    assert {n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)} == set(DEFAULT_TARGETS)
    a = [m.lora_A for _, m in lora_modules(apply_lora(ours(base_dir), seed=0))]
    assert all(torch.equal(x, m.lora_A) for x, (_, m) in zip(a, lora_modules(model)))  # seeded


def test_base_state_dict_keys_survive(base_dir):
    model = ours(base_dir)
    before = {k: v for k, v in model.state_dict().items()}
    apply_lora(model)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k] is not None and after[k].data_ptr() == v.data_ptr(), k  # same tensors, no copy
    extra = set(after) - set(before)
    assert extra == {f"{n}.lora_{ab}" for n, _ in lora_modules(model) for ab in "AB"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head, LoRALinear)


def test_merge_unmerge(base_dir, ids):
    model = apply_lora(ours(base_dir), r=8, alpha=16, seed=0)
    randomize_B(model)
    base_weights = {n: m.weight.clone() for n, m in lora_modules(model)}
    unmerged = logits(model, ids)
    merge_lora(model)
    merge_lora(model)  # idempotent: the delta is not added twice
    for n, m in lora_modules(model):
        torch.testing.assert_close(m.weight, base_weights[n] + m.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)  # branch not added again
    with pytest.raises(ValueError, match="unmerge_lora"):
        with adapters_disabled(model):
            pass
    unmerge_lora(model)
    for n, m in lora_modules(model):
        torch.testing.assert_close(m.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


def test_bf16_unmerge_is_within_one_ulp(base_dir):
    model = apply_lora(ours(base_dir, torch.bfloat16), r=8, alpha=16, seed=0)
    randomize_B(model)
    base_weights = {n: m.weight.clone() for n, m in lora_modules(model)}
    merge_lora(model)
    unmerge_lora(model)
    eps = torch.finfo(torch.bfloat16).eps
    for n, m in lora_modules(model):
        w0, w1, d = base_weights[n].float(), m.weight.float(), m.delta_weight()
        # Rounded twice (after +delta, after -delta): off by at most ~1 ulp of the larger value.
        assert ((w1 - w0).abs() <= eps * (w0.abs() + d.abs()) + 1e-30).all(), n
        assert m.weight.dtype == torch.bfloat16


def test_adapters_disabled_gives_base_logits(base_dir, ids):
    base = logits(ours(base_dir), ids)
    model = apply_lora(ours(base_dir), r=8, alpha=16, seed=0)
    randomize_B(model)
    student = logits(model, ids)
    assert (student - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(logits(model, ids), base)
        with adapters_disabled(model):  # nests
            pass
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), student)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), student)  # restored after an exception
    with adapters_disabled(model), pytest.raises(ValueError, match="adapters_disabled"):
        merge_lora(model)
    with adapters_disabled(ours(base_dir)):  # a model without LoRA is already the base model
        pass


def test_only_lora_parameters_train(base_dir, ids):
    model = apply_lora(ours(base_dir), r=8, alpha=16, dropout=0.1, seed=0).train()
    randomize_B(model)  # with B = 0 the gradient of A would be exactly zero
    params = lora_parameters(model)
    assert len(params) == 2 * 2 * 7
    lora_ids = {id(p) for p in params}
    model(ids).float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_save_loads_in_peft(base_dir, ids, tmp_path):
    model = apply_lora(ours(base_dir), r=8, alpha=16, use_rslora=True, seed=0)
    randomize_B(model)
    save_adapter(model, tmp_path / "adapter", base_model="tiny-qwen2")
    save_adapter(model, tmp_path / "adapter", base_model="tiny-qwen2")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert config["lora_alpha"] == 16 and config["use_rslora"] is True and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny-qwen2" and sorted(config["target_modules"]) == sorted(TARGETS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pm = peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preapplied", [False, True])
def test_peft_adapter_loads_in_minissb(base_dir, ids, tmp_path, preapplied):
    pm = peft_model(base_dir, use_rslora=True)
    pm.save_pretrained(tmp_path / "peft")
    model = ours(base_dir)
    if preapplied:
        apply_lora(model, r=8, alpha=16, use_rslora=True)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=1e-5, rtol=0)
    assert all(m.r == 8 and m.use_rslora for _, m in lora_modules(model))
    # Round trip: minissb's save of the loaded adapter is the same tensors.
    save_adapter(model, tmp_path / "again")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit_config(d, **changes):
    path = d / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(d, edit):
    path = d / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_ADAPTERS = {
    "wrong rank": (lambda d: _edit_config(d, r=4), "rank 8 but adapter_config.json says r=4"),
    "missing key": (lambda d: _edit_tensors(d, lambda t: t.pop(Q_A)), "q_proj.lora_A.weight is missing"),
    "unexpected key": (lambda d: _edit_tensors(d, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)})), "unexpected tensor"),
    "other base": (lambda d: _edit_tensors(d, lambda t: t.update({Q_A: torch.zeros(8, 96)})), "different base model"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "not lora": (lambda d: _edit_config(d, peft_type="IA3"), "peft_type is 'IA3'"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "use_dora=True is not supported"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{r: 8"), "not valid JSON"),
    "lm head target": (lambda d: _edit_config(d, target_modules=TARGETS + ["lm_head"]), "never puts LoRA on the LM head"),
    "unknown target": (lambda d: _edit_config(d, target_modules=["qkv_proj"]), "'qkv_proj' matches no layer"),
    "config is a list": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "expected a JSON object, got a list"),
    "string alpha": (lambda d: _edit_config(d, lora_alpha="16"), "lora_alpha must be a finite number, got '16'"),
    "string dropout": (lambda d: _edit_config(d, lora_dropout="0.1"), "lora_dropout must be a number in [0, 1)"),
    "truncated weights": (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:500]),
                          "adapter_model.safetensors: not a readable safetensors file"),
    "random weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8),
                       "adapter_model.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_files(base_dir, tmp_path, case):
    model = apply_lora(ours(base_dir), r=8, alpha=16, seed=0)
    save_adapter(model, tmp_path / "a")
    corrupt, message = BAD_ADAPTERS[case]
    corrupt(tmp_path / "a")
    fresh = ours(base_dir)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter(fresh, tmp_path / "a")
    assert not lora_modules(fresh)  # checked before touching the model


def test_load_into_mismatched_lora_and_bad_apply(base_dir, tmp_path):
    save_adapter(apply_lora(ours(base_dir), r=8, alpha=16, seed=0), tmp_path / "a")
    with pytest.raises(ValueError, match="r=32"):
        load_adapter(apply_lora(ours(base_dir)), tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(ours(base_dir)))
    with pytest.raises(ValueError, match="LM head"):
        apply_lora(ours(base_dir), targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_lora(ours(base_dir), targets=["mlp"])
    with pytest.raises(ValueError, match="apply_lora"):
        lora_parameters(ours(base_dir))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(ours(base_dir), tmp_path / "b")


def test_bf16_forward_close_to_float32(base_dir, ids):
    model32 = apply_lora(ours(base_dir), r=8, alpha=16, seed=0)
    randomize_B(model32)
    model16 = apply_lora(ours(base_dir, torch.bfloat16), r=8, alpha=16, seed=0)
    randomize_B(model16)
    ref = logits(model32, ids)
    out = model16(ids)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err
    merge_lora(model16)
    assert (logits(model16, ids) - ref).abs().max() / ref.abs().max() < 0.03
    unmerge_lora(model16)
    # The bf16 model trains too: gradients reach the float32 adapter weights.
    model16(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model16))


def test_saved_adapter_files_get_the_usual_mode_and_no_temporaries(base_dir, tmp_path):
    model = apply_lora(ours(base_dir), r=8, alpha=16, seed=0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".adapter_model.safetensors.x1y2.tmp").write_bytes(b"half")  # left by a killed save
    old = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "a")
    finally:
        os.umask(old)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    assert {stat.S_IMODE((tmp_path / "a" / n).stat().st_mode) for n in names} == {0o644}  # not mkstemp's 0600
