"""The command line: help texts, `serve`, and the same examples giving the same output
embedded and through `--url`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from parrot_actors import cli

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
