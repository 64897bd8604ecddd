"""Tests for repic_ray/config.py: strict loading, YAML recipes, dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from repic_ray.config import (
    ConfigError,
    dump_yaml,
    field_docs,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)


@dataclass
class Inner:
    num_workers: int = 1
    """How many workers."""
    temperature: float = 1.0
    """Sampling temperature."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


@dataclass
class Outer:
    name: str = "run"
    """Run name."""
    mode: Literal["sync", "async"] = "sync"
    """Pipeline mode."""
    inner: Inner = field(default_factory=Inner)
    """Nested section."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""
    seed: Optional[int] = None  # noqa: UP045  (the loader must accept the typing spelling too)
    """Seed, or None for random."""
    weights: dict[str, float] = field(default_factory=dict)
    """Named weights."""


def test_defaults_yaml_and_overrides_layer(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: exp\ninner:\n  num_workers: 2\n")
    cfg = load_config(Outer, recipe, ["--inner.temperature", "0.5", "--tags=[a, b]", "--seed", "7"])
    assert cfg.name == "exp"
    assert cfg.inner.num_workers == 2
    assert cfg.inner.temperature == 0.5
    assert cfg.tags == ["a", "b"]
    assert cfg.seed == 7
    assert cfg.mode == "sync"


def test_override_beats_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inner:\n  num_workers: 2\n")
    assert load_config(Outer, recipe, ["--inner.num_workers", "4"]).inner.num_workers == 4


def test_unknown_key_names_key_and_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inner:\n  num_worker: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, recipe)
    msg = str(exc.value)
    assert "inner.num_worker" in msg and "inner.num_workers" in msg and "r.yaml" in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"inner\.num_workers: expected an integer"):
        from_dict(Outer, {"inner": {"num_workers": "many"}})
    with pytest.raises(ConfigError, match=r"inner\.num_workers: expected an integer"):
        from_dict(Outer, {"inner": {"num_workers": 1.5}})
    with pytest.raises(ConfigError, match=r"inner: expected a mapping"):
        from_dict(Outer, {"inner": 3})
    with pytest.raises(ConfigError, match=r"tags\[1\]: expected a string"):
        from_dict(Outer, {"tags": ["a", 2]})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="num_workers"):
        from_dict(Outer, {"inner": {"num_workers": True}})


def test_literal_suggests_closest():
    with pytest.raises(ConfigError, match=r"mode: 'asyncc' is not one of .*did you mean 'async'"):
        from_dict(Outer, {"mode": "asyncc"})


def test_impossible_value_from_post_init_names_section():
    with pytest.raises(ConfigError, match=r"inner: num_workers must be >= 1"):
        from_dict(Outer, {"inner": {"num_workers": 0}})


def test_int_is_accepted_for_float_and_roundtrip():
    cfg = from_dict(Outer, {"inner": {"temperature": 1}, "weights": {"a": 2}})
    assert isinstance(cfg.inner.temperature, float) and cfg.weights == {"a": 2.0}
    assert from_dict(Outer, to_dict(cfg)) == cfg
    import yaml

    assert from_dict(Outer, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_parse_overrides_errors():
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="expected --dotted.key"):
        parse_overrides(["a.b", "1"])
    assert parse_overrides(["--a.b", "1", "--a.c", "x"]) == {"a": {"b": 1, "c": "x"}}


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, top_list)


def test_defaults_include(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ninner:\n  num_workers: 3\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nname: child\n")
    cfg = load_config(Outer, tmp_path / "child.yaml")
    assert cfg.name == "child" and cfg.inner.num_workers == 3


def test_field_docs_read_from_source():
    docs = field_docs(Outer)
    assert docs["mode"] == "Pipeline mode."
    assert field_docs(Inner)["num_workers"] == "How many workers."


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-3` as a string (YAML 1.1); float fields accept it as a number.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inner:\n  temperature: 1e-3\n")
    assert load_config(Outer, recipe).inner.temperature == 1e-3
    assert load_config(Outer, None, ["--inner.temperature", "2E-4"]).inner.temperature == 2e-4
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(Outer, {"inner": {"temperature": "1e-3x"}})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Outer, {"inner": {"num_workers": "1e3"}})
