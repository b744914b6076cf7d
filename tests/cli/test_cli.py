"""The `mmalign` command line end to end on a tiny world and a tiny LLaVA (each step checks its output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.cli.main import app
from mmalign.data.io import read_jsonl
from mmalign.data.schema import Sample

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    invoke("world", "make", "--out", str(root / "world"), "--n", "40", "--seed", "3")
    invoke("models", "tiny", "--arch", "llava", "--out", str(root / "base"), "--image-size", "32")
    invoke(
        "sft",
        f"model={root / 'base'}",
        f"data={root / 'world' / 'sft.jsonl'}",
        f"out_dir={root / 'sft'}",
        "max_steps=4",
        "batch_size=4",
        "log_every=1",
        "progress_bar=false",
    )
    return root


def test_world_make_writes_valid_schema_records(pipeline: Path) -> None:
    records = read_jsonl(pipeline / "world" / "sft.jsonl")
    assert records and all(isinstance(r, Sample) for r in records)
    assert len({r.meta["scene"]["index"] for r in records}) == 40


def test_models_tiny_saves_safetensors_only(pipeline: Path) -> None:
    files = {p.name for p in (pipeline / "base").iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_sft_cli_applies_overrides_and_logs_each_step(pipeline: Path) -> None:
    lines = (pipeline / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (pipeline / "sft" / "final" / "model.safetensors").is_file()


def test_eval_and_report_cli_write_metrics_and_html(pipeline: Path) -> None:
    out = invoke(
        "eval",
        "--model",
        str(pipeline / "sft" / "final"),
        "--out",
        str(pipeline / "sft" / "eval"),
        "--n-scenes",
        "4",
    )
    metrics = json.loads(out[out.index("{") :])
    for key in ("chair_i", "coverage", "well_formed", "pope_adversarial_f1", "deceptive_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    saved = json.loads((pipeline / "sft" / "eval" / "world.json").read_text())
    assert saved["chair_i"] == metrics["chair_i"]
    html_path = Path(invoke("report", str(pipeline / "sft")).strip().splitlines()[-1])
    assert "data:image/png;base64," in html_path.read_text()


def test_sft_cli_reports_bad_override_clearly() -> None:
    result = runner.invoke(app, ["sft", "max_steps=ten"])
    assert result.exit_code == 2
    assert "max_steps" in result.output and "ten" in result.output


def test_world_rm_data_writes_variant_pairs_and_optionally_a_policys_corrected_samples(
    pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmalign.data.schema import PreferencePair
    from mmalign.world.pairs import task_of

    def pairs_of(path: Path) -> list[PreferencePair]:
        rows = list(read_jsonl(path))
        assert all(isinstance(r, PreferencePair) for r in rows)
        return rows  # type: ignore[return-value]

    plain = tmp_path / "plain"
    out = invoke("world", "rm-data", "--out", str(plain), "--n-train", "6", "--n-val", "3")
    train = pairs_of(plain / "train.jsonl")
    assert f"{len(train)} training pairs" in out and "policy" not in out
    assert {k for p in train for k in p.meta["kinds"]} <= {
        "true",
        "object",
        "color",
        "omit",
        "repeat",
        "object+color",
    }
    assert {task_of(p.prompt) for p in train} == {"caption"}

    wide = tmp_path / "wide"
    kinds = "true,garbled,no_background"
    invoke("world", "rm-data", "--out", str(wide), "--n-train", "8", "--n-val", "2", "--kinds", kinds,
           "--detailed-share", "1")  # fmt: skip
    train = pairs_of(wide / "train.jsonl")
    assert {task_of(p.prompt) for p in train} == {"detailed"}
    assert {k for p in train for k in p.meta["kinds"]} == set(kinds.split(","))

    # --policy: the policy's samples (here a fixed wrong caption) come back as oracle-corrected pairs
    import mmalign.rollout.generate as G

    text = "There is a large red circle in the top left. There is a small green star in the bottom right."
    monkeypatch.setattr(G, "generate", lambda model, processor, prompts, images, **kw: [text] * len(prompts))
    mixed = tmp_path / "mixed"
    out = invoke("world", "rm-data", "--out", str(mixed), "--n-train", "6", "--n-val", "3",
                 "--policy", str(pipeline / "sft" / "final"), "--samples", "2")  # fmt: skip
    files = {split: pairs_of(mixed / f"{split}.jsonl") for split in ("train", "val")}
    corrected = {s: [p for p in rows if p.source == "oracle-corrected"] for s, rows in files.items()}
    assert 0 < len(corrected["train"]) <= 6 and 0 < len(corrected["val"]) <= 3
    assert all(p.rejected == text for rows in corrected.values() for p in rows)
    assert f"(of which {len(corrected['train'])} / {len(corrected['val'])} from --policy samples)" in out
    assert len(files["train"]) - len(corrected["train"]) == len(pairs_of(plain / "train.jsonl"))
