"""Every stage, in pipeline order. The CLI makes one command of each; `run` looks them up by name."""

from __future__ import annotations

from typing import Any

from misp_dpo.pipelines.candidates import CandidatesStage
from misp_dpo.pipelines.embed import EmbedStage
from misp_dpo.pipelines.fit_clip import FitClipStage
from misp_dpo.pipelines.mine import MineStage
from misp_dpo.pipelines.report import ReportStage
from misp_dpo.pipelines.runner import Stage
from misp_dpo.pipelines.sae import SaeStage
from misp_dpo.pipelines.synth import SynthStage
from misp_dpo.pipelines.train import TrainStage

STAGES: dict[str, Stage[Any]] = {
    stage.name: stage
    for stage in (
        SynthStage(),
        FitClipStage(),
        EmbedStage(),
        CandidatesStage(),
        SaeStage(),
        MineStage(),
        ReportStage(),
        TrainStage(),
    )
}
