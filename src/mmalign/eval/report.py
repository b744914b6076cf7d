"""A self-contained HTML report of a run: training curves, a metrics table across stages, example captions.

``write_report(source, out_path)`` takes either a run folder or ``{stage: (metrics, curves)}``:

- a run folder is one stage when it holds ``metrics.jsonl`` or ``eval/*.json`` itself, otherwise every
  sub-folder that does is a stage (the demo layout ``out/sft``, ``out/dpo``, …);
- ``metrics`` is an eval result (``evaluate_world``'s dict: numbers, and optionally ``records`` +
  ``scenes`` for the caption examples); ``curves`` are the ``metrics.jsonl`` rows (``{"step", "loss", …}``).

Plots are PNGs drawn with matplotlib's Agg canvas (no pyplot state) and embedded as base64, so the file
opens anywhere offline. Hallucinated spans of example captions (from the world oracle) are wrapped in
``<mark class="hallucination">``. The file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmalign.atomic import atomic_write_text
from mmalign.errors import DataError
from mmalign.world.oracle import Oracle
from mmalign.world.render import render
from mmalign.world.scene import Scene

Curves = list[dict[str, Any]]
StageData = tuple[Mapping[str, Any], Curves]

STAGE_ORDER = ("base", "sft", "dpo", "ddpo", "mmdpo", "ipo", "simpo", "rm", "ppo", "rsf", "refuel")
"""Known stages in pipeline order; other stage names follow alphabetically."""

HEADLINE = (
    "chair_i",
    "chair_s",
    "coverage",
    "well_formed",
    "attribute_error",
    "sampled.chair_i",
    "sampled.chair_s",
    "sampled.coverage",
    "sampled.well_formed",
    "sampled.attribute_error",
    "pope_random_f1",
    "pope_popular_f1",
    "pope_adversarial_f1",
    "pope_adversarial_yes_ratio",
    "qa_acc",
    "deceptive_acc",
    "deceptive_acc_remedy",
)
"""Rows shown first in the metrics table (then every other metric, alphabetically)."""

HIDDEN_PREFIXES = ("greedy.",)
"""Rows left out of the table because they repeat another row (``greedy.x`` is ``x``)."""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; font-family: monospace; }
mark.hallucination { background: #f8b4b4; }
.example { display: flex; gap: 1em; align-items: center; margin: .6em 0; }
.example img { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #999; }
"""


# --------------------------------------------------------------------------------------------- loading
def _read_jsonl(path: Path) -> Curves:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"not JSON: {err.msg}", file=str(path), line=n) from None
    return rows


def _is_stage_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or any((path / "eval").glob("*.json"))


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _load_stage(path: Path) -> StageData:
    """``eval/world.json`` contributes its keys as is, any other ``eval/<name>.json`` as ``<name>.<key>``."""
    metrics: dict[str, Any] = {}
    for file in sorted((path / "eval").glob("*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        if file.stem == "world":
            metrics.update(data)
        else:
            metrics.update({f"{file.stem}.{k}": v for k, v in data.items() if _is_number(v)})
    curves = _read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    return metrics, curves


def load_stages(run_dir: str | Path) -> dict[str, StageData]:
    """The stages of a run folder (see module docstring), in pipeline order."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError("run folder does not exist", file=str(root))
    if _is_stage_dir(root):
        return {root.name: _load_stage(root)}
    names = sorted((p.name for p in root.iterdir() if p.is_dir() and _is_stage_dir(p)), key=_stage_key)
    if not names:
        raise DataError(
            "no stage found: no metrics.jsonl or eval/*.json here or in a sub-folder", file=str(root)
        )
    return {name: _load_stage(root / name) for name in names}


# --------------------------------------------------------------------------------------------- pieces
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _png_b64(image_or_figure: Any) -> str:
    buf = io.BytesIO()
    if hasattr(image_or_figure, "savefig"):
        image_or_figure.savefig(buf, format="png", dpi=100)
    else:
        image_or_figure.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def loss_figure(stages: Mapping[str, StageData]) -> Any | None:
    """One subplot per stage with its ``*loss*`` columns against ``step`` (None if no stage has a curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_curves = {
        name: [k for k in sorted({k for row in curves for k in row}) if "loss" in k]
        for name, (_, curves) in stages.items()
    }
    with_curves = {name: keys for name, keys in with_curves.items() if keys}
    if not with_curves:
        return None
    fig = Figure(figsize=(4.2 * len(with_curves), 3.2))
    FigureCanvasAgg(fig)
    for i, (name, keys) in enumerate(with_curves.items(), start=1):
        ax = fig.add_subplot(1, len(with_curves), i)
        curves = stages[name][1]
        for key in keys:
            points = [(r["step"], r[key]) for r in curves if _is_number(r.get(key)) and "step" in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def metric_rows(stages: Mapping[str, StageData]) -> list[str]:
    """Metric names for the table: headline metrics first, then the rest alphabetically."""
    present = {
        k
        for metrics, _ in stages.values()
        for k, v in metrics.items()
        if _is_number(v) and not k.startswith(HIDDEN_PREFIXES)
    }
    return [k for k in HEADLINE if k in present] + sorted(present - set(HEADLINE))


def _is_count(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name.startswith("n_") or name.endswith("_n") or name == "n"


def format_value(value: Any, key: str = "") -> str:
    """``–`` when missing, counts as integers, everything else with 4 decimals."""
    if not _is_number(value):
        return "–"
    if isinstance(value, int) or (_is_count(key) and float(value).is_integer()):
        return str(int(value))
    return f"{value:.4f}"


def metrics_table(stages: Mapping[str, StageData]) -> str:
    head = "".join(f"<th>{html.escape(s)}</th>" for s in stages)
    rows = []
    for key in metric_rows(stages):
        cells = "".join(f"<td>{format_value(m.get(key), key)}</td>" for m, _ in stages.values())
        rows.append(f'<tr data-metric="{html.escape(key)}"><td>{html.escape(key)}</td>{cells}</tr>')
    return f'<table class="metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def _merge(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        elif end > start:
            merged.append((start, end))
    return merged


def highlight(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` HTML-escaped, each (merged) character span wrapped in ``<mark class="hallucination">``."""
    out, pos = [], 0
    for start, end in _merge(spans):
        out.append(html.escape(text[pos:start]))
        out.append(f'<mark class="hallucination">{html.escape(text[start:end])}</mark>')
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def caption_examples(metrics: Mapping[str, Any], n: int = 6, oracle: Oracle | None = None) -> str:
    """Up to ``n`` greedy captions of a stage (hallucinated ones first) with their scene image."""
    records, scenes = metrics.get("records"), metrics.get("scenes")
    if not records or not scenes:
        return "<p>No caption records.</p>"
    oracle = oracle or Oracle()
    caps = [r for r in records if r.get("task") == "caption" and r.get("decoding", "greedy") == "greedy"]
    caps = sorted(caps, key=lambda r: (not r.get("hallucinated", False), r["scene"]))[:n]
    items = []
    for r in caps:
        scene = Scene.from_dict(scenes[r["scene"]])
        text = str(r["response"])
        body = highlight(text, oracle.hallucinated_spans(scene, text)) or "<i>(empty)</i>"
        image = _img(_png_b64(render(scene)), f"scene {r['scene']}")
        items.append(f'<div class="example">{image}<div>{body}</div></div>')
    return "".join(items)


# --------------------------------------------------------------------------------------------- report
def build_html(stages: Mapping[str, StageData], title: str = "mmalign report", n_examples: int = 6) -> str:
    """The whole report as one HTML string."""
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>',
        f"<body><h1>{html.escape(title)}</h1>",
        "<h2>Training loss</h2>",
    ]
    fig = loss_figure(stages)
    parts.append(_img(_png_b64(fig), "training loss per stage") if fig is not None else "<p>No curves.</p>")
    parts += [
        "<h2>Metrics</h2>",
        "<p>Held-out scenes. CHAIR is only meaningful next to coverage and the well-formedness rate "
        "(a collapsed model hallucinates nothing). Flat caption metrics are greedy decoding.</p>",
        metrics_table(stages),
        "<h2>Example captions</h2>",
    ]
    oracle = Oracle()
    for name, (metrics, _) in stages.items():
        if metrics.get("records"):
            parts.append(f"<h3>{html.escape(name)}</h3>{caption_examples(metrics, n_examples, oracle)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    source: str | Path | Mapping[str, StageData], out_path: str | Path, *, title: str = "mmalign report"
) -> Path:
    """Write the HTML report of a run folder or of ``{stage: (metrics, curves)}`` to ``out_path``."""
    stages = load_stages(source) if isinstance(source, str | Path) else dict(source)
    if not stages:
        raise DataError("no stages to report", field="source")
    text = build_html(stages, title)
    return atomic_write_text(out_path, text)
