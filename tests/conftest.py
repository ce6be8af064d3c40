"""Shared fixtures: everything tiny, offline and seeded. No test downloads anything."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from misp_dpo.log import configure_logging  # noqa: E402
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage  # noqa: E402
from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage  # noqa: E402


@pytest.fixture(autouse=True)
def _json_logs() -> None:
    configure_logging("json")


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 240-image demo corpus shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("synth") / "corpus"
    run_stage(SynthStage(), SynthConfig(out=out, n=240, seed=0), RunOptions())
    return out
