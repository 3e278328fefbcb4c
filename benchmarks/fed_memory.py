"""Peak memory of simulating 1,000 federated clients of smollm2-135m in one process.

The simulation keeps one frozen base model; each client costs its adapters and optimizer state
only while it trains, and the server streams the clients' updates into its sum (secure
aggregation holds one masked vector per client of the round). This measures it: smollm2-135m,
classification on ``shakespeare-genre`` (4,800 training examples, IID over 1,000 clients, so
about 5 each), LoRA r=8 on q/v plus the task head, 10 % of the clients sampled per round, one
local step of batch 2 x 32 tokens (memory, not accuracy, is measured), for each aggregator
(``plain``, ``ckks``, ``secagg``), each run in a fresh process that reports its own peak resident
set size (``getrusage``'s ``ru_maxrss``, model loading included). The baseline is the same run
with 10 clients (one per round), so the printed difference is what the 990 extra clients cost.

    python benchmarks/fed_memory.py            # 1,000 clients, 100 per round, 2 rounds, each aggregator
    python benchmarks/fed_memory.py --quick    # 1,000 clients, 10 per round, 1 round, plain and ckks (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <= <target>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from typing import Any

TARGET_GB = 3.0


def _raw_config(
    clients: int, fraction: float, rounds: int, aggregation: str, threads: int | None = None
) -> dict[str, Any]:
    lora = {"mode": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    return {
        "task": "classification",
        "model": {"name": "smollm2-135m"},
        "data": {"name": "shakespeare-genre", "max_length": 32, "max_eval": 8},
        "train": {
            "batch_size": 2,
            "lr": 1e-3,
            "seed": 0,
            "eval_before": False,
            "eval_max_new_tokens": 0,
            "threads": threads,
        },
        "federated": {
            "clients": clients,
            "sample_fraction": fraction,
            "rounds": rounds,
            "local_steps": 1,
            "partition": "iid",
            "aggregation": aggregation,
            "finetune": lora,
        },
        "output_dir": tempfile.mkdtemp(prefix=f"splitfed-bench-fed-{aggregation}-"),
    }


def _run(raw: dict[str, Any], results: Any) -> None:
    """One federated run in this (fresh) process; puts its peak RSS and figures on ``results``."""
    import resource

    from transformers.utils import logging as hf_logging

    from splitfed.config import parse_config
    from splitfed.federated.simulation import fedtrain

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    result = fedtrain(parse_config(raw), progress=False, log=lambda _: None)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    summary = result.summary
    results.put(
        {
            "peak_rss_gb": peak_kb / 1024**2,
            "seconds": time.perf_counter() - start,
            "mean_round_s": summary["timings"]["mean_round_s"],
            "bytes_per_round": summary["bytes_per_round"],
            "setup_bytes": summary["setup_bytes"],
            "clients_per_round": summary["clients_per_round"],
            "accuracy": summary["metrics_after"].get("accuracy"),
        }
    )


def measure(raw: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``raw`` in a spawned process; what it reported."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=_run, args=(raw, results))
    process.start()
    try:
        report: dict[str, Any] = results.get(timeout=timeout_s)
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="10 clients per round, 1 round, plain and ckks")
    args = parser.parse_args()
    aggregations = ["plain", "ckks", "secagg"]
    if args.quick:
        args.fraction, args.rounds, aggregations = 0.01, 1, ["plain", "ckks"]
    print(
        f"smollm2-135m, LoRA r=8 on q/v + task head, {args.clients} clients, {args.fraction:.0%} per round, "
        f"{args.rounds} round(s) of 1 local step (batch 2 x 32), one process per run, "
        f"{args.threads or 'default'} torch threads"
    )
    baseline = None
    if not args.quick:
        baseline = measure(_raw_config(10, 0.1, args.rounds, "plain", args.threads))
        print(f"  {'baseline (10 clients)':24s} peak RSS {baseline['peak_rss_gb']:.2f} GB")
    runs = {}
    for aggregation in aggregations:
        r = measure(_raw_config(args.clients, args.fraction, args.rounds, aggregation, args.threads))
        runs[aggregation] = r
        b = r["bytes_per_round"]
        extra = f" (+{r['peak_rss_gb'] - baseline['peak_rss_gb']:.2f} GB)" if baseline else ""
        print(
            f"  {aggregation:24s} peak RSS {r['peak_rss_gb']:.2f} GB{extra}, {r['clients_per_round']} clients per round, "
            f"{r['mean_round_s']:.1f} s per round; per round {b['up'] / 1e6:.1f} MB up, {b['down'] / 1e6:.1f} MB down, "
            f"{b['update_per_client'] / 1e6:.2f} MB per client update (fp32 {b['fp32_update'] / 1e6:.2f} MB); "
            f"key setup {r['setup_bytes']['up'] / 1e6:.1f} MB up"
        )
    for aggregation, r in runs.items():
        print(f"BENCH fed_1000_clients_peak_rss_gb_{aggregation} {r['peak_rss_gb']:.2f} <= {TARGET_GB}")
    peak = max(r["peak_rss_gb"] for r in runs.values())
    print(f"BENCH fed_1000_clients_peak_rss_gb {peak:.2f} <= {TARGET_GB}")


if __name__ == "__main__":
    main()
