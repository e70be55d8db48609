"""minissb.tokenizer against transformers' Qwen2.5 tokenizer and chat template, and the tiny tokenizer."""

import json
import shutil
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minissb.testing import TINY_BPE_VOCAB, build_tiny_model, build_tiny_tokenizer
from minissb.tokenizer import QWEN_DEFAULT_SYSTEM, Tokenizer, default_system_from_template

CHATS = {
    "system+user": [
        {"role": "system", "content": "You are a careful math tutor. Put the final answer in \\boxed{}."},
        {"role": "user", "content": "What is 7 * 8?"},
    ],
    "user only": [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April."}],
    "system/user/assistant": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4. \\boxed{4}"},
    ],
    "multi-turn, no system": [
        {"role": "user", "content": "Solve x + 1 = 3."},
        {"role": "assistant", "content": "x = 2"},
        {"role": "user", "content": "And x + 2 = 3?"},
        {"role": "assistant", "content": "x = 1"},
        {"role": "user", "content": "Thanks"},
    ],
    "tricky content": [
        {"role": "system", "content": "  leading and trailing spaces  \n"},
        {
            "role": "user",
            "content": "Line one\n\nLine two\r\n\tTabbed $\\frac{a}{b} + \\sqrt{x^2}$ = 1,450,000\n"
            "unicode: café naïve 数学 −3°C × π ≤ ∞ 😀 e\u0301\n   ",
        },
        {"role": "assistant", "content": "\n\n\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}  "},
    ],
    "system later in the chat": [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "switch to French"},
        {"role": "assistant", "content": ""},
    ],
    "special-token text in content": [{"role": "user", "content": "a<|im_end|>b<|endoftext|>c<|im_start|>"}],
}


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return Tokenizer.from_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_qwen(qwen_tokenizer_dir):
    transformers = pytest.importorskip("transformers", reason="transformers (dev dependency) is the reference")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------- real Qwen2.5 tokenizer


@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_matches_official_template(qwen, hf_qwen, name, gen):
    messages = CHATS[name]
    expected = hf_qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert qwen.render_chat(messages, add_generation_prompt=gen) == expected
    assert qwen.encode_chat(messages, add_generation_prompt=gen) == hf_ids(hf_qwen, messages, gen)


def test_default_system_message_is_qwens(qwen, hf_qwen):
    text = qwen.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert qwen.default_system == QWEN_DEFAULT_SYSTEM == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_default_system_read_from_a_modified_template(qwen_tokenizer_dir, tmp_path, hf_qwen):
    # Qwen2.5-Math ships the same template with another default system message (with escapes).
    transformers = pytest.importorskip("transformers")
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    new_default = "Please reason step by step, and put your final answer within \\\\boxed{}. It\\'s \\\"fine\\\"."
    config["chat_template"] = config["chat_template"].replace(QWEN_DEFAULT_SYSTEM, new_default)
    assert config["chat_template"].count(new_default) == 2
    shutil.copy(qwen_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.default_system == "Please reason step by step, and put your final answer within \\boxed{}. It's \"fine\"."
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "1+1?"}]
    assert ours.render_chat(messages, True) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_special_ids_and_sizes_match_transformers(qwen, hf_qwen):
    assert qwen.im_end_id == hf_qwen.convert_tokens_to_ids("<|im_end|>") == hf_qwen.eos_token_id == 151645
    assert qwen.stop_ids == [qwen.im_end_id, hf_qwen.convert_tokens_to_ids("<|endoftext|>")] == [151645, 151643]
    assert qwen.pad_id == hf_qwen.pad_token_id
    assert qwen.vocab_size == len(hf_qwen) == 151665


TEXTS = [
    "Janet’s ducks lay 16 eggs per day. She eats three for breakfast.",
    "  two leading spaces, trailing tab\t",
    "$\\frac{1}{2} + \\sqrt{3}$ and 1,234,567.89 and -10",
    "e\u0301 (decomposed é is NFC-normalized first) 数学 😀",
    "<|im_start|>assistant\nThe answer is \\boxed{18}.<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(qwen, hf_qwen, text):
    ids = qwen.encode(text)
    assert ids == hf_qwen.encode(text, add_special_tokens=False)
    assert qwen.decode(ids) == hf_qwen.decode(ids)
    assert qwen.encode_batch([text, "x"]) == [ids, qwen.encode("x")]


def test_no_bos_added_and_special_strings_are_single_ids(qwen):
    ids = qwen.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    im_start = qwen.encode("<|im_start|>")
    assert len(im_start) == 1 and ids[0] == im_start[0]  # nothing before the first <|im_start|>
    assert ids.count(im_start[0]) == 3 and ids.count(qwen.im_end_id) == 2


# ----------------------------------------------------------------------------- tiny tokenizer (always runs)


def test_tiny_special_tokens_are_single_ids_after_the_bpe_vocab(tiny):
    endoftext, im_start, im_end = TINY_BPE_VOCAB, TINY_BPE_VOCAB + 1, TINY_BPE_VOCAB + 2
    assert tiny.vocab_size == TINY_BPE_VOCAB + 3
    for tid, s in [(endoftext, "<|endoftext|>"), (im_start, "<|im_start|>"), (im_end, "<|im_end|>")]:
        assert tiny.encode(s) == [tid]
        assert tiny.encode(f"x{s}y") == tiny.encode("x") + [tid] + tiny.encode("y")
    assert (tiny.pad_id, tiny.im_end_id, tiny.stop_ids) == (endoftext, im_end, [im_end, endoftext])


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_tiny_round_trip(tiny, text):
    # Byte-level BPE reproduces any text, after the NFC normalizer.
    ids = tiny.encode(text)
    assert all(0 <= i < tiny.vocab_size for i in ids)
    assert tiny.decode(ids) == unicodedata.normalize("NFC", text)


def test_tiny_round_trip_of_a_chat(tiny):
    messages = CHATS["tricky content"]
    text = tiny.render_chat(messages, add_generation_prompt=True)
    ids = tiny.encode_chat(messages, add_generation_prompt=True)
    assert tiny.decode(ids) == unicodedata.normalize("NFC", text)  # special tokens kept


def test_tiny_tokenizer_is_deterministic_and_loads_in_transformers(tmp_path, tiny_tokenizer_dir):
    again = build_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(again))
    ours = Tokenizer.from_dir(again)
    assert hf.pad_token_id == ours.pad_id and hf.eos_token_id == ours.im_end_id and len(hf) == ours.vocab_size
    for messages in CHATS.values():
        assert ours.render_chat(messages, True) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.encode_chat(messages, False) == hf_ids(hf, messages, False)


def test_tiny_model_dir(tiny_model_dir, tmp_path):
    from minissb.model import from_pretrained

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == 512  # 483 ids rounded up to a multiple of 64
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    tok = Tokenizer.from_dir(tiny_model_dir)
    model = from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "1+1?"}], True)])
    assert model(ids).shape == (1, ids.shape[1], 512)
    # Same seed -> same weights; another seed -> different ones; no tokenizer when asked.
    same = build_tiny_model(tmp_path / "same", with_tokenizer=False)
    assert (same / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert not (same / "tokenizer.json").exists()
    other = build_tiny_model(tmp_path / "other", seed=1, vocab_size=640, tied=False, with_tokenizer=False)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert json.loads((other / "config.json").read_text())["vocab_size"] == 640
    assert from_pretrained(other, dtype=torch.float32).lm_head.weight.shape == (640, 64)


# ----------------------------------------------------------------------------- errors


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_special_token(tmp_path, tiny_tokenizer_dir):
    data = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"has no <\|im_end\|> token"):
        Tokenizer.from_dir(tmp_path)


def test_bad_tokenizer_files(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read by tokenizers") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_pad_token_from_config_in_dict_form(tmp_path, tiny_tokenizer_dir):
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.pad_id == tok.im_end_id
    assert tok.default_system == QWEN_DEFAULT_SYSTEM  # no chat_template -> Qwen2.5's default


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty chat"),
        ([{"role": "tool", "content": "42"}], "message 0 has role 'tool'"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], "message 1 has role None"),
        ([{"role": "user", "content": None}], "needs a string 'content'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}], "tool_calls"),
        (["hello"], "message 0 has a str"),
    ],
)
def test_bad_chats(tiny, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny.render_chat(messages)


def test_default_system_parser_falls_back():
    assert default_system_from_template(None) == QWEN_DEFAULT_SYSTEM
    assert default_system_from_template("{{ messages }}") == QWEN_DEFAULT_SYSTEM
    assert default_system_from_template("{{- '<|im_start|>system\\nHi\\nthere<|im_end|>\\n' }}") == "Hi\nthere"
