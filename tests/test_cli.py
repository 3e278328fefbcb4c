"""Every error a user causes from the CLI is one ``error:`` line (what is wrong, how to fix it), no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from splitfed.cli import _fail, app
from tiny import VOCAB, run_config, save_tiny_pretrained, tiny_tokenizer, write_topic_csv

UNSUPPORTED = ("gpt_neox", "t5", "gemma2")


def _save_unsupported(directory: Path, model_type: str) -> None:
    """A tiny random model of a family splitfed cannot cut, saved as a local model directory."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        Gemma2Config,
        GPTNeoXConfig,
        T5Config,
    )

    torch.manual_seed(0)
    small = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1}
    if model_type == "t5":
        config = T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, **small)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        cls = GPTNeoXConfig if model_type == "gpt_neox" else Gemma2Config
        extra = {"head_dim": 4} if model_type == "gemma2" else {}
        config = cls(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, **small, **extra
        )
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    for model_type in UNSUPPORTED:
        _save_unsupported(root / model_type, model_type)
    return root


def _config(root: Path, name: str, **sections: object) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run_config(root, name, **sections)))
    return path


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.mark.parametrize("model_type", UNSUPPORTED)
@pytest.mark.parametrize("command", ["train", "serve", "generate"])
def test_unsupported_family_is_one_error_line(root: Path, command: str, model_type: str) -> None:
    task = "causal_lm" if command == "generate" else "classification"
    config = _config(
        root,
        f"{command}-{model_type}",
        task=task,
        model={"name": str(root / model_type), "num_labels": 3},
        data={
            "columns": {"text": "sentence"} if task == "causal_lm" else {"text": "sentence", "label": "topic"}
        },
    )
    extra = {"train": ["--no-progress"], "serve": ["--port", "0"], "generate": ["--prompt", "the cat"]}[
        command
    ]
    result = CliRunner().invoke(app, [command, str(config), *extra])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert f"model type '{model_type}' cannot be split" in line
    assert "supported model types: bert, distilbert, gemma, gpt2, llama" in line


def test_serve_of_an_unsupported_family_exits_with_one_error_line(root: Path) -> None:
    """The real entry point, as a user runs it: no Python traceback on stderr."""
    config = _config(root, "serve-process", task="causal_lm", model={"name": str(root / "gpt_neox")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "splitfed.cli", "serve", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot be split" in _one_error_line(done.stdout + done.stderr)


def test_head_layers_zero_is_refused_without_the_opt_in_and_warned_with_it(root: Path) -> None:
    split = {"setting": "ht", "head_layers": 0, "tail_layers": 0}
    refused = CliRunner().invoke(
        app, ["train", str(_config(root, "raw-refused", split=split)), "--no-progress"]
    )
    assert refused.exit_code == 2
    assert "split.allow_raw_embeddings: true" in refused.output and "Traceback" not in refused.output
    assert len([line for line in refused.output.splitlines() if line.startswith("error:")]) == 1
    opted = _config(root, "raw-opted", split={**split, "allow_raw_embeddings": True}, train={"steps": 1})
    ok = CliRunner().invoke(app, ["train", str(opted), "--no-progress", "--set", "train.eval_before=false"])
    assert ok.exit_code == 0, ok.output
    warned = [line for line in ok.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "raw token embeddings cross to the model party" in warned[0], ok.output


def test_error_text_with_brackets_is_printed_as_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        _fail("gen_start carries hidden [batch, seq, hidden]; blocks [bert]")
    assert "error: gen_start carries hidden [batch, seq, hidden]; blocks [bert]" in capsys.readouterr().err
