"""The HTML report: embedded PNG plots, exact numbers in the stage table, exact hallucination highlights."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from mmalign.errors import DataError
from mmalign.eval.report import highlight, load_stages, write_report
from mmalign.eval.runner import save_eval
from mmalign.world.corpus import eval_scenes
from mmalign.world.grammar import caption
from mmalign.world.oracle import Oracle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FALSE_TRIANGLE = "There is a large blue triangle in the top left."


def _row(html_text: str, metric: str) -> list[str]:
    m = re.search(rf'<tr data-metric="{re.escape(metric)}">(.*?)</tr>', html_text)
    assert m is not None, f"no row for {metric}"
    return re.findall(r"<td>(.*?)</td>", m.group(1))


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [
        base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    ]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A demo-style run folder: ``sft`` and ``dpo`` with curve and eval, ``world`` (not a stage)."""
    scenes = eval_scenes(2, seed=0)
    hallucinated = caption(scenes[1]) + " " + FALSE_TRIANGLE
    for stage, chair_i, losses in (("dpo", 0.0, [0.69, 0.4]), ("sft", 0.125, [3.0, 1.5, 0.8])):
        d = tmp_path / stage
        (d / "eval").mkdir(parents=True)
        rows = [{"step": 10 * (i + 1), "loss": v, "lr": 1e-3} for i, v in enumerate(losses)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = {
            "chair_i": chair_i,
            "coverage": 0.75 if stage == "sft" else 1.0,
            "well_formed": 1.0,
            "greedy.chair_i": chair_i,
            "n_scenes": 2,
            "records": [
                {
                    "task": "caption",
                    "decoding": "greedy",
                    "scene": 0,
                    "response": caption(scenes[0]),
                    "hallucinated": False,
                },
                {
                    "task": "caption",
                    "decoding": "greedy",
                    "scene": 1,
                    "response": hallucinated if stage == "sft" else caption(scenes[1]),
                    "hallucinated": stage == "sft",
                },
            ],
            "scenes": [s.to_dict() for s in scenes],
        }
        save_eval(result, d / "eval" / "world.json")
    (tmp_path / "world").mkdir()
    return tmp_path


def test_report_embeds_a_png_loss_plot_and_scene_images(run_dir: Path) -> None:
    out = write_report(run_dir, run_dir / "report.html")
    text = out.read_text()
    pngs = _embedded_pngs(text)
    assert len(pngs) == 1 + 2 + 2  # loss figure + two example scenes per stage
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "<script" not in text and 'src="http' not in text  # self-contained
    assert sorted(p.name for p in run_dir.iterdir()) == ["dpo", "report.html", "sft", "world"]  # no temp


def test_metrics_table_has_stages_in_pipeline_order_and_exact_numbers(run_dir: Path) -> None:
    text = write_report(run_dir, run_dir / "r.html").read_text()
    header = re.search(r'<table class="metrics"><tr>(.*?)</tr>', text)
    assert header is not None
    assert re.findall(r"<th>(.*?)</th>", header.group(1)) == ["metric", "sft", "dpo"]
    assert _row(text, "chair_i") == ["chair_i", "0.1250", "0.0000"]
    assert _row(text, "coverage") == ["coverage", "0.7500", "1.0000"]
    assert _row(text, "n_scenes") == ["n_scenes", "2", "2"]
    assert 'data-metric="greedy.chair_i"' not in text  # duplicate of chair_i
    rows = re.findall(r'<tr data-metric="([^"]+)">', text)
    assert rows[:3] == ["chair_i", "coverage", "well_formed"]  # headline metrics first


def test_highlight_wraps_exactly_the_hallucinated_sentence(run_dir: Path) -> None:
    scene = eval_scenes(2, seed=0)[1]
    text = caption(scene) + " " + FALSE_TRIANGLE
    spans = Oracle().hallucinated_spans(scene, text)
    assert [text[s:e] for s, e in spans] == [FALSE_TRIANGLE]
    marked = highlight(text, spans)
    assert marked == f'{caption(scene)} <mark class="hallucination">{FALSE_TRIANGLE}</mark>'
    report = write_report(run_dir, run_dir / "r.html").read_text()
    assert report.count('<mark class="hallucination">') == 1  # only sft's caption of scene 1
    assert f'<mark class="hallucination">{FALSE_TRIANGLE}</mark>' in report


def test_highlight_escapes_html_and_merges_overlapping_spans() -> None:
    assert highlight("a <b> c", [(2, 4), (3, 5)]) == 'a <mark class="hallucination">&lt;b&gt;</mark> c'
    assert highlight("abc", []) == "abc"


def test_report_from_a_dict_of_stages(tmp_path: Path) -> None:
    stages = {
        "sft": (
            {"qa_acc": 0.5, "deceptive_acc": 0.25, "pope_random_n": 66.0},
            [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
        ),
        "dpo": ({"qa_acc": 0.625}, []),
    }
    text = write_report(stages, tmp_path / "sub" / "report.html").read_text()
    assert _row(text, "qa_acc") == ["qa_acc", "0.5000", "0.6250"]
    assert _row(text, "deceptive_acc") == ["deceptive_acc", "0.2500", "–"]
    assert _row(text, "pope_random_n") == ["pope_random_n", "66", "–"]  # counts print as integers
    assert len(_embedded_pngs(text)) == 1


def test_single_run_folder_is_one_stage(run_dir: Path) -> None:
    stages = load_stages(run_dir / "sft")
    assert list(stages) == ["sft"]
    metrics, curves = stages["sft"]
    assert metrics["chair_i"] == 0.125
    assert [r["loss"] for r in curves] == [3.0, 1.5, 0.8]


def test_folder_without_stages_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no stage found"):
        write_report(tmp_path, tmp_path / "report.html")


def test_bad_metrics_line_names_file_and_line(run_dir: Path) -> None:
    with (run_dir / "sft" / "metrics.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(DataError, match=r"sft/metrics\.jsonl:4: not JSON"):
        write_report(run_dir, run_dir / "report.html")
