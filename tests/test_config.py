"""Config validation: unknown keys and bad values name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitfed.config import ConfigError, RunConfig, load_config, parse_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_defaults_validate() -> None:
    cfg = parse_config({})
    assert cfg.split.setting == "ht" and cfg.task == "classification"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"split\.hed_layers: unknown key"):
        parse_config({"split": {"hed_layers": 2}})


def test_bad_literal_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"split\.setting: .*'ht' or 'hbt'.*got 'htt'"):
        parse_config({"split": {"setting": "htt"}})


def test_negative_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        parse_config({"train": {"batch_size": 0}})


def test_inconsistent_settings() -> None:
    with pytest.raises(ConfigError, match="labels_at"):
        parse_config({"split": {"setting": "hbt", "tail_layers": 1, "labels_at": "model"}})
    with pytest.raises(ConfigError, match="tail_layers"):
        parse_config({"split": {"setting": "hbt"}})


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=1e-3", "split.head_layers=3", "finetune.body.r=4"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.split.head_layers == 3
    assert cfg.segment_finetune()["body"].r == 4
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config(path, ["train.nope=1"])


def test_mode_presets() -> None:
    frozen = RunConfig(mode="splitfrozen").segment_finetune()
    assert frozen["head"].mode == "frozen" and frozen["body"].mode == "lora"
    lora = RunConfig(mode="splitlora").segment_finetune()
    assert {s.mode for s in lora.values()} == {"lora"}
    custom = parse_config({"mode": "splitfrozen", "finetune": {"head": {"mode": "full"}}}).segment_finetune()
    assert custom["head"].mode == "full"


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    load_config(path)


def test_demo_config_validates() -> None:
    from splitfed.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    assert cfg.mode == "splitfrozen" and cfg.model.name == "smollm2-135m"


def test_forward_only_schedule_needs_a_frozen_head_and_labels_at_the_model_party() -> None:
    with pytest.raises(ConfigError, match="forward-only needs a frozen data-party head"):
        parse_config({"train": {"schedule": "forward-only"}})
    with pytest.raises(ConfigError, match="labels_at data"):
        parse_config({"mode": "splitfrozen", "train": {"schedule": "forward-only"}})
    cfg = parse_config(
        {
            "mode": "splitfrozen",
            "split": {"labels_at": "model"},
            "train": {"schedule": "forward-only", "pipeline_depth": 6},
        }
    )
    assert cfg.train.window == 6
    assert parse_config({"train": {"pipeline_depth": 6}}).train.window == 1


def test_head_output_cache_needs_a_frozen_head() -> None:
    with pytest.raises(ConfigError, match="cache_head_outputs needs a frozen data-party head"):
        parse_config({"train": {"cache_head_outputs": True}})
    assert parse_config(
        {"mode": "splitfrozen", "train": {"cache_head_outputs": True}}
    ).train.cache_head_outputs


def test_head_layers_zero_needs_the_raw_embeddings_opt_in() -> None:
    with pytest.raises(ConfigError, match=r"raw token embeddings.*split\.allow_raw_embeddings: true") as err:
        parse_config({"split": {"head_layers": 0}})
    assert "Value error" not in str(err.value)
    cfg = parse_config({"split": {"head_layers": 0, "allow_raw_embeddings": True}})
    assert cfg.split.spec().allow_raw_embeddings and cfg.split.spec().head_layers == 0
    assert not parse_config({}).split.spec().allow_raw_embeddings
