"""Annotate-test fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def _ray_session():
    """One local Ray per test module (annotate's main starts it on first use); shut down after the module."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def job_args(lima_slice, tiny_llama_dir) -> list[str]:
    """The job the kill, signal, fault and multi-node tests run (without --output): two scorers, 8 shards."""
    return ["--input", str(lima_slice), "--model", str(tiny_llama_dir), "--scorers", "tfidf,base_loss",
            "--shard-size", "3", "--scorer-option", "base_loss.max_batch_tokens=64"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, job_args) -> Path:
    """The uninterrupted one-node output of ``job_args``, on a local Ray of its own (shut down after)."""
    import ray

    from annotate.run import main

    out = tmp_path_factory.mktemp("reference") / "out"
    assert main([*job_args, "--output", str(out)]) == 0
    ray.shutdown()
    return out
