"""The ``splitfed`` command line: thin, it parses, loads a config and calls the library."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from splitfed.transport.grpc_server import TlsFiles

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
console = Console(stderr=True, soft_wrap=True)

DEMO_CONFIG = Path(__file__).parent / "demo.yaml"


def _fail(message: str) -> None:
    # Escaped: messages hold shapes and lists ("[batch, seq]") that rich would take for markup and drop.
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def _warnings_as_lines() -> None:
    """Print splitfed's own warnings (:class:`PrivacyWarning`) as one ``warning:`` line each."""
    import warnings

    from splitfed.models.partition import PrivacyWarning

    original = warnings.showwarning
    if getattr(original, "splitfed", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, PrivacyWarning):
            console.print(f"[yellow]warning:[/] {escape(str(message))}")
        else:
            original(message, category, filename, lineno, file, line)

    show.splitfed = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _warnings_as_lines()


def _user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The errors a user's input causes (config, data, model, assets, network, protocol, files),
    and ``extra``: each ends a command in one ``error:`` line naming the problem and the fix."""
    from splitfed.assets import AssetError
    from splitfed.config import ConfigError
    from splitfed.data import DataError
    from splitfed.federated.fedavg import AggregationError
    from splitfed.models.loading import ModelLoadError
    from splitfed.models.partition import SplitConfigError
    from splitfed.privacy.recording import RecordingError
    from splitfed.protocol import ProtocolError
    from splitfed.transport.grpc_channel import TransportError

    return (
        ConfigError,
        SplitConfigError,
        AssetError,
        DataError,
        ModelLoadError,
        RecordingError,
        AggregationError,
        ProtocolError,
        TransportError,
        FileNotFoundError,
        *extra,
    )


def _run(
    config_path: Path, overrides: list[str], resume: bool, progress: bool, record: Path | None = None
) -> None:
    from splitfed.config import load_config

    _quiet_libraries()
    try:
        cfg = load_config(config_path, overrides)
        from splitfed.run import train

        result = train(cfg, resume=resume, progress=progress, log=lambda s: console.print(s), record=record)
    except _user_errors() as err:
        _fail(str(err))
        return
    console.print(f"results: {result.output_dir / 'results.json'}")
    console.print(f"adapters: {result.output_dir / 'data_party'} and {result.output_dir / 'model_party'}")
    _print_recording(result.summary)


def _print_recording(summary: dict[str, Any]) -> None:
    if "recording" in summary:
        rec = summary["recording"]
        console.print(
            f"recording: {rec['directory']} ({rec['records']} crossings, {rec['stored_bytes'] / 1e6:.1f} MB "
            f"in {rec['shards']} shards); ground truth: {rec['ground_truth']}"
        )


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config (see examples/).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.lr=1e-4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in output_dir.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="Record every crossing (safetensors shards + manifest.json) in this new directory, and the "
            "data party's ground truth in its ground_truth/ (for attacks).",
        ),
    ] = None,
) -> None:
    """Split fine-tuning in one process: data party and model party joined by an in-process channel.

    Writes results.json (config, metrics, timings, bytes crossed per step) and each party's
    adapters (safetensors) to the config's output_dir; with --record DIR also what crossed, as the
    model party received it, and what each batch really held.
    """
    _run(config, set_ or [], resume, progress, record)


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


@app.command()
def fedtrain(
    config: Annotated[
        Path, typer.Argument(help="YAML run config with a federated: section (see examples/).")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set federated.rounds=20 (repeatable)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from the last checkpoint in output_dir (federated.checkpoint_every)."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record",
            help="Record in this new directory what the server saw each round (the global adapters; each "
            "client's update under plain aggregation, only the average under secagg or ckks; safetensors + "
            "manifest.json) and, in its ground_truth/, each client's batches (for `splitfed audit`).",
        ),
    ] = None,
) -> None:
    """Federated LoRA fine-tuning simulated in one process: clients train adapters, the server aggregates.

    One frozen base model serves every client; each round samples clients, trains their LoRA
    adapters on their partition, and averages the deltas through federated.aggregation (plain,
    ckks or secagg) and federated.strategy (fedavg, fedprox, fedadam, fedyogi). Writes results.json
    (config, metrics before and after, per-round history with bytes up and down) and the global
    adapters (global/adapter.safetensors) to output_dir. With --record DIR also the server's view of
    every round and, apart, the clients' batches: `splitfed audit` then inverts client updates.
    """
    from splitfed.config import load_config

    _quiet_libraries()
    try:
        cfg = load_config(config, set_ or [])
        from splitfed.federated.simulation import fedtrain as run_federated

        result = run_federated(
            cfg, resume=resume, progress=progress, log=lambda s: console.print(s), record=record
        )
    except _user_errors() as err:
        _fail(str(err))
        return
    console.print(f"results: {result.output_dir / 'results.json'}")
    console.print(f"global adapters: {result.summary['adapters']}")
    if "recording" in result.summary:
        rec = result.summary["recording"]
        console.print(
            f"recording: {rec['directory']} (server's view: {rec['view']}); ground truth: {rec['ground_truth']}"
        )


def _tls(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    from splitfed.transport.grpc_server import TlsFiles

    for label, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not path.is_file():
            _fail(f"{label} {path} does not exist")
    if (cert is None) != (key is None):
        _fail("--tls-cert and --tls-key go together")
    if cert is None and ca is None:
        return None
    return TlsFiles(str(cert) if cert else None, str(key) if key else None, str(ca) if ca else None)


def _tokens(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        _fail(f"--tokens {path}: {err}")
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(v, str) and len(v) >= 16 for v in data.values())
    ):
        _fail(f"--tokens {path} must map each data party's id to a token of at least 16 characters")
    return {str(k): str(v) for k, v in data.items()}


TlsCert = Annotated[
    Path | None, typer.Option("--tls-cert", help="PEM certificate (server: its own; client: for mutual TLS).")
]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")]
ServerCa = Annotated[Path | None, typer.Option("--tls-ca", help="CA that signed the server's certificate.")]
RecordOption = Annotated[
    Path | None,
    typer.Option(
        "--record",
        help="Record what crossed (safetensors shards + manifest.json) in this new directory (for attacks).",
    ),
]
ClientToken = Annotated[
    str | None, typer.Option(envvar="SPLITFED_TOKEN", help="This data party's token (or env SPLITFED_TOKEN).")
]


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="The run config (the same file the data parties use).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50051,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="CA of client certificates: requires mutual TLS.")
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON file mapping data-party ids to their tokens; required when given."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Start from the model party's last checkpoint (output_dir/model_party_server)."),
    ] = False,
    step_timeout: Annotated[
        float,
        typer.Option(
            min=0.1, help="Drop a data party's training step after this many seconds without progress."
        ),
    ] = 30.0,
    max_step_grad_norm: Annotated[
        float,
        typer.Option(
            min=0.0, help="Refuse a data party's step whose gradient norm exceeds this (0: no bound)."
        ),
    ] = 1e4,
    max_strikes: Annotated[
        int, typer.Option(min=1, help="Disconnect a data party after this many refused steps.")
    ] = 3,
    grace: Annotated[
        float, typer.Option(min=0.0, help="Seconds running calls get to finish on Ctrl-C or SIGTERM.")
    ] = 2.0,
    record: RecordOption = None,
) -> None:
    """Run the model party as a gRPC server (one stream per data party).

    With train.checkpoint_every: N it checkpoints every N applied steps; --resume continues from there.
    A data party's step is applied only when its gradients and result are finite and within
    --max-step-grad-norm; the final adapters are written on exit whatever the clients did.
    """
    from splitfed.config import load_config
    from splitfed.runtime import start_server
    from splitfed.transport.grpc_server import ServerLimits

    _quiet_libraries()
    tls = _tls(tls_cert, tls_key, tls_ca)
    if tls_cert is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            "[yellow]warning:[/] serving without TLS on a non-loopback address; pass --tls-cert/--tls-key"
        )
    try:
        cfg = load_config(config, set_ or [])
        limits = ServerLimits(
            step_timeout_s=step_timeout,
            max_step_grad_norm=max_step_grad_norm or None,
            max_strikes=max_strikes,
        )
        server = start_server(
            cfg,
            host,
            port,
            tls,
            _tokens(tokens),
            limits=limits,
            resume=resume,
            log=lambda s: console.print(s),
            record=record,
        )
    except _user_errors(OSError, ValueError) as err:  # OSError: the port; ValueError: limits
        _fail(str(err))
        return
    console.print(
        f"model party serving {cfg.model.name} ({cfg.split.setting}, body from block {cfg.split.head_layers}) "
        f"on {host}:{server.port} with {'TLS' if tls else 'no TLS'}; Ctrl-C (or SIGTERM) to stop"
    )
    import signal

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(0.5):
        pass
    if not server.stop(grace):
        console.print("[yellow]warning:[/] some client calls had not ended; stopping without them")
    final = server.save_adapters()
    console.print(f"model party adapters saved in {final}")
    # A call gRPC left open keeps a worker thread that interpreter shutdown would join forever;
    # everything is saved, so leave without waiting for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def join(
    config: Annotated[Path, typer.Argument(help="The run config.")],
    server: Annotated[str, typer.Option(help="HOST:PORT of `splitfed serve`.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    client_id: Annotated[
        str, typer.Option(help="This data party's name (the server's token file may fix it).")
    ] = "",
    token: ClientToken = None,
    tls_ca: ServerCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    partition: Annotated[
        str | None,
        typer.Option(help="Split the training data across parties: iid, dirichlet:ALPHA, quantity:ALPHA."),
    ] = None,
    parties: Annotated[int | None, typer.Option(help="Number of data parties sharing the dataset.")] = None,
    party: Annotated[
        int | None, typer.Option(help="This data party's index (0-based) among --parties.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from this data party's last checkpoint.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    inject_latency_ms: Annotated[
        float,
        typer.Option(min=0, help="Add this much round-trip latency to the link (to study a distant server)."),
    ] = 0.0,
    record: RecordOption = None,
) -> None:
    """Run a data party against a model party served by `splitfed serve`; same outputs as `train`.

    With --partition/--parties/--party, this party trains on its share of the dataset (a printed
    table shows every party's label counts). With --record DIR, what this party sent and got back
    (before the codec) and, apart, its ground truth (what each batch held), which scores an attack
    on what `splitfed serve --record` kept.
    """
    from splitfed.config import load_config
    from splitfed.runtime import join as join_run
    from splitfed.transport.wire import WireCodecs

    _quiet_libraries()
    tls = _tls(tls_cert, tls_key, tls_ca)
    try:
        overrides = list(set_ or [])
        for key, value in (("partition", partition), ("num_parties", parties), ("party_index", party)):
            if value is not None:
                overrides.append(f"data.{key}={value}")
        cfg = load_config(config, overrides)
        codecs = WireCodecs(cfg.transport.activations, cfg.transport.gradients, cfg.transport.topk_ratio)
        result = join_run(
            cfg,
            server,
            client_id,
            token,
            tls,
            codecs,
            resume,
            progress,
            log=lambda s: console.print(s),  # type: ignore[arg-type]
            latency_ms=inject_latency_ms,
            record=record,
        )
    except _user_errors() as err:
        _fail(str(err))
        return
    wire = result.summary["wire"]
    console.print(
        f"bytes on the wire: {wire['bytes_to_model'] / 1e6:.2f} MB to the model party, "
        f"{wire['bytes_to_data'] / 1e6:.2f} MB back"
    )
    console.print(f"results: {result.output_dir / 'results.json'}")
    _print_recording(result.summary)


@app.command()
def generate(
    config: Annotated[
        Path, typer.Argument(help="Run config naming the model and the split (a causal-LM task).")
    ],
    prompt: Annotated[
        str | None, typer.Option(help="One prompt; its completion streams token by token.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="A text file with one prompt per line (a batch).")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="HOST:PORT of `splitfed serve`; in process when omitted.")
    ] = None,
    adapters: Annotated[
        Path | None, typer.Option(help="Output directory of `splitfed train` to load adapters from.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1.0: off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalty on repeated tokens (1.0: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(help="Use the tokenizer's chat template.")] = False,
    return_logits: Annotated[bool, typer.Option(help="HT: get logits back and choose tokens here.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    token: ClientToken = None,
    tls_ca: ServerCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    record: RecordOption = None,
) -> None:
    """Generate across the split with a KV cache on each side (greedy or sampled), streaming the output.

    With --record DIR, what crossed (in process: what the model party received; with --server:
    what this data party sent) and, apart, each prompt's and output's token ids.
    """
    from splitfed.config import load_config
    from splitfed.runtime import open_generator
    from splitfed.split.decoding import DecodingConfig

    _quiet_libraries()
    if (prompt is None) == (prompts is None):
        _fail("give exactly one of --prompt TEXT or --prompts FILE")
    if prompts is not None:
        if not prompts.is_file():
            _fail(f"--prompts {prompts} does not exist")
        batch = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not batch:
            _fail(f"--prompts {prompts} holds no prompt (one per line)")
    else:
        batch = [str(prompt)]
    out = Console()
    try:
        decoding = DecodingConfig(
            max_new_tokens, sample, temperature, top_k, top_p, repetition_penalty, seed, tuple(stop or ())
        )
        cfg = load_config(config, set_ or [])
        tls = _tls(tls_cert, tls_key, tls_ca)
        stack = contextlib.ExitStack()
        recorder = truth = None
        if record is not None:
            from splitfed.privacy.recording import GroundTruthWriter, RecordingWriter, ground_truth_dir

            tap = "data_party_channel" if server else "in_process_channel"
            recorder = stack.enter_context(RecordingWriter(record, tap=tap))
            truth = stack.enter_context(GroundTruthWriter(ground_truth_dir(record)))
        with (
            stack,
            open_generator(
                cfg,
                server,
                str(adapters) if adapters else None,
                decoding,
                token=token,
                tls=tls,
                return_logits=return_logits,
                chat=chat,
                recorder=recorder,
                ground_truth=truth.generation if truth is not None else None,
            ) as gen,
        ):
            if len(batch) == 1:
                out.print(batch[0], end="", style="dim", highlight=False)
                for event in gen.stream(batch):
                    out.print(event.text, end="", highlight=False)
                out.print()
            else:
                for text_in, text_out in zip(batch, gen.generate(batch), strict=True):
                    out.print(f"[dim]{text_in}[/]{text_out}", highlight=False)
    except _user_errors(ValueError) as err:  # ValueError: decoding options
        _fail(str(err))


@app.command()
def defenses() -> None:
    """List the defenses a run's `defenses:` list may name, with their parameters and defaults."""
    from splitfed.privacy.defenses import describe_defenses

    table = Table(title="defenses (defenses: [{name: NAME, PARAM: VALUE, ...}] in a run's YAML)")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("parameters (default)")
    for name, summary, params in describe_defenses():
        described = "\n".join(
            f"{p} ({'from the model' if d is None else d}): {text}" for p, text, d in params
        )
        table.add_row(name, summary, described)
    Console().print(table)


@app.command()
def attacks() -> None:
    """List the attacks `splitfed attack --attack NAME` runs, with their parameters and defaults."""
    from splitfed.privacy.attacks import describe_attacks

    table = Table(title="attacks (splitfed attack RECORDING --config CONFIG --attack NAME --param KEY=VALUE)")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("parameters (default)")
    for name, summary, params in describe_attacks():
        table.add_row(name, summary, "\n".join(f"{p} ({d}): {text}" for p, text, d in params))
    Console().print(table)


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--param {item!r}: expected KEY=VALUE, e.g. --param steps=200")
        params[key.strip()] = yaml.safe_load(value)
    return params


@app.command()
def attack(
    recording: Annotated[Path, typer.Argument(help="A recording (`train`/`serve`/`join` --record DIR).")],
    config: Annotated[Path, typer.Option(help="The recorded run's config (its public model and data).")],
    attack_name: Annotated[
        list[str], typer.Option("--attack", help="Attack to run (repeatable; `splitfed attacks` lists them).")
    ],
    param: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE parameter of the attacks (repeatable; applies to each that has KEY)."),
    ] = None,
    aux: Annotated[
        str | None,
        typer.Option(help="Auxiliary text: a file of one example per line, or a split of the run's dataset."),
    ] = None,
    phase: Annotated[
        str, typer.Option(help="Crossings to attack: train, eval or both (train,eval).")
    ] = "train",
    max_examples: Annotated[
        int | None, typer.Option(min=1, help="Attack at most this many recorded sequences.")
    ] = None,
    window: Annotated[
        str,
        typer.Option(
            help="With --max-examples: attack the run's first sequences or its last (a defense that "
            "trains with the task, once trained)."
        ),
    ] = "first",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
    ground_truth: Annotated[
        Path | None,
        typer.Option(
            help="The data party's `join --record` directory, to score a `serve --record` recording."
        ),
    ] = None,
    noise_control: Annotated[
        bool,
        typer.Option(
            help="Also run each attack with what it intercepted replaced by noise of the same shape and "
            "scale; its score there (column control) should be near chance."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Attack a recording as the honest-but-curious model party and score it against the ground truth.

    The attacker knows the public pretrained model of the config (no fine-tuned adapters), the
    recording and auxiliary text of the same domain (default: the dataset's test split, while only
    training crossings are attacked). Each attack prints its score beside the linear baseline and
    the chance level (and, with --noise-control, beside its score on noise).
    """
    import json

    from splitfed.config import load_config
    from splitfed.privacy.attack_runs import attack_context, attack_recording, auxiliary_texts
    from splitfed.privacy.attacks import ATTACKS, AttackConfigError, AttackError
    from splitfed.privacy.attacks.runner import WINDOWS

    _quiet_libraries()
    try:
        cfg = load_config(config, [])
        params = _parse_params(param or [])
        specs = []
        for name in attack_name:
            declared = getattr(ATTACKS.get(name), "Params", None)
            own = {k: v for k, v in params.items() if declared is not None and k in declared.model_fields}
            specs.append({"name": name} | own)
        unused = set(params) - {k for spec in specs for k in spec}
        if unused:
            raise AttackConfigError(f"--param {sorted(unused)}: no chosen attack takes it")
        needs_aux = any(getattr(ATTACKS.get(n), "needs_auxiliary", False) for n in attack_name)
        texts = auxiliary_texts(cfg, aux) if needs_aux or aux is not None else []
        context = attack_context(
            cfg, texts, max_examples=max_examples, progress=progress, ground_truth=ground_truth
        )
        phases = [p.strip() for p in phase.split(",") if p.strip()]
        if window not in WINDOWS:
            raise AttackConfigError(f"--window {window!r}: use one of {', '.join(WINDOWS)}")
        results = attack_recording(
            recording,
            specs,
            context,
            phases=phases,
            noise_control=noise_control,
            window="last" if window == "last" else "first",
        )
    except _user_errors(AttackConfigError, AttackError) as err:
        _fail(str(err))
        return
    table = Table(
        title=f"attacks on {recording} ({', '.join(phases)} crossings; baseline: a linear inverter fit on the auxiliary text)"
    )
    columns = ["attack", "metric", "score", "baseline", "chance", "examples", "seconds"]
    if noise_control:
        columns.insert(3, "control")
    for column in columns:
        table.add_column(column)
    for result in results:
        for metric, value in result.metrics.items():
            base = result.baseline.get(metric)
            control = result.control.get(metric)
            on_noise = [("" if control is None else f"{control:.4f}")] if noise_control else []
            table.add_row(
                result.attack,
                metric,
                f"{value:.4f}",
                *on_noise,
                "" if base is None else f"{base:.4f}",
                f"{result.chance:.4f}",
                str(result.n_examples),
                f"{result.seconds:.1f}",
            )
    Console().print(table)
    for result in results:
        for example in result.examples[:2]:
            # Reconstructed text is data, not markup: "[/b]" in it must print as itself.
            console.print(f"[bold]{result.attack}[/bold] original:      {escape(example.original)}")
            console.print(f"[bold]{result.attack}[/bold] reconstructed: {escape(example.reconstructed)}")
    if json_out is not None:
        json_out.write_text(json.dumps([r.summary() for r in results], indent=2))
        console.print(f"results: {json_out}")


@app.command()
def bench(
    sweep_file: Annotated[Path, typer.Argument(help="The sweep's YAML (grid, defenses, attacks).")],
    store: Annotated[
        Path | None,
        typer.Option(help="The results database (default: the sweep's store or <out>/results.sqlite)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the runs and stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on a Ray cluster instead of local workers: auto (the one `ray start --head` "
            "started here, or $RAY_ADDRESS), HOST:PORT or ray://HOST:PORT.",
        ),
    ] = None,
    ray_cpus_per_run: Annotated[
        float | None,
        typer.Option(help="CPUs each run reserves with --ray (default: the sweep's ray_cpus_per_run)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Torch threads per local worker (default: the sweep's threads, or cores / workers); "
            "lower it when other jobs share the machine.",
        ),
    ] = None,
) -> None:
    """Run a privacy–utility sweep: every run × defense × strength, each attacked, results in SQLite.

    Runs go to the sweep's `workers` local processes, or with `--ray ADDRESS` to a Ray cluster
    (start one with `ray start --head`); either way results flow back to the one store. Runs
    already in the store are skipped, so an interrupted sweep resumes where it stopped; a failed
    run records its error and the sweep goes on. `splitfed report STORE` draws the results.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from splitfed.bench.ray_cluster import ClusterError
    from splitfed.bench.store import ResultStore, StoreError
    from splitfed.bench.sweep import load_sweep, plan, run_sweep, sweep_paths
    from splitfed.privacy.attacks import AttackConfigError

    _quiet_libraries()
    try:
        sweep, root = load_sweep(sweep_file)
        if threads is not None:
            sweep = sweep.model_copy(update={"threads": threads})
        if dry_run:
            _, default_store = sweep_paths(sweep, root)
            with ResultStore(store or default_store) as db:
                the_plan = plan(sweep, root, db)
            for run in the_plan.runs:
                mark = (
                    "stored"
                    if run.key in the_plan.stored
                    else "again"
                    if run.key in the_plan.again
                    else "to run"
                )
                console.print(f"{run.key}  {mark:7}  {run.spec}")
            console.print(
                f"{len(the_plan.runs)} runs x {len(the_plan.attacks)} attacks; {len(the_plan.todo)} to run"
            )
            return
        if not progress:
            run_sweep(
                sweep,
                root,
                store_path=store,
                log=lambda s: console.print(s),
                ray_address=ray,
                ray_cpus_per_run=ray_cpus_per_run,
            )
            return
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        ) as bar:
            task = bar.add_task(f"sweep {sweep.name}", total=None, info="")

            def advance(done: int, total: int, message: str) -> None:
                bar.update(task, completed=done, total=total, info=message)
                if message:
                    bar.console.print(f"[{done}/{total}] {message}")

            run_sweep(
                sweep,
                root,
                store_path=store,
                progress=advance,
                log=lambda s: bar.console.print(s),
                ray_address=ray,
                ray_cpus_per_run=ray_cpus_per_run,
            )
    except _user_errors(AttackConfigError, StoreError, ClusterError) as err:
        _fail(str(err))


@app.command()
def report(
    store: Annotated[Path, typer.Argument(help="A sweep's results store (`splitfed bench`).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for index.html, summary.md and figures/.")],
    beta: Annotated[
        float, typer.Option(min=0, max=1, help="DCS weight of the main task against the attack.")
    ] = 0.5,
    max_mp_drop: Annotated[
        float, typer.Option(min=0, help="Largest main-task drop a recommended defense may cost.")
    ] = 0.05,
    title: Annotated[str | None, typer.Option(help="The page's title.")] = None,
    sweep: Annotated[
        Path | None,
        typer.Option(
            help="Only the runs and attacks of this sweep file's grid (a store keeps those of older grids)."
        ),
    ] = None,
) -> None:
    """Draw a sweep: MP–AP trade-off per attack with its Pareto frontier, DCS ranking, costs, recommendations."""
    from splitfed.bench.report import sweep_keys, write_report
    from splitfed.bench.store import StoreError

    try:
        run_keys, attack_keys = sweep_keys(sweep) if sweep is not None else (None, None)
        paths = write_report(
            store,
            out,
            beta=beta,
            max_mp_drop=max_mp_drop,
            title=title,
            run_keys=run_keys,
            attack_keys=attack_keys,
        )
    except (StoreError, FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        _fail(str(err))
        return
    console.print(f"report: {paths.index} ({len(paths.figures)} figures); summary: {paths.summary}")


@app.command()
def audit(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run's output_dir: a split run recorded with --record, or a fedtrain run."
        ),
    ],
    attack_name: Annotated[
        list[str] | None,
        typer.Option(
            "--attack",
            help="Only these attacks, e.g. vmi, bli, membership, gradient_inversion (default: every one that applies).",
        ),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="A sweep's results store: suggest the best defense per attack.")
    ] = None,
    aux: Annotated[
        str | None, typer.Option(help="Auxiliary text: a file or a split of the run's dataset.")
    ] = None,
    max_examples: Annotated[int, typer.Option(min=1, help="Sequences attacked per attack.")] = 32,
    max_mp_drop: Annotated[
        float, typer.Option(min=0, help="Largest task drop a suggested defense may cost.")
    ] = 0.05,
    membership_references: Annotated[
        int,
        typer.Option(
            min=0,
            help="Reference models membership inference fine-tunes, each like the run (0: loss threshold only).",
        ),
    ] = 0,
    membership_examples: Annotated[
        int, typer.Option(min=1, help="Members membership inference scores, and as many non-members.")
    ] = 100,
    max_updates: Annotated[
        int,
        typer.Option(
            min=1,
            help="Client updates (secagg: round averages) gradient inversion attacks on a fedtrain --record "
            "recording; each is a gradient-matching search.",
        ),
    ] = 2,
    recording: Annotated[
        Path | None,
        typer.Option(
            "--recording",
            help="The run's recording, if not where results.json says (train/fedtrain --record DIR).",
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the audit as JSON here.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on the attacks' optimization loops.")] = True,
) -> None:
    """How much does this run leak? Every attack that applies to what crossed, with a verdict against chance.

    On a split run's recording: inversion and label inference, as the model party. On the
    fine-tuned model: membership inference (loss threshold; reference models and LiRA with
    --membership-references). On a federated run recorded with fedtrain --record: gradient
    inversion of up to --max-updates client updates from round 2 on (one SGD step of a causal LM:
    local_steps 1, optimizer sgd, no DP, pruning or LoRA dropout), scored against the clients'
    batches; under secagg, of the round's average. Where it cannot run, the audit says why.
    """
    import json

    from splitfed.bench.audit import audit_run
    from splitfed.bench.store import StoreError
    from splitfed.privacy.attacks import AttackConfigError, AttackError

    _quiet_libraries()
    try:
        report = audit_run(
            run_dir,
            attacks=attack_name,
            store=store,
            aux=aux,
            max_examples=max_examples,
            max_mp_drop=max_mp_drop,
            membership_references=membership_references,
            membership_examples=membership_examples,
            max_updates=max_updates,
            recording=recording,
            log=lambda s: console.print(s),
            progress=progress,
        )
    except _user_errors(AttackConfigError, AttackError, StoreError) as err:
        _fail(str(err))
        return
    party = "model party" if report.kind == "split" else "server"
    table = Table(
        title=f"leakage of {run_dir} ({report.kind} run: what an honest-but-curious {party} recovers)"
    )
    for column in ("attack", "reads", "metric", "score", "baseline", "verdict"):
        table.add_column(column)
    for f in report.findings:
        table.add_row(
            f.attack,
            f.crossing,
            f.metric or "",
            "" if f.score is None else f"{f.score:.3f}",
            "" if f.baseline is None else f"{f.baseline:.3f}",
            escape(f.verdict),  # may quote an error message
        )
    Console().print(table)
    for f in report.findings:
        for example in f.examples[:1]:
            console.print(f"[bold]{f.attack}[/bold] original:      {escape(example['original'])}")
            console.print(f"[bold]{f.attack}[/bold] reconstructed: {escape(example['reconstructed'])}")
        if f.detail:
            console.print(f"[bold]{f.attack}[/bold] {escape(f.detail)}")
        if f.suggestion:
            console.print(f"[bold]{f.attack}[/bold] best defense in {store}: {f.suggestion}")
    if json_out is not None:
        json_out.write_text(json.dumps(report.summary(), indent=2, default=str))
        console.print(f"audit: {json_out}")


@app.command()
def membership(
    run_dir: Annotated[Path, typer.Argument(help="A finished `train` or `fedtrain` run's output_dir.")],
    references: Annotated[
        int,
        typer.Option(min=0, help="Reference models to fine-tune on auxiliary data (0: loss threshold only)."),
    ] = 2,
    reference_steps: Annotated[
        int | None, typer.Option(min=1, help="Steps per reference model (default: the run's).")
    ] = None,
    max_examples: Annotated[
        int | None, typer.Option(min=1, help="Score at most this many members and as many non-members.")
    ] = 200,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON here.")
    ] = None,
) -> None:
    """Membership inference on a run's fine-tuned model: loss threshold, reference model, LiRA offline.

    Members are the run's training examples, non-members its evaluation split; reference models
    are fine-tuned like the run on the dataset's remaining split. Prints AUC and TPR at low FPR.
    """
    import json

    from splitfed.privacy.attacks import AttackError
    from splitfed.privacy.attacks.membership import membership_from_run

    _quiet_libraries()
    try:
        result = membership_from_run(
            run_dir,
            references=references,
            reference_steps=reference_steps,
            max_examples=max_examples,
            log=lambda s: console.print(s),
        )
    except _user_errors(AttackError, FileNotFoundError) as err:
        _fail(str(err))
        return
    table = Table(title=f"membership inference on {run_dir} ({result.n_examples} examples; chance AUC 0.5)")
    table.add_column("metric")
    table.add_column("value")
    for metric, value in result.metrics.items():
        table.add_row(metric, f"{value:.4f}")
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(result.summary(), indent=2))
        console.print(f"results: {json_out}")


@app.command()
def certs(
    directory: Annotated[
        Path, typer.Argument(help="Where to write ca.pem, server.pem/.key and client certificates.")
    ],
    host: Annotated[
        list[str] | None, typer.Option(help="Name or IP the server is reached by (repeatable).")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option(help="Data-party name for a client certificate (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 30,
) -> None:
    """Make a test certificate authority, a server certificate and client certificates (mutual TLS)."""
    from splitfed.transport.certs import make_test_ca

    paths = make_test_ca(directory, host or ["localhost", "127.0.0.1"], client or ["data-party"], days)
    for role, path in paths.items():
        console.print(f"{role:18s} {path}")
    console.print(
        "serve with: --tls-cert server.pem --tls-key server.key [--tls-ca ca.pem for mutual TLS]; "
        "join with: --tls-ca ca.pem [--tls-cert NAME.pem --tls-key NAME.key]"
    )


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
