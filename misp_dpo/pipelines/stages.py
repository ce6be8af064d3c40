"""Every stage, in pipeline order. The CLI makes one command of each; `run` looks them up by name."""

from __future__ import annotations

from typing import Any

from misp_dpo.pipelines.runner import Stage
from misp_dpo.pipelines.synth import SynthStage

STAGES: dict[str, Stage[Any]] = {stage.name: stage for stage in (SynthStage(),)}
