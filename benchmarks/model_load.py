"""Load time of the converted offline model, in a fresh process (target: under 2 s).

    python benchmarks/model_load.py [--quick]

Imports transformers' Llama code first (a one-off cost of any transformers program), then times
``from_pretrained`` of the safetensors asset: the first (cold) load is the one that counts; later
loads in the same process are printed for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGET_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description="Time loading the converted smollm2-135m asset.")
    parser.add_argument("--quick", action="store_true", help="3 loads instead of 5")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splitfed.assets import resolve_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model(args.model)
    times = []
    for _ in range(3 if args.quick else 5):
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(path)
        times.append(time.perf_counter() - start)
    print(f"{args.model}: load times {', '.join(f'{t:.2f}' for t in times)} s")
    print(f"  first load {times[0]:.2f} s, median of the rest {statistics.median(times[1:]):.2f} s")
    print(f"BENCH model_load_first_s {times[0]:.2f} <= {TARGET_S}")


if __name__ == "__main__":
    main()
