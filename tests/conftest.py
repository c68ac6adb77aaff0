"""Shared test setup: hypothesis profiles, the shared data folder, and Triton's CPU interpreter.

Profiles: "ci" (the default) keeps example counts small so `make test` stays fast on 2 cores;
`HYPOTHESIS_PROFILE=thorough pytest` draws many more examples.
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton kernels run on CPU tensors through its interpreter; it must be chosen before any kernel is
# defined, so it is set here, before test modules import `kernels`. On a GPU the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Where the shared data sets live: $MINILLM_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("MINILLM_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; tests that need it skip, naming where they looked, when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: looked in {path} (set MINILLM_SHARED_DATA)")
    return path
