"""Every stage, in pipeline order. The CLI makes one command of each; `run` looks them up by name."""

from __future__ import annotations

from typing import Any

from misp_dpo.pipelines.stage import Stage
from misp_dpo.pipelines.stages.candidates import CandidatesStage
from misp_dpo.pipelines.stages.embed import EmbedStage
from misp_dpo.pipelines.stages.eval import EvalStage
from misp_dpo.pipelines.stages.fit_clip import FitClipStage
from misp_dpo.pipelines.stages.fit_vlm import FitVlmStage
from misp_dpo.pipelines.stages.mine import MineStage
from misp_dpo.pipelines.stages.publish import PublishStage
from misp_dpo.pipelines.stages.report import ReportStage
from misp_dpo.pipelines.stages.sae import SaeStage
from misp_dpo.pipelines.stages.synth import SynthStage
from misp_dpo.pipelines.stages.train import TrainStage

STAGES: dict[str, Stage[Any]] = {
    stage.name: stage
    for stage in (
        SynthStage(),
        FitClipStage(),
        FitVlmStage(),
        EmbedStage(),
        CandidatesStage(),
        SaeStage(),
        MineStage(),
        ReportStage(),
        PublishStage(),
        TrainStage(),
        EvalStage(),
    )
}
