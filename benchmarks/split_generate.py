"""Split generation speed and bytes vs the unsplit model's cached ``generate``, in one run.

For smollm2-135m (HT, 2 head blocks), a 64-token prompt and 64 new tokens, batch 1 and 8:

* unsplit: ``model.generate`` with its KV cache (the baseline);
* split in process: :class:`SplitGenerator`, a cache on each side, one hidden vector per step;
* split over loopback gRPC: the model party in a second process (``splitfed serve`` code path);
* no-cache split (VFLAIR-LLM style): every step recomputes and resends the whole prefix and the
  logits come back.

    python benchmarks/split_generate.py            # full
    python benchmarks/split_generate.py --quick    # batch 1, 16 new tokens (< 1 minute)

Ends with ``BENCH <name> <measured> <op> <target>`` lines.
"""

from __future__ import annotations

import os

# Two processes share two cores on loopback: OpenMP threads that spin while the other side
# computes would steal its CPU. Set before torch loads; the server process inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _bench import interleaved_times, model_party_process
from transformers.utils import logging as hf_logging

MODEL = "smollm2-135m"
HEAD_LAYERS = 2


def _raw_config(out: Path) -> dict:  # type: ignore[type-arg]
    return {
        "task": "causal_lm",
        "model": {"name": MODEL},
        "data": {"name": "shakespeare"},
        "split": {"setting": "ht", "head_layers": HEAD_LAYERS},
        "mode": "splitfrozen",
        "finetune": {"body": {"mode": "frozen"}},
        "train": {"steps": 1},
        "output_dir": str(out),
    }


def _prompts(tokenizer, batch: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(batch):
        ids = torch.randint(100, 20000, (length,), generator=g).tolist()
        texts.append(tokenizer.decode(ids))
    # re-tokenizing may change lengths slightly; trim to `length` tokens
    return [tokenizer.decode(tokenizer(t)["input_ids"][:length]) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="batch 1, 32-token prompt, 16 new tokens, 1 repeat"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from splitfed.config import parse_config
    from splitfed.models.loading import load_model, load_tokenizer
    from splitfed.runtime import open_generator
    from splitfed.split.decoding import DecodingConfig

    batches, prompt_len, new_tokens, repeats = (
        ([1], 32, 16, 1) if args.quick else (args.batches, 64, 64, args.repeats)
    )
    raw = _raw_config(Path(tempfile.mkdtemp(prefix="splitfed-bench-")))
    cfg = parse_config(raw)
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, "causal_lm").eval()
    hidden = model.config.hidden_size
    decoding = DecodingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    print(
        f"{MODEL}: HT head={HEAD_LAYERS}, prompt {prompt_len} tokens, {new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    results: dict[str, float] = {}
    with model_party_process(raw) as port:
        local = open_generator(cfg, decoding=decoding)
        remote = open_generator(cfg, target=f"127.0.0.1:{port}", decoding=decoding)
        for batch in batches:
            results |= _measure(batch, tokenizer, model, local, remote, prompt_len, new_tokens, repeats)
        local.close()
        remote.close()
        remote.channel.close()
    bound = hidden * 4 * 1.05 + 64
    for name, value in results.items():
        if name.startswith("split_generate_inprocess"):
            print(f"BENCH {name} {value:.3f} >= 0.9")
        elif name.startswith("split_generate_grpc"):
            print(f"BENCH {name} {value:.3f} >= 0.8")
        elif name.startswith("split_generate_bytes"):
            print(f"BENCH {name} {value:.0f} <= {bound:.0f}")
        else:
            print(f"INFO {name} {value:.1f}x (cached split vs no-cache split tokens/s)")


def _measure(batch, tokenizer, model, local, remote, prompt_len, new_tokens, repeats) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Tokens/s of the four ways to generate, and bytes, for one batch size."""
    hidden = model.config.hidden_size
    prompts = _prompts(tokenizer, batch, prompt_len)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    tokens = batch * new_tokens

    def unsplit() -> None:
        with torch.no_grad():
            model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    def run(gen) -> None:  # type: ignore[no-untyped-def]
        ids = gen.generate_ids(prompts)
        assert all(len(r) == new_tokens for r in ids)

    def no_cache(gen) -> None:  # type: ignore[no-untyped-def]
        """VFLAIR-LLM style: recompute and resend the whole prefix every step; logits come back."""
        data_party = _data_party(gen)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        for _ in range(new_tokens):
            logits = data_party.predict({"input_ids": ids, "attention_mask": mask})
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)

    times = interleaved_times(
        {"unsplit": unsplit, "local": lambda: run(local), "remote": lambda: run(remote)}, repeats
    )
    t_unsplit, t_local, t_remote = (statistics.median(times[k]) for k in ("unsplit", "local", "remote"))
    local.channel.reset_counters()
    run(local)
    local_bytes = local.channel.bytes_to_model + local.channel.bytes_to_data
    remote.channel.reset_counters()
    run(remote)
    remote_bytes = remote.channel.bytes_to_model + remote.channel.bytes_to_data
    # The no-cache baseline is slow: one run, timed and counted at once (everything is warm by now).
    local.channel.reset_counters()
    t_nocache = interleaved_times({"nocache": lambda: no_cache(local)}, 1, warmup=False)["nocache"][0]
    nocache_bytes = local.channel.bytes_to_model + local.channel.bytes_to_data
    per_token_wire = _per_step_bytes(remote, prompts) / batch
    tps = {
        k: tokens / t
        for k, t in (("unsplit", t_unsplit), ("local", t_local), ("grpc", t_remote), ("nocache", t_nocache))
    }
    print(
        f"  batch {batch}: tokens/s unsplit {tps['unsplit']:.1f}, split in-process {tps['local']:.1f}, "
        f"split gRPC {tps['grpc']:.1f}, no-cache split {tps['nocache']:.1f}"
    )
    print(
        f"           bytes per run: split in-process {local_bytes / 1e3:.1f} kB, gRPC {remote_bytes / 1e3:.1f} kB, "
        f"no-cache {nocache_bytes / 1e6:.1f} MB; per decoding step per sequence on the wire: {per_token_wire:.0f} B "
        f"(hidden {hidden} x 4 = {hidden * 4} B)"
    )
    return {
        f"split_generate_inprocess_b{batch}": tps["local"] / tps["unsplit"],
        f"split_generate_grpc_b{batch}": tps["grpc"] / tps["unsplit"],
        f"split_generate_bytes_per_token_b{batch}": per_token_wire,
        f"nocache_slowdown_b{batch}": tps["local"] / tps["nocache"],
    }


def _data_party(gen):  # type: ignore[no-untyped-def]
    from splitfed.split.system import build_data_party

    segments = {"head": gen.head} | ({"tail": gen.tail} if gen.tail is not None else {})
    return build_data_party(segments, gen.channel, lambda lg, b: lg.sum())


def _per_step_bytes(gen, prompts) -> float:  # type: ignore[no-untyped-def]
    """Wire bytes of one decoding step (both directions), measured as the difference of two lengths."""
    from dataclasses import replace

    sizes = []
    base = gen.decoding
    for n in (4, 12):
        gen.decoding = replace(base, max_new_tokens=n)
        gen.channel.reset_counters()
        gen.generate_ids(prompts)
        sizes.append(gen.channel.bytes_to_model + gen.channel.bytes_to_data)
    gen.decoding = base
    return (sizes[1] - sizes[0]) / 8


if __name__ == "__main__":
    main()
