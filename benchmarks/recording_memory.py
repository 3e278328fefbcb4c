"""Peak memory of a split run that records every crossing to disk vs the same run without recording.

smollm2-135m, HT with 2 head blocks, SplitLoRA (LoRA r=8 on q/v on both sides), causal LM on
``shakespeare``, labels at the data party: per step the model party returns the logits
(batch x seq x 49152 fp32: 201 MB at 8 x 128) and receives their gradient (as much again), so a
few steps move more than a gigabyte. Both runs are ``splitfed.run.train`` with the same config,
each in a fresh process (spawned one after the other, so they never share the cores); the
recorded one passes ``record=DIR`` (:class:`~splitfed.privacy.recording.RecordingWriter` with
its default 64 MiB shards, plus the ground truth). Each process reports its own peak resident
set size (``getrusage``'s ``ru_maxrss``), which includes loading the model; the figure printed
is the difference. Written files sit in the page cache, which is not part of a process's RSS.

    python benchmarks/recording_memory.py            # batch 8 x 128, 5 steps: about 2 GB recorded
    python benchmarks/recording_memory.py --quick    # batch 2 x 64, 2 steps (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <= <target>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import smollm2_splitlora_config

HEAD_LAYERS = 2
TARGET_MB = 300.0
MIN_RECORDED_BYTES = 10**9


def _raw_config(batch: int, seq: int, steps: int) -> dict[str, Any]:
    raw = smollm2_splitlora_config(
        "data",
        "recording",
        HEAD_LAYERS,
        steps=steps,
        batch_size=batch,
        eval_before=False,
        eval_max_new_tokens=0,
    )
    raw["data"] |= {"max_length": seq, "max_train": 64 * batch, "max_eval": batch}
    return raw


def _run(raw: dict[str, Any], record: str | None, results: Any) -> None:
    """One run in this (fresh) process; puts its peak RSS and what it recorded on ``results``."""
    import resource

    from transformers.utils import logging as hf_logging

    from splitfed.config import parse_config
    from splitfed.run import train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    result = train(parse_config(raw), progress=False, log=lambda _: None, record=record)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    recorded = sum(p.stat().st_size for p in Path(record).rglob("*") if p.is_file()) if record else 0
    results.put(
        {
            "peak_rss_mb": peak_kb / 1024,
            "seconds": seconds,
            "mean_step_s": result.summary["timings"]["mean_step_s"],
            "recorded_bytes": recorded,
            "recording": result.summary.get("recording"),
            "bytes_per_step": result.summary["bytes_per_step"],
        }
    )


def measure(raw: dict[str, Any], record: str | None, timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``raw`` (recording into ``record`` when given) in a spawned process; what it reported."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=_run, args=(raw, record, results))
    process.start()
    try:
        out: dict[str, Any] = results.get(timeout=timeout_s)
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
    if process.exitcode != 0:
        raise RuntimeError(f"the {'recording' if record else 'plain'} run exited with {process.exitcode}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64, 2 steps: under a minute")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps = 2, 64, 2
    raw = _raw_config(args.batch, args.seq, args.steps)
    scratch = Path(tempfile.mkdtemp(prefix="splitfed-bench-recording-"))
    t0 = time.perf_counter()
    print(
        f"smollm2-135m: HT head={HEAD_LAYERS}, SplitLoRA r=8 q/v, causal LM on shakespeare, labels at the data "
        f"party, batch {args.batch} x {args.seq} tokens, {args.steps} steps + one evaluation batch"
    )
    try:
        plain = measure(raw | {"output_dir": str(scratch / "plain")}, None)
        recorded = measure(raw | {"output_dir": str(scratch / "recorded")}, str(scratch / "recording"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(raw["output_dir"], ignore_errors=True)
    increase = recorded["peak_rss_mb"] - plain["peak_rss_mb"]
    rec = recorded["recording"]
    per_step = plain["bytes_per_step"]
    print(
        f"  crossing per step: to model {per_step['to_model'] / 1e6:.1f} MB, to data {per_step['to_data'] / 1e6:.1f} MB"
    )
    print(
        f"  without recording: peak RSS {plain['peak_rss_mb']:.0f} MB, {plain['mean_step_s']:.2f} s/step, "
        f"run {plain['seconds']:.1f} s"
    )
    print(
        f"  recording:         peak RSS {recorded['peak_rss_mb']:.0f} MB, {recorded['mean_step_s']:.2f} s/step, "
        f"run {recorded['seconds']:.1f} s; wrote {recorded['recorded_bytes'] / 1e9:.3f} GB "
        f"({rec['records']} crossings, {rec['stored_bytes'] / 1e9:.3f} GB of tensors in {rec['shards']} shards, "
        "ground truth included)"
    )
    if not args.quick and recorded["recorded_bytes"] < MIN_RECORDED_BYTES:
        print(f"  note: recorded less than {MIN_RECORDED_BYTES / 1e9:.0f} GB; raise --steps or --batch")
    print(f"  peak RSS increase {increase:.1f} MB; total {time.perf_counter() - t0:.0f}s")
    print(f"BENCH recording_rss_increase_mb {increase:.1f} <= {TARGET_MB:.0f}")


if __name__ == "__main__":
    main()
