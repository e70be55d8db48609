"""Shared pytest fixtures: tiny Qwen-style tokenizer/model dirs, and the ../shared data.

The tiny dirs are built once per session with minissb.testing; treat them as read-only
(build your own with build_tiny_model(tmp_path, ...) to change weights or files).
"""

from pathlib import Path

import pytest
import torch

from minissb.testing import build_tiny_model, build_tiny_tokenizer

# ../shared next to the repo: the real Qwen2.5 tokenizer and the dataset mirrors.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (the real Qwen2.5 tokenizer and dataset mirrors live there)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_dir) -> Path:
    path = shared_dir / "qwen2.5-tokenizer"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path}/tokenizer.json is absent")
    return path


@pytest.fixture(scope="session")
def data_dir(shared_dir) -> Path:
    path = shared_dir / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (GSM8K, MATH-500 and AIME 2024 mirrors)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """2 layers, hidden 64, 4 heads / 2 KV heads, vocab 512 (483 tokenizer ids), tied, fp32, seed 0."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use: pytestmark = pytest.mark.usefixtures("one_thread")).
    Tiny matrices gain nothing from threads, and on a busy 2-core machine every small op of a
    2-thread pool can wait a scheduler slice at its barrier: thousands of ops per test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
