"""The command line: help texts, `serve`, and the same examples giving the same output
embedded and through `--url`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from parrot_actors import cli
from parrot_actors import demo_compare as dc
from parrot_actors.messages import EngineStats
from parrot_actors.runtime import RuntimeStats
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def cli_run(*args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "parrot_actors.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_help_explains_each_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "run the HTTP service" in text
    assert "run the main job (WriteSnakeGame and a map-reduce summary)" in text
    assert "run the `async def main()` of APP.py" in text
    for command, words in [
        ("serve", ["--engines", "--port", "--model", "/metrics"]),
        ("demo", ["--url", "--document"]),
        ("run", ["APP.py", "--url", "after `--`"]),
    ]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (command, text)


def test_engine_flags_reach_the_engine_config():
    args = cli.build_parser().parse_args(["serve", "--engines", "2", "--dtype", "int8"])
    configs = cli.engine_specs(args)
    assert [(c.name, c.dtype, c.compile) for c in configs] == [
        ("engine0", "int8", None),
        ("engine1", "int8", None),
    ]
    for flag, setting in (("--compile", True), ("--no-compile", False)):
        args = cli.build_parser().parse_args(["serve", flag])
        assert [(c.dtype, c.compile) for c in cli.engine_specs(args)] == [("float32", setting)]


def test_run_needs_an_async_main(tmp_path):
    app = tmp_path / "app.py"
    app.write_text("def main():\n    pass\n")
    with pytest.raises(SystemExit, match="has no `async def main\\(\\)`"):
        cli.main(["run", str(app), "--model", "echo"])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["run", str(tmp_path / "missing.py")])


@pytest.fixture(scope="module")
def served():
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot_actors.cli", "serve", "--model", "echo", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline()
    assert line.startswith("parrot-actors serving on http://127.0.0.1:"), proc.stderr.read()
    yield proc, line.split()[-1]
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize(
    "example,args",
    [("snake_game.py", []), ("map_reduce.py", ["--", "", "2", "20"])],
)
def test_examples_print_the_same_embedded_and_remote(served, example, args):
    _, url = served
    app = str(ROOT / "examples" / example)
    embedded = cli_run("run", app, "--model", "echo", *args)
    remote = cli_run("run", app, "--url", url, *args)
    assert remote == embedded
    assert "echo(" in remote


def test_demo_and_openai_example_against_the_service_then_ctrl_c(served):
    proc, url = served
    out = cli_run("demo", "--url", url, "--chunks", "2", "--words", "20")
    assert f"Connecting to the service at {url}" in out
    assert "=== WriteSnakeGame ===" in out and "  map 1: echo(" in out
    assert "stats: calls=" in out
    chat = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "openai_chat.py"), "--url", url, "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    first, usage, streamed = chat.stdout.splitlines()[:3]
    prompt = "<user>hi</user><assistant>"  # EchoEngine's chat frame; characters are tokens
    reply = f"echo({prompt[-12:]})"
    assert first == f"[echo] {reply}" and streamed == reply
    assert usage == f"usage: {len(prompt)} prompt + {len(reply)} completion"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0


def test_sim_flags_make_simulated_engines():
    args = cli.build_parser().parse_args(
        ["serve", "--sim", "a100", "--sim-model", "llama-3-8b", "--engines", "2", "--sim-tp", "2"]
    )
    configs = cli.engine_specs(args)
    assert [(c.name, c.device) for c in configs] == [("engine0", "sim"), ("engine1", "sim")]
    sim = configs[0].sim
    assert sim is not None
    assert (sim.gpu, sim.model, sim.tensor_parallel) == ("a100", "llama-3-8b", 2)


def _totals(calls: int, prefill: int, reused: int, generated: int) -> RuntimeStats:
    return RuntimeStats(
        prefill_tokens=prefill,
        reused_tokens=reused,
        generated_tokens=generated,
        calls_completed=calls,
        calls_failed=0,
        engines={},
    )


def test_run_numbers_are_differences_and_lines_show_them():
    parrot = dc.run_numbers(_totals(2, 100, 0, 40), _totals(7, 1136, 412, 450), 2.5)
    assert parrot == dc.RunNumbers(
        seconds=2.5, calls=5, prefill_tokens=1036, reused_tokens=412, generated_tokens=410
    )
    baseline = dc.RunNumbers(
        seconds=5.0, calls=5, prefill_tokens=1448, reused_tokens=0, generated_tokens=410
    )
    assert dc.speedup(parrot, baseline) == 2.0
    assert dc.comparison_line("Map-reduce", parrot, baseline) == (
        "Map-reduce: Parrot 2.50s (prefill 1036 computed / 412 reused) | request-level 5.00s "
        "(prefill 1448 computed / 0 reused) | speedup 2.00x"
    )
    zero = dc.RunNumbers(
        seconds=0.0, calls=0, prefill_tokens=0, reused_tokens=0, generated_tokens=0
    )
    assert dc.speedup(zero, baseline) is None
    header, snake, summary = dc.comparison_lines(
        [("Snake", zero, baseline), ("Map-reduce", parrot, baseline)]
    )
    assert header.startswith("Parrot vs request-level on the same engine (FCFS")
    assert snake.startswith("  Snake:      Parrot 0.00s") and snake.endswith("speedup n/a")
    assert summary.startswith("  Map-reduce: Parrot 2.50s")


def test_engine_summary_is_one_readable_line():
    stats = EngineStats(
        name="engine0",
        prefill_tokens=1036,
        reused_tokens=412,
        generated_tokens=310,
        steps=57,
        mean_batch_size=2.5,
        kv_blocks_peak=12,
        kv_blocks_total=512,
    )
    assert dc.engine_summary(stats, 3) == (
        "engine0: 3 calls, prefill 1036 computed / 412 reused tokens, 310 generated, 57 steps "
        "(mean batch 2.50), KV 12/512 blocks peak"
    )
    bad = EngineStats(name="e1", steps=1, preemptions=2, restarts=1, healthy=False, last_error="x")
    assert dc.engine_summary(bad, 1) == (
        "e1: 1 call, prefill 0 computed / 0 reused tokens, 0 generated, 1 steps "
        "(mean batch 0.00), KV 0/0 blocks peak, 2 preemptions, 1 restarts, unhealthy (x)"
    )


LINE = re.compile(
    r"  (WriteSnakeGame|Map-reduce summary): +Parrot (\d+\.\d\d)s "
    r"\(prefill (\d+) computed / (\d+) reused\) \| request-level (\d+\.\d\d)s "
    r"\(prefill (\d+) computed / (\d+) reused\) \| speedup (\d+\.\d\d)x"
)


async def test_demo_compares_with_the_request_level_run_on_a_tiny_model(capsys):
    args = cli.build_parser().parse_args(
        ["demo", "--random-model", json.dumps(TINY), "--chunks", "2", "--words", "20"]
    )
    await cli.demo(args)
    lines = capsys.readouterr().out.splitlines()
    rows = {m[1]: m for m in map(LINE.fullmatch, lines) if m}
    assert set(rows) == {"WriteSnakeGame", "Map-reduce summary"}
    for m in rows.values():
        parrot_computed, baseline_computed = int(m[3]), int(m[6])
        assert parrot_computed > 0 and baseline_computed > 0
        assert int(m[7]) == 0  # the baseline forks nothing and the engine caches no blocks
    summaries = [x for x in lines if x.startswith("  engine0: ")]  # 2 + 2 maps + 1 reduce
    assert len(summaries) == 1
    assert re.fullmatch(
        r"  engine0: 5 calls, prefill \d+ computed / \d+ reused tokens, \d+ generated, "
        r"\d+ steps \(mean batch \d+\.\d\d\), KV \d+/\d+ blocks peak",
        summaries[0],
    ), summaries[0]
    assert not any("EngineStats(" in x for x in lines)
