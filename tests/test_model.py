"""minissb.model against transformers' Qwen2ForCausalLM, plus loading and its errors."""

import json
import os
from pathlib import Path

import pytest
import torch

from minissb.model import (
    KVCache,
    Qwen2Config,
    Qwen2ForCausalLM,
    from_pretrained,
    init_weights,
    load_config,
    num_params,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1e6,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def hf_tiny(tmp_path: Path, tied: bool, shard: bool = False, seed: int = 0, rope_theta: float = 1e6):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**TINY, "rope_theta": rope_theta}, tie_word_embeddings=tied)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init, so logits are not all near zero
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    out = tmp_path / f"hf-{'tied' if tied else 'untied'}{'-sharded' if shard else ''}"
    hf.save_pretrained(out, max_shard_size="40KB" if shard else "5GB")
    return hf, out


def padded_batch(pad_side: str, lengths=(9, 5, 7), total=9, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if pad_side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("tied,shard,theta", [(True, False, 1e6), (False, False, 1e4), (True, True, 1e6)])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_logits_match_transformers_float32(tmp_path, tied, shard, theta, pad_side):
    hf, path = hf_tiny(tmp_path, tied, shard, rope_theta=theta)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    model = from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings == tied
    assert model.config.rope_theta == theta
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids, mask = padded_batch(pad_side)
    # transformers derives positions from the mask only for some paths; pass them explicitly
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert ours.shape == ref.shape
    assert (ours - ref)[real].abs().max().item() <= 1e-4
    assert torch.isfinite(ours).all()  # padded positions stay finite too


def test_each_row_of_a_padded_batch_equals_the_row_alone(tmp_path):
    _, path = hf_tiny(tmp_path, tied=True)
    model = from_pretrained(path, dtype=torch.float32)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            alone = model(ids[row, keep][None])[0]
            assert (batched[row, keep] - alone).abs().max().item() <= 1e-5


def test_bf16_close_to_transformers_float32(tmp_path):
    # bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.4%); with 2 layers the rounding of
    # weights and activations compounds to a few percent of the logit scale, so compare
    # against a bound relative to that scale and require the argmax to agree almost always.
    hf, path = hf_tiny(tmp_path, tied=False)
    model = from_pretrained(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids, mask = padded_batch("left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask).float()
    real = mask.bool()
    scale = ref[real].abs().max().item()
    assert (ours - ref)[real].abs().max().item() <= 0.05 * scale
    agree = (ours.argmax(-1) == ref.argmax(-1))[real].float().mean().item()
    assert agree >= 0.9


def test_kv_cache_decode_matches_full_forward(tmp_path):
    _, path = hf_tiny(tmp_path, tied=True)
    model = from_pretrained(path, dtype=torch.float32)
    ids, mask = padded_batch("left")
    B, T = ids.shape
    extra = torch.randint(0, 512, (B, 3), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model.config, B, T + 3, torch.float32, "cpu")
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones(B, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(full_ids, attention_mask=full_mask)
        step = [model(ids, attention_mask=mask, cache=cache, start=0)[:, -1]]
        for t in range(3):
            step.append(model(extra[:, t : t + 1], attention_mask=full_mask[:, : T + t + 1], cache=cache, start=T + t)[:, -1])
    for t in range(4):
        assert (step[t] - ref[:, T - 1 + t]).abs().max().item() <= 1e-5


# Published Qwen2.5 configs (the fields minissb reads) and their parameter counts in millions.
QWEN25 = {
    "0.5B": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 494),
    "1.5B": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 1544),
    "3B": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 3086),
    "7B": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False), 7616),
}


@pytest.mark.parametrize("size", list(QWEN25))
def test_qwen25_configs_build_with_the_published_size(tmp_path, size):
    fields, millions = QWEN25[size]
    hf_json = dict(
        fields,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=32768,
        use_sliding_window=False,
        max_window_layers=21,
        torch_dtype="bfloat16",
        rope_scaling=None,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf_json))
    cfg = load_config(tmp_path)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    assert abs(num_params(model) / 1e6 - millions) < 1.0


def test_save_and_reload_roundtrip(tmp_path):
    cfg = Qwen2Config(**TINY, tie_word_embeddings=True)
    model = init_weights(Qwen2ForCausalLM(cfg), std=0.1)
    save_pretrained(model, tmp_path / "m")
    again = from_pretrained(tmp_path / "m", dtype=torch.float32)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


# ----------------------------------------------------------------------------- bad input


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    _, path = hf_tiny(tmp_path, tied=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.(gate|up|down)_proj.weight has shape"):
        from_pretrained(path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = hf_tiny(tmp_path, tied=True)
    state = load_file(path / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight is missing"):
        from_pretrained(path)
    state["model.norm.weight"] = torch.ones(64)
    state["model.extra.weight"] = torch.ones(3)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor model.extra.weight"):
        from_pretrained(path)


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="could not get Qwen/Qwen2.5-0.5B-Instruct") as e:
        from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- real checkpoint

REAL = os.environ.get("MINISSB_REAL_MODEL")


@pytest.mark.skipif(not REAL, reason="set MINISSB_REAL_MODEL=<dir> (built by ../shared/tools/build-real-qwen.sh) to run")
def test_real_checkpoint_logits_match_transformers():
    from minissb.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(REAL)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(REAL, dtype=torch.float32).eval()
    model = from_pretrained(REAL, dtype=torch.float32)
    chats = [
        [{"role": "user", "content": "What is 17 * 23? Put the answer in \\boxed{}."}],
        [{"role": "system", "content": "You are a careful math tutor."}, {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"}],
    ]
    for chat in chats:
        ids = torch.tensor([tok.encode_chat(chat, add_generation_prompt=True)])
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
            ours = model(ids)
        assert ref.abs().max().item() > 5  # real logits, not a degenerate model
        assert (ours - ref).abs().max().item() <= 1e-3
