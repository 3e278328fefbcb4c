"""What the benchmark scripts share: taking turns between timed variants, a model party in a process."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def interleaved_times(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True
) -> dict[str, list[float]]:
    """Seconds of each call per repeat, the variants taking turns so that drift hits all alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def smollm2_splitlora_config(labels_at: str, name: str, head_layers: int = 2, **train: Any) -> dict[str, Any]:
    """The raw config the loopback and latency benchmarks share: smollm2-135m, HT, LoRA r=8 q/v both sides.

    A constant learning rate, so every measured step does the same work; ``train`` adds keys.
    """
    import tempfile

    lora = {"mode": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return {
        "task": "causal_lm",
        "mode": "splitlora",
        "model": {"name": "smollm2-135m"},
        "data": {"name": "shakespeare"},
        "split": {"setting": "ht", "head_layers": head_layers, "labels_at": labels_at},
        "finetune": {"head": lora, "body": lora},
        "train": {"steps": 100_000, "lr": 1e-4, "scheduler": "constant", "seed": 0, **train},
        "output_dir": tempfile.mkdtemp(prefix=f"splitfed-bench-{name}-"),
    }


def _serve(raw: dict[str, Any], port_queue: Any, stop: Any) -> None:
    from transformers.utils import logging as hf_logging

    from splitfed.config import parse_config
    from splitfed.runtime import start_server

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    server = start_server(parse_config(raw), port=0, log=lambda _: None)
    port_queue.put(server.port)
    stop.wait()
    server.stop()


@contextmanager
def model_party_process(raw_config: dict[str, Any], timeout_s: float = 300) -> Iterator[int]:
    """Serve the model party of ``raw_config`` in a second process (as `splitfed serve`); yields its port."""
    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=_serve, args=(raw_config, port_queue, stop), daemon=True)
    server.start()
    try:
        yield int(port_queue.get(timeout=timeout_s))
    finally:
        stop.set()
        server.join(timeout=30)
        if server.is_alive():
            server.terminate()
