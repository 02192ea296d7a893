"""`sluice bench` refuses bad input with one sentence and exit code 2, before any load."""

from __future__ import annotations

import pytest

from sluice.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--requests", "0"], "--requests and --rounds must be at least 1"),
        (["--rounds", "0"], "--requests and --rounds must be at least 1"),
        (["--time-limit", "0"], "--time-limit must be above 0"),
        (["--sweep", "1,x"], "--sweep takes comma-separated numbers"),
        (["--sweep", "1.5,2"], "A concurrency sweep takes whole numbers"),
        (["--concurrency", "0"], "Concurrency must be at least 1"),
        (["--rate", "-1"], "The request rate must be above 0"),
        (["--rate", "5", "--burstiness", "0"], "Burstiness must be above 0"),
        (["--max-tokens", "uniform:9:1"], "--max-tokens needs 1 <= LOW <= HIGH"),
        (["--prompt-words", "lots"], "--prompt-words must be N, fixed:N or uniform"),
        (["--slo-latency", "-2"], "--slo-latency must be above 0"),
        (["--capacity-percentile", "101"], "--capacity-percentile must be within"),
        (["--url", "ftp://x"], "is not an http(s) URL"),
        (["--url", "a=http://x/v1", "--url", "a=http://y/v1"], "different NAME"),
        (["--url", "http://127.0.0.1:9/v1"], "Could not list models at http://127.0.0.1:9/v1"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
