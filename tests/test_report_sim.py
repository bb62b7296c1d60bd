"""The simulated part of docs/results.md: the paper's rows quoted from the shared file, the
sustainable rate of Fig. 16, and every figure's runs and getters well formed."""

from __future__ import annotations

import argparse
import math

import pytest

from scenarios.cli import parser
from scenarios.report_sim import FIGURES, _diff, paper_rows, render_figure, sustainable, values
from scenarios.report_sim_figures import SHARED
from scenarios.shared_prompt import output_lengths


def test_sustainable_rate_is_the_last_rate_under_the_threshold():
    xs = (0.25, 0.5, 1, 2)
    assert sustainable(xs, [47, 56, 207, 547], 100) == 0.5  # the paper's vLLM in Fig. 16
    assert sustainable(xs, [math.nan, 40, 60, 99], 100) == 2
    assert math.isnan(sustainable(xs, [120, 50, 40, 30], 100))  # over at the lowest rate
    # The paper's own numbers at 100 ms/token: Parrot 6 req/s, vLLM 0.5: its "12x".
    assert sustainable((1, 2, 4, 6, 8), [32, 35, 43, 68, 110], 100) == 6


def test_diff_is_relative_and_blank_without_both_numbers():
    assert _diff(92.0, 112.8) == "-18%"
    assert _diff(1.47, 1.38) == "+7%"
    assert _diff(math.nan, 1.0) == "-" and _diff(1.0, math.nan) == "-" and _diff(1.0, 0.0) == "-"


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/paper_figures.md")
def test_paper_rows_are_quoted_verbatim_from_the_shared_file():
    rows = paper_rows()
    assert set(rows) == {"11a", "11b", "12a", "12b", "13a", "13b", "14", "15", "16", "17", "18"}
    assert rows["12a"][2] == "1.21/1.19/1.31/1.79/2.38x"
    assert {f.figure for f in FIGURES if f.of_paper} <= set(rows)


@pytest.mark.parametrize("fig", FIGURES, ids=lambda f: f.name)
def test_every_point_parses_and_an_unrun_figure_renders(fig, tmp_path):
    for x in fig.xs:
        for flags in fig.runs(x).values():
            args = parser().parse_args(["bench", fig.scenario, *flags])
            assert args.sim  # every figure runs on simulated GPUs
    for s in fig.series:
        assert not s.paper or len(s.paper) == len(fig.xs), s.label
    assert all(math.isnan(v) for row in values(fig, [{}] * len(fig.xs)) for v in row)
    text = "\n".join(render_figure(fig, tmp_path, {}))
    assert f"{fig.figure}: {fig.title} (simulated)" in text and "Not run yet." in text


def test_output_range_draws_seeded_lengths_in_bounds():
    args = argparse.Namespace(batch=4, output_tokens=24, output_range=[183, 800])
    assert output_lengths(args, 0) == [577, 613, 224, 448]  # seeded: the same in both modes
    assert output_lengths(argparse.Namespace(batch=2, output_tokens=7, output_range=None), 0) == [
        7,
        7,
    ]
    with pytest.raises(ValueError, match="--output-range 9 3"):
        output_lengths(argparse.Namespace(batch=1, output_tokens=1, output_range=[9, 3]), 0)


def test_readme_headline_is_replaced_between_its_markers_only(tmp_path):
    from scenarios.report import HEADLINE, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{HEADLINE[0]}\nold table\n{HEADLINE[1]}\nrest\n")
    assert update_readme(readme, tmp_path / "docs")
    text = readme.read_text()
    assert text.startswith(f"intro\n{HEADLINE[0]}\nSimulated: commit -") and "old table" not in text
    assert text.endswith(f"{HEADLINE[1]}\nrest\n")
    assert "| [12b](docs/results.md#fig-fig12b) | concurrent chains" in text
    readme.write_text("no markers\n")
    assert not update_readme(readme, tmp_path / "docs") and readme.read_text() == "no markers\n"
