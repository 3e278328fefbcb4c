"""The ``splitfed`` command line: thin, it parses, loads a config and calls the library."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="splitfed",
    help="Split learning, split inference and federated LoRA for LLMs across parties that do not trust each other.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
assets_app = typer.Typer(
    help="Offline models and data: list and fetch them into the cache.", no_args_is_help=True
)
app.add_typer(assets_app, name="assets")
console = Console(stderr=True)

DEMO_CONFIG = Path(__file__).parent / "demo.yaml"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run(config_path: Path, overrides: list[str], resume: bool, progress: bool) -> None:
    from splitfed.assets import AssetError
    from splitfed.config import ConfigError, load_config
    from splitfed.data import DataError
    from splitfed.models.loading import ModelLoadError
    from splitfed.models.partition import SplitConfigError

    _quiet_libraries()
    try:
        cfg = load_config(config_path, overrides)
        from splitfed.run import train

        result = train(cfg, resume=resume, progress=progress, log=lambda s: console.print(s))
    except (ConfigError, SplitConfigError, AssetError, DataError, ModelLoadError, FileNotFoundError) as err:
        _fail(str(err))
        return
    console.print(f"results: {result.output_dir / 'results.json'}")
    console.print(f"adapters: {result.output_dir / 'data_party'} and {result.output_dir / 'model_party'}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in output_dir.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Split fine-tuning in one process: data party and model party joined by an in-process channel.

    Writes results.json (config, metrics, timings, bytes crossed per step) and each party's
    adapters (safetensors) to the config's output_dir.
    """
    _run(config, set_ or [], resume, progress)


@app.command()
def demo(
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key of the demo config.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """SplitFrozen split-LoRA fine-tuning of smollm2-135m on fortunes-topic (a few minutes on 2 cores).

    Prints validation accuracy before and after fine-tuning and where the results went.
    """
    _run(DEMO_CONFIG, set_ or [], resume=False, progress=progress)


@assets_app.command("list")
def assets_list() -> None:
    """Show the offline assets, whether each is fetched, and where."""
    from splitfed.assets import cache_dir, list_assets

    table = Table(title=f"assets in {cache_dir()}")
    for column in ("name", "kind", "fetched", "size", "description"):
        table.add_column(column)
    for row in list_assets():
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row.get("size_bytes") else "-"
        table.add_row(row["name"], row["kind"], "yes" if row["fetched"] else "no", size, row["description"])
    Console().print(table)


@assets_app.command("fetch")
def assets_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Asset names; all when omitted.")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if present.")] = False,
) -> None:
    """Download, verify (sha256) and unpack offline assets into the cache. Idempotent."""
    from splitfed.assets import ASSETS, AssetError, fetch

    _quiet_libraries()
    for name in names or list(ASSETS):
        try:
            path = fetch(name, force=force, progress=lambda s: console.print(f"  {s}"))
        except AssetError as err:
            _fail(str(err))
            return
        console.print(f"[green]ok[/] {name}: {path}")


def main() -> None:
    """Entry point of the ``splitfed`` script."""
    app(prog_name="splitfed")


if __name__ == "__main__":
    main()
