"""Config system: YAML + dotted overrides, type coercion, error messages, docs, dump/load round trip."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmalign.config import config_to_dict, describe_config, dump_config, field_docs, load_config
from mmalign.errors import ConfigError
from mmalign.recipes.sft import CONFIG_DIR, SFTConfig


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Optim:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""


@dataclass
class Adapter:
    r: int = 8
    """Rank."""


@dataclass
class Cfg:
    name: str = "run"
    """Name of the run,
    on two lines."""
    steps: int = 10
    """Optimiser steps."""
    use_bf16: bool = False
    limit: int | None = None
    """Optional cap."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    mode: Mode = Mode.FAST
    layers: list[int] = field(default_factory=lambda: [1, 2])
    weights: dict[str, float] = field(default_factory=dict)
    path: Path = Path("out")
    optim: Optim = field(default_factory=Optim)
    adapter: Adapter | None = None


@dataclass
class Required:
    data: str
    """Where the data is."""
    n: int = 1


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_when_no_file_and_no_overrides() -> None:
    assert load_config(Cfg) == Cfg()


def test_yaml_values_are_applied_and_nested_sections_merge_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 5\noptim:\n  lr: 1e-4\nmode: slow\nlayers: [3, 4, 5]\nweights: {a: 1}\n")
    cfg = load_config(Cfg, path)
    assert cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(1e-4)  # PyYAML reads `1e-4` as a string: coerced to float
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.mode is Mode.SLOW
    assert cfg.layers == [3, 4, 5]
    assert cfg.weights == {"a": 1.0} and isinstance(cfg.weights["a"], float)


def test_overrides_coerce_every_supported_type() -> None:
    cfg = load_config(
        Cfg,
        overrides=[
            "steps=7",
            "use_bf16=true",
            "limit=3",
            "dtype=bf16",
            "mode=SLOW",
            "layers=4,5",
            "path=/tmp/x",
            "optim.lr=3e-4",
            "optim.betas=[0.5, 0.6]",
            "name=hello world",
        ],
    )
    assert (cfg.steps, cfg.use_bf16, cfg.limit, cfg.dtype, cfg.mode) == (7, True, 3, "bf16", Mode.SLOW)
    assert cfg.layers == [4, 5]
    assert cfg.path == Path("/tmp/x")
    assert cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.5, 0.6)
    assert cfg.name == "hello world"


def test_overrides_win_over_yaml_and_later_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 5\nlimit: 9\n")
    cfg = load_config(Cfg, path, ["steps=6", "steps=8", "limit=null"])
    assert cfg.steps == 8
    assert cfg.limit is None


def test_optional_section_is_created_by_a_dotted_override_and_removed_by_null(tmp_path: Path) -> None:
    assert load_config(Cfg, overrides=["adapter.r=4"]).adapter == Adapter(r=4)
    path = write(tmp_path, "adapter:\n  r: 16\n")
    assert load_config(Cfg, path).adapter == Adapter(r=16)
    assert load_config(Cfg, path, ["adapter=null"]).adapter is None


def test_bad_value_in_yaml_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 3\noptim:\n  lr: abc\n", name="sft.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, path)
    assert str(err.value) == f"{path}:3: optim.lr: expected float, got 'abc'"


def test_bad_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^override: steps: expected int, got 'ten'$"):
        load_config(Cfg, overrides=["steps=ten"])
    with pytest.raises(ConfigError, match=r"dtype: expected one of 'fp32', 'bf16', got 'fp16'"):
        load_config(Cfg, overrides=["dtype=fp16"])
    with pytest.raises(ConfigError, match=r"use_bf16: expected bool, got 'maybe'"):
        load_config(Cfg, overrides=["use_bf16=maybe"])
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'null'"):
        load_config(Cfg, overrides=["steps=null"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(Cfg, overrides=["steps"])


def test_unknown_keys_are_errors_naming_file_and_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 0.1\n  momentum: 0.9\n", name="sft.yaml")
    with pytest.raises(
        ConfigError, match=r"sft\.yaml:3: optim\.momentum: unknown key \(known keys: betas, lr\)"
    ):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match=r"^override: stepz: unknown key"):
        load_config(Cfg, overrides=["stepz=1"])


def test_yaml_bool_for_an_int_field_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml:1: steps: expected int, got True"):
        load_config(Cfg, write(tmp_path, "steps: true\n"))


def test_missing_required_key_and_invalid_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data: missing required key"):
        load_config(Required)
    assert load_config(Required, overrides=["data=x.jsonl"]).data == "x.jsonl"
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2: invalid YAML"):
        load_config(Cfg, write(tmp_path, "steps: 1\n  bad: [\n"))
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(Cfg, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_post_init_validation_errors_become_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim: warmup_ratio must be in \[0, 1\), got 1.5"):
        load_config(SFTConfig, overrides=["optim.warmup_ratio=1.5"])


def test_dump_then_load_gives_an_equal_config(tmp_path: Path) -> None:
    cfg = load_config(Cfg, overrides=["mode=slow", "adapter.r=2", "limit=4", "weights={b: 0.5}"])
    path = dump_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(Cfg, path) == cfg
    assert config_to_dict(cfg)["mode"] == "slow"
    assert config_to_dict(cfg)["optim"] == {"lr": 1e-3, "betas": [0.9, 0.999]}
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_field_docs_come_from_attribute_docstrings_including_nested_sections() -> None:
    docs = field_docs(Cfg)
    assert docs["name"] == "Name of the run,\non two lines."
    assert docs["steps"] == "Optimiser steps."
    assert docs["optim.lr"] == "Peak learning rate."
    assert docs["adapter.r"] == "Rank."
    assert "use_bf16" not in docs  # no docstring


def test_describe_config_flattens_sections_with_types_and_defaults() -> None:
    info = {f.key: f for f in describe_config(Cfg)}
    assert info["optim.lr"].type == "float" and info["optim.lr"].default == 1e-3
    assert info["limit"].type == "int | None" and info["limit"].doc == "Optional cap."
    assert info["dtype"].type == "one of 'fp32', 'bf16'"
    assert describe_config(Required)[0].required is True


def test_every_sft_config_field_is_documented() -> None:
    fields = describe_config(SFTConfig)
    assert [f.key for f in fields if not f.doc] == []
    keys = [f.key for f in fields]
    assert {"optim.lr", "lora", "lora.r"} <= set(keys) and "optim" not in keys


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("sft*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(SFTConfig, path)
    assert cfg.data.endswith(".jsonl")
    assert cfg.model.startswith("tiny:")
