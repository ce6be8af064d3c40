"""Log lines: timestamps in JSON, third-party warnings as our lines, bars that do not break lines."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import datetime

import huggingface_hub.utils
import pytest
from tqdm import tqdm

from misp_dpo.log import configure_logging, log_event


def json_lines(err: str) -> list[dict]:  # type: ignore[type-arg]
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if '"message"' in line]
    return [json.loads(line) for line in lines]


def test_json_lines_carry_a_utc_timestamp(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    log_event("hello", shard=3)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["message"] == "hello" and line["shard"] == 3 and line["time"].endswith("Z")
    assert (
        abs(
            (datetime.fromisoformat(line["time"].replace("Z", "+00:00")).timestamp())
            - __import__("time").time()
        )
        < 60
    )


def test_third_party_warnings_become_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():  # pytest records warnings itself; route them as the CLI does
        warnings.simplefilter("always")
        logging.captureWarnings(False)
        configure_logging("json")
        warnings.warn("a library is unhappy", UserWarning, stacklevel=1)
    logging.getLogger("datasets.builder").warning("a datasets warning")
    logging.getLogger("datasets.builder").info("not shown: below WARNING")
    lines = json_lines(capsys.readouterr().err)
    assert [line["logger"] for line in lines] == ["py.warnings", "datasets.builder"]
    assert "a library is unhappy" in lines[0]["message"] and all("time" in line for line in lines)
    logging.captureWarnings(False)


def test_log_lines_printed_under_a_progress_bar_stay_whole(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    bar = tqdm(total=3, file=sys.stderr, disable=False, desc="work")
    for step in range(3):
        bar.update()
        log_event("step done", step=step)
    bar.close()
    err = capsys.readouterr().err
    assert "work" in err  # the bar was drawn
    lines = [line for line in err.split("\n") if '"message"' in line]
    assert len(lines) == 3
    for step, line in enumerate(lines):
        record = json.loads(line.rsplit("\r", 1)[-1])  # the bar is cleared (\r) before the line
        assert record["step"] == step and line.rstrip().endswith("}")


def test_third_party_progress_bars_are_off_when_logs_are_json() -> None:
    """transformers' "Loading weights" bar (through huggingface_hub's switch) would break JSON lines."""
    huggingface_hub.utils.enable_progress_bars()
    try:
        configure_logging("json")
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        configure_logging("text")
        huggingface_hub.utils.enable_progress_bars()
