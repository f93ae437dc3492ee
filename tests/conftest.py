"""Shared fixtures: tiny random checkpoints of real architectures, built with save_pretrained."""

import os
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# the drift guard caches each base model's reference (eval/drift.py): one fresh cache per test session, so
# a test sees what CI's fresh machine sees, never what an earlier session left in ~/.cache/posttrain
os.environ.setdefault("POSTTRAIN_CACHE", tempfile.mkdtemp(prefix="posttrain-test-cache-"))

from posttrain.models.tiny import ARCHS, build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Factory: tiny_models(arch) -> directory of a saved random checkpoint (cached per session)."""
    cache = {}

    def make(arch="qwen2", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_model(arch, d, tokenizer=tokenizer, **kw)
        return cache[key]

    return make


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
