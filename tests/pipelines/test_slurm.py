"""Slurm submission: the exact dry-run scripts, MaxArraySize splits, afterok chains via a fake sbatch."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.cli import main
from misp_dpo.config import build_config
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.slurm import Submission, cluster_max_array_size, plan_jobs, stage_settings
from misp_dpo.pipelines.runtime.slurm_submit import prepare_submission
from misp_dpo.pipelines.stage import TaskResources
from misp_dpo.pipelines.stages import STAGES
from misp_dpo.pipelines.stages.mine import MineConfig, MineStage
from tests.helpers import clustered_unit_vectors, write_candidates, write_embeddings
from tests.pipelines.probe_stage import ProbeConfig, ProbeStage
from tests.pipelines.test_runner import digest
from tests.pipelines.toy_stage import ToyConfig, ToyStage

PIPELINE = """\
root = "{root}"
[slurm]
partition = "cpu"
account = "proj"
time = "01:00:00"
mem = "8G"
cpus_per_task = 2
max_array_size = 2
array_limit = 4
setup = "module load cuda"
extra = ["--constraint=h100"]
[slurm.synth]
partition = "gpu"
cpus_per_task = 1
gpus = 2
[synth]
out = "{{root}}/synth"
n = 12
[mine]
candidates = "{{root}}/cand"
out = "{{root}}/neg"
strategy = "random"
tasks = 3
"""


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def write_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text(PIPELINE.format(root=tmp_path / "runs"))
    return path


def expected_dry_run(t: Path) -> str:
    d = t / "runs" / "_slurm"
    head = (
        "#SBATCH --open-mode=append\n#SBATCH --partition=cpu\n#SBATCH --account=proj\n"
        "#SBATCH --cpus-per-task=2\n#SBATCH --mem=8G\n#SBATCH --time=01:00:00\n"
    )
    deps = "#SBATCH --requeue\n#SBATCH --kill-on-invalid-dep=yes\n#SBATCH --constraint=h100\n"
    merge_head = head.replace("--cpus-per-task=2", "--cpus-per-task=1").replace("01:00:00", "00:30:00")
    run = f"misp-dpo run {t}/p.toml --only"
    array = f"""#!/bin/bash
#SBATCH --job-name=misp-mine
#SBATCH --array=0-{{last}}%4
#SBATCH --output={d}/logs/%x-%A_%a.out
{head}{deps}#SBATCH --chdir={t}

set -eo pipefail
module load cuda
export MISP_DPO_TASK_OFFSET={{offset}}
export MISP_DPO_TASK_COUNT=3
exec {run} mine --executor slurm --log-format json
"""
    return f"""\
# 4 Slurm jobs; --submit writes these scripts to {d} and runs:
#   sbatch --parsable {d}/01-synth.sbatch
#   sbatch --parsable '--dependency=afterok:<01-synth>' {d}/02-mine-0.sbatch
#   sbatch --parsable '--dependency=afterok:<01-synth>' {d}/02-mine-1.sbatch
#   sbatch --parsable '--dependency=afterok:<02-mine-0>:<02-mine-1>' {d}/02-mine-merge.sbatch

# ==> {d}/01-synth.sbatch <==
#!/bin/bash
#SBATCH --job-name=misp-synth
#SBATCH --output={d}/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --cpus-per-task=1
#SBATCH --mem=8G
#SBATCH --time=01:00:00
#SBATCH --gres=gpu:2
#SBATCH --requeue
#SBATCH --constraint=h100
#SBATCH --chdir={t}

set -eo pipefail
module load cuda
exec {run} synth --executor local --log-format json

# ==> {d}/02-mine-0.sbatch <==
{array.format(last=1, offset=0)}
# ==> {d}/02-mine-1.sbatch <==
{array.format(last=0, offset=2)}
# ==> {d}/02-mine-merge.sbatch <==
#!/bin/bash
#SBATCH --job-name=misp-mine-merge
#SBATCH --output={d}/logs/%x-%j.out
{merge_head}{deps}#SBATCH --chdir={t}

set -eo pipefail
module load cuda
exec {run} mine --executor local --finalize-only --log-format json
"""


def test_dry_run_prints_the_expected_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path, monkeypatch)
    code, out, err = cli(["run", str(path), "--executor", "slurm", "--dry-run"], capsys)
    assert code == 0, err
    assert out == expected_dry_run(tmp_path)
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def fake_command(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_SBATCH = """\
n=$(( $(cat "$0.count" 2>/dev/null || echo 100) + 1 ))
echo "$n" > "$0.count"
echo "$@" >> "$0.calls"
echo "$n;cluster1"
"""


def test_submit_chains_stages_with_afterok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path, monkeypatch)
    sbatch = fake_command(tmp_path / "bin", "sbatch", FAKE_SBATCH)
    monkeypatch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    args = ["run", str(path), "--executor", "slurm", "--submit", "--slurm", "partition=big", "--workers", "2"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    d = tmp_path / "runs" / "_slurm"
    assert (sbatch.parent / "sbatch.calls").read_text().splitlines() == [
        f"--parsable {d}/01-synth.sbatch",
        f"--parsable --dependency=afterok:101 {d}/02-mine-0.sbatch",
        f"--parsable --dependency=afterok:101 {d}/02-mine-1.sbatch",
        f"--parsable --dependency=afterok:102:103 {d}/02-mine-merge.sbatch",
    ]
    assert "submitted 02-mine-merge: job 104" in out and (d / "logs").is_dir()
    script = (d / "02-mine-1.sbatch").read_text()
    assert "#SBATCH --partition=big" in script, "flags win over the TOML"
    assert script.endswith("--only mine --executor slurm --log-format json --workers 2\n")


def test_failed_sbatch_names_the_jobs_already_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path, monkeypatch)
    body = FAKE_SBATCH.replace(
        'echo "$n;cluster1"', '[ "$n" -lt 102 ] || { echo "bad qos" >&2; exit 1; }\necho $n'
    )
    sbatch = fake_command(tmp_path / "bin", "sbatch", body)
    monkeypatch.setenv("PATH", f"{sbatch.parent}{os.pathsep}{os.environ['PATH']}")
    code, _, err = cli(["run", str(path), "--executor", "slurm", "--submit"], capsys)
    assert code == 2
    assert "02-mine-0.sbatch failed: bad qos; jobs already submitted: 101" in err.splitlines()[-1]


def test_complete_stages_get_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pipeline(tmp_path, monkeypatch)
    assert cli(["run", str(path), "--until", "synth"], capsys)[0] == 0
    code, out, err = cli(["run", str(path), "--executor", "slurm", "--dry-run"], capsys)
    assert code == 0, err
    assert "01-synth" not in out and "# 3 Slurm jobs" in out
    assert f"#   sbatch --parsable {tmp_path}/runs/_slurm/02-mine-0.sbatch" in out


def test_max_array_size_comes_from_scontrol_else_slurms_default(tmp_path: Path) -> None:
    config = (
        'echo "Configuration data as of now"; echo "MaxArraySize            = 4"; echo "MaxJobCount = 10000"'
    )
    scontrol = fake_command(tmp_path / "bin", "scontrol", config)
    assert cluster_max_array_size(str(scontrol)) == 4
    assert cluster_max_array_size(str(tmp_path / "bin" / "missing")) == 1001
    broken = fake_command(tmp_path / "bin", "broken", "exit 1")
    assert cluster_max_array_size(str(broken)) == 1001


def test_arrays_split_at_max_array_size_and_gpu_stages_may_use_torchrun(tmp_path: Path) -> None:
    class Trainer(ProbeStage):
        name = "train"
        resources = TaskResources(cpus=8, gpus=1, distributed=True)

    ctx = Submission(tmp_path / "p.toml", tmp_path, tmp_path / "s", ())
    pipeline = [
        (ToyStage(), ToyConfig(out=tmp_path / "toy", tasks=2500), None),
        (Trainer(), ProbeConfig(out=tmp_path / "dpo"), None),
    ]
    settings = stage_settings({"gpus": 4}, {}, pipeline, ["toy", "train"], "p.toml")  # type: ignore[arg-type]
    jobs = plan_jobs(ctx, pipeline, settings, cluster_max=1001)  # type: ignore[arg-type]
    assert [j.name for j in jobs] == ["01-toy-0", "01-toy-1", "01-toy-2", "01-toy-merge", "02-train"]
    assert [j.after for j in jobs] == [(), (), (), ("01-toy-0", "01-toy-1", "01-toy-2"), ("01-toy-merge",)]
    arrays = [line for j in jobs for line in j.script.splitlines() if "--array=" in line or "OFFSET=" in line]
    assert arrays == [
        "#SBATCH --array=0-1000",
        "export MISP_DPO_TASK_OFFSET=0",
        "#SBATCH --array=0-1000",
        "export MISP_DPO_TASK_OFFSET=1001",
        "#SBATCH --array=0-497",
        "export MISP_DPO_TASK_OFFSET=2002",
    ]
    assert all("--gres" not in j.script for j in jobs[:4]), "a CPU stage gets no GPU"
    train = jobs[-1].script
    assert "#SBATCH --gres=gpu:4" in train and "#SBATCH --cpus-per-task=8" in train
    assert (
        "exec srun --ntasks=1 torchrun --standalone --nnodes=1 --nproc-per-node=${SLURM_GPUS_ON_NODE:-4} "
        f"--no-python misp-dpo run {tmp_path}/p.toml --only train --executor local" in train
    )


@pytest.mark.parametrize(
    ("extra", "flags", "message"),
    [
        ("", ["--submit"], "add --executor slurm"),
        (
            "",
            ["--executor", "slurm", "--dry-run", "--slurm", "bogus=1"],
            "--slurm bogus=1: expected KEY=VALUE",
        ),
        ("", ["--executor", "slurm", "--dry-run", "--slurm", "gpus=two"], "gpus takes an integer"),
        ("", ["--executor", "slurm", "--dry-run", "--overwrite"], "--overwrite with --submit"),
        ("[slurm.embedd]\ngpus = 1\n", ["--executor", "slurm", "--dry-run"], "[slurm.embedd] names no stage"),
        ("[slurm.mine]\nmem = 8\n", ["--executor", "slurm", "--dry-run"], "mem: expected str"),
    ],
)
def test_bad_submissions_fail_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: str,
    flags: list[str],
    message: str,
) -> None:
    path = write_pipeline(tmp_path, monkeypatch)
    path.write_text(path.read_text() + extra)
    code, out, err = cli(["run", str(path), *flags], capsys)
    assert code == 2 and out == ""
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.slow
def test_generated_array_scripts_run_as_slurm_would_give_the_local_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each array task of each split array, then the merge job, run by bash with Slurm's variables."""
    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(40, 8, 4, 0.3, rng)
    pair_rows = rng.integers(0, 40, size=9)
    embeddings = write_embeddings(tmp_path / "emb", images, pair_rows, images[pair_rows], images[pair_rows])
    pools = np.stack([rng.choice(np.delete(np.arange(40), row), 6, replace=False) for row in pair_rows])
    write_candidates(tmp_path / "cand", embeddings, pools, images)
    monkeypatch.chdir(tmp_path)
    command = Path(sys.executable).with_name("misp-dpo")
    path = tmp_path / "p.toml"
    path.write_text(
        f'[slurm]\nmax_array_size = 2\ncommand = "{command}"\n'
        f'[mine]\ncandidates = "{tmp_path}/cand"\nout = "{tmp_path}/slurm"\nstrategy = "random"\n'
        "negatives = 2\ntasks = 3\n"
    )
    _, jobs = prepare_submission(path, STAGES, overrides={"executor": "slurm"})
    assert [j.name for j in jobs] == ["01-mine-0", "01-mine-1", "01-mine-merge"]
    for job, size in zip(jobs, (2, 1, None), strict=True):
        script = tmp_path / f"{job.name}.sbatch"
        script.write_text(job.script)
        for task_id in range(size or 1):
            env = os.environ | {"SLURM_ARRAY_TASK_COUNT": str(size), "SLURM_ARRAY_TASK_ID": str(task_id)}
            if size is None:
                env = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
            subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=120)
    values = {"candidates": tmp_path / "cand", "out": tmp_path / "local", "strategy": "random"}
    local = build_config(MineConfig, {**values, "negatives": 2, "tasks": 3})
    assert run_stage(MineStage(), local, RunOptions()) is not None
    assert digest(tmp_path / "slurm") == digest(tmp_path / "local")
