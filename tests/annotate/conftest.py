"""Annotate-test fixtures."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _ray_session():
    """One local Ray per test module (annotate's main starts it on first use); shut down after the module."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
