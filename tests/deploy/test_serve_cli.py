"""`repic serve` argument handling and user management (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import _config, _parser, main, read_serve_yaml
from repic_ray.config import ConfigError
from repic_ray.serving.store import ConceptStore, StoreConfig

SERVE_YAML = Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml"


def test_add_user_and_key_print_working_keys(tmp_path, capsys):
    root = ["--store.root", str(tmp_path)]
    assert main(["add-user", "alice", "--admin", *root]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["serve", "add-key", "alice", *root]) == 0
    second = capsys.readouterr().out.strip()
    store = ConceptStore(StoreConfig(root=str(tmp_path)))
    assert store.authenticate(first).is_admin and store.authenticate(second).name == "alice"
    assert first != second
    assert main(["add-user", "alice", *root]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["add-key", "nobody", *root]) == 1


def test_config_layers_yaml_flags_and_overrides():
    args, rest = _parser().parse_known_args(
        ["--config", str(SERVE_YAML), "--checkpoint", "/ckpt", "--adapter", "/lora",
         "--engine", "hf", "--captioner.max_new_tokens", "7"])
    cfg, deployments, http = _config(args, rest)
    assert (cfg.captioner.checkpoint, cfg.captioner.adapter) == ("/ckpt", "/lora")
    assert (cfg.engine, cfg.captioner.max_new_tokens) == ("hf", 7)
    assert cfg.retriever.box_threshold == 0.15  # from the YAML (the default is 0.2)
    assert deployments["Captioner"]["autoscaling_config"]["max_replicas"] == 1
    assert http == {"host": "127.0.0.1", "port": 8000}


def test_bad_config_names_the_field(tmp_path):
    args, rest = _parser().parse_known_args(["--engine", "hf", "--captioner.max_new_tokens", "0"])
    with pytest.raises((ConfigError, ValueError), match="max_new_tokens"):
        _config(args, rest)
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: []\n")
    with pytest.raises(ConfigError, match="exactly one application"):
        read_serve_yaml(str(bad))
