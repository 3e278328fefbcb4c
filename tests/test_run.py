"""End-to-end runs of `splitfed train` on a tiny local model and a local CSV dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from splitfed.cli import app
from splitfed.config import parse_config
from splitfed.run import train
from tiny import run_config, save_tiny_pretrained, write_topic_csv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    return root


def _config(root: Path, out: str, **train: object) -> dict:
    return run_config(root, out, train=train)


def test_train_writes_results_and_adapters(workspace: Path) -> None:
    result = train(parse_config(_config(workspace, "a")), progress=False, log=lambda s: None)
    summary = json.loads((result.output_dir / "results.json").read_text())
    assert summary["steps"] == 6 and len(summary["history"]) == 6
    assert set(summary["metrics_after"]) >= {"accuracy", "macro_f1"}
    assert summary["bytes_per_step"]["to_model"] > 0 and summary["bytes_per_step"]["to_data"] > 0
    data_adapter = load_file(str(result.output_dir / "data_party" / "adapter.safetensors"))
    model_adapter = load_file(str(result.output_dir / "model_party" / "adapter.safetensors"))
    assert any("lora_" in k for k in data_adapter) and any(k.startswith("score") for k in data_adapter)
    assert all("lora_" in k for k in model_adapter) and not set(data_adapter) & set(model_adapter)


def test_resume_continues_exactly(workspace: Path) -> None:
    straight = train(parse_config(_config(workspace, "straight")), progress=False, log=lambda s: None)
    first = parse_config(_config(workspace, "resumed", checkpoint_every=3))
    assert _stop_after(first, 3) == 3  # a crash right after the step-3 checkpoint
    resumed = train(first, resume=True, progress=False, log=lambda s: None)
    losses_straight = [h["loss"] for h in straight.history]
    losses_resumed = [h["loss"] for h in resumed.history]
    assert losses_resumed == pytest.approx(losses_straight, abs=1e-6)
    assert resumed.metrics_after == pytest.approx(straight.metrics_after, abs=1e-6)


def _stop_after(cfg, steps: int) -> int:
    """Run ``cfg`` but raise after ``steps`` optimizer steps (after that step's checkpoint), as a crash would."""
    from splitfed.run import Callback, checkpoint_step

    class Crash(Exception):
        pass

    class CrashAt(Callback):
        every = steps  # runs after the built-in callbacks, so the step's checkpoint is written

        def on_sync(self, state):  # type: ignore[no-untyped-def]
            raise Crash

    with pytest.raises(Crash):
        train(cfg, progress=False, log=lambda s: None, callbacks=[CrashAt()])
    return checkpoint_step(Path(cfg.output_dir))


def test_resume_without_checkpoint_is_a_clear_error(workspace: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(parse_config(_config(workspace, "empty")), resume=True, progress=False, log=lambda s: None)


def test_cli_train_and_errors(workspace: Path, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(workspace, "cli")))
    runner = CliRunner()
    ok = runner.invoke(app, ["train", str(path), "--no-progress", "--set", "train.steps=2"])
    assert ok.exit_code == 0, ok.output
    assert (workspace / "cli" / "results.json").is_file()
    bad = runner.invoke(app, ["train", str(path), "--set", "split.head_layers=9"])
    assert bad.exit_code == 2 and "4 layers" in bad.output
    unknown = runner.invoke(app, ["train", str(path), "--set", "train.learning_rate=1"])
    assert unknown.exit_code == 2 and "train.learning_rate" in unknown.output
    missing = runner.invoke(app, ["train", str(path), "--set", "model.name=smollm2-135m-nope"])
    assert missing.exit_code == 2 and "could not load" in missing.output


def test_generative_qa_is_scored_by_generating_across_the_split(workspace: Path) -> None:
    raw = run_config(
        workspace,
        "gsm",
        task="generative_qa",
        data={
            "name": "arithmetic",
            "path": None,
            "columns": {},
            "max_train": 16,
            "max_eval": 4,
            "max_length": 32,
        },
        train={"steps": 2, "eval_max_new_tokens": 6},
    )
    result = train(parse_config(raw), progress=False, log=lambda s: None)
    assert {"exact_match", "answered", "loss", "perplexity"} <= set(result.metrics_after)
    assert 0.0 <= result.metrics_after["exact_match"] <= 1.0


def test_trained_adapters_load_for_generation(workspace: Path) -> None:
    from splitfed.runtime import open_generator
    from splitfed.split.decoding import DecodingConfig

    raw = run_config(
        workspace,
        "lm",
        task="causal_lm",
        data={"name": "local", "task": "causal_lm", "columns": {"text": "sentence"}},
        train={"steps": 3, "lr": 0.05},
    )
    cfg = parse_config(raw)
    result = train(cfg, progress=False, log=lambda s: None)
    decoding = DecodingConfig(max_new_tokens=8)
    with (
        open_generator(cfg, decoding=decoding) as base,
        open_generator(cfg, adapters=str(result.output_dir), decoding=decoding) as tuned,
    ):
        prompts = ["the cat", "a big red"]
        assert base.generate_ids(prompts) != tuned.generate_ids(prompts)
        # the adapters are the trained ones: the loaded data party's LoRA equals what was saved
        saved = load_file(str(result.output_dir / "data_party" / "adapter.safetensors"))
        loaded = tuned.head.named_model_parameters(trainable_only=True) | tuned.tail.named_model_parameters(
            trainable_only=True
        )
        assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_evaluation_on_the_test_split(workspace: Path) -> None:
    raw = run_config(workspace, "on-test", train={"steps": 1})
    raw["data"]["eval_split"] = "test"
    result = train(parse_config(raw), progress=False, log=lambda s: None)
    assert result.summary["eval_split"] == "test"
    assert set(result.metrics_after) >= {"accuracy", "macro_f1"}


def test_results_report_compute_share_and_waiting(workspace: Path) -> None:
    frozen = train(
        parse_config(run_config(workspace, "share-frozen", mode="splitfrozen", train={"steps": 1})),
        progress=False,
        log=lambda s: None,
    )
    lora = train(
        parse_config(run_config(workspace, "share-lora", train={"steps": 1})),
        progress=False,
        log=lambda s: None,
    )
    for result in (frozen, lora):
        share = result.summary["compute_share"]
        assert 0 < share["data_share"] < 1
        t = result.summary["timings"]
        assert 0 < t["data_party_wait_s"] <= t["train_s"]
    assert frozen.summary["compute_share"]["data_share"] < lora.summary["compute_share"]["data_share"]


@pytest.mark.parametrize("schedule", ["pipelined", "forward-only"])
def test_schedules_in_process_equal_sequential(workspace: Path, schedule: str) -> None:
    sections = {
        "mode": "splitfrozen",
        "split": {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"},
    }
    runs = {}
    for name in ("sequential", schedule):
        raw = _config(workspace, f"sched-{schedule}-{name}", steps=4, grad_accum=2, eval_before=False)
        raw.update(sections)
        raw["train"] |= {"schedule": name, "pipeline_depth": 3, "checkpoint_every": 3}
        runs[name] = train(parse_config(raw), progress=False, log=lambda s: None)
    assert [h["loss"] for h in runs[schedule].history] == pytest.approx(
        [h["loss"] for h in runs["sequential"].history], abs=1e-6
    )
    assert runs[schedule].metrics_after == pytest.approx(runs["sequential"].metrics_after, abs=1e-6)


@pytest.mark.parametrize(
    "split",
    [
        {"setting": "ht", "head_layers": 1, "tail_layers": 0, "labels_at": "model"},
        {"setting": "ht", "head_layers": 2, "tail_layers": 0, "labels_at": "data"},
        {"setting": "hbt", "head_layers": 1, "tail_layers": 1},
    ],
    ids=["ht-labels-at-model", "ht-labels-at-data", "hbt"],
)
def test_a_frozen_head_computes_each_example_once_with_the_cache(workspace: Path, split: dict) -> None:
    runs = {}
    for cache in (False, True):
        raw = _config(workspace, f"cache-{split['setting']}-{split.get('labels_at')}-{cache}", epochs=3)
        del raw["train"]["steps"]
        raw |= {"mode": "splitfrozen", "split": split}
        raw["train"] |= {"cache_head_outputs": cache, "eval_before": False}
        runs[cache] = train(parse_config(raw), progress=False, log=lambda s: None)
    plain, cached = runs[False], runs[True]
    assert len(plain.history) == len(cached.history) >= 3
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in plain.history], abs=1e-5)
    assert cached.metrics_after == pytest.approx(plain.metrics_after, abs=1e-5)
    tokens = {k: r.summary["data_party_head_tokens"] for k, r in runs.items()}
    assert tokens[True]["backward"] == tokens[False]["backward"] == 0
    # Three epochs of forward passes without the cache; about one with it (the examples the
    # last, incomplete micro-batch of an epoch leaves out may first appear in a later epoch).
    assert tokens[True]["forward"] * 2 < tokens[False]["forward"]
    assert tokens[True]["forward"] >= tokens[False]["forward"] / 3 - 1
