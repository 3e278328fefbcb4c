"""Cost and strength of the token inversion attacks on a real recording of smollm2-135m.

An undefended HT run (SplitLoRA r=8 on q/v, causal LM on ``shakespeare``, sequences of 32 tokens,
labels at the data party) trains one step of ``--sequences`` sequences with ``record=DIR``; the
attacks read the activations its model party received (``forward.hidden``) and are scored against
the run's ground truth. The attacker knows the public pretrained weights and 256 auxiliary texts
(the dataset's test split, disjoint from the training sequences attacked).

First VMI (white-box inversion with the causal left-to-right search) on every recorded sequence
at split block 2, timed, beside the linear baseline and chance; then prompt recovery in split
inference: ``--prompts`` held-out prompts (the first ``--seq`` tokens of test-split texts not in
the auxiliary set) are generated from greedily, ``--new-tokens`` each, at the same split with
the generation recorded (``gen_start`` and every ``gen_step``), and VMI recovers prompts and
generated text from what the model party received; then the token F1 of VMI, RI, BiSR and the
linear baseline at split blocks 1, 2, 4 and 8 (fewer sequences), printed whatever it shows
(VFLAIR-LLM reports inversion getting harder as the split moves deeper).

    python benchmarks/attack_cost.py            # 64 x 32 at block 2; 16 prompts; table of 16 sequences at 1, 2, 4, 8
    python benchmarks/attack_cost.py --quick    # 8 x 16 at block 2 and 4 prompts, no table (< 1 minute)

Ends with one line per target: ``BENCH <name> <measured> <op> <target>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import smollm2_splitlora_config

TARGET_MINUTES = 5.0
TARGET_F1 = 0.9
AUX_TEXTS = 256
ATTACKS: list[dict[str, Any]] = [
    {"name": "vmi"},
    {"name": "ri"},
    {"name": "bisr", "epochs": 10},
    {"name": "linear"},
]


def _raw(head_layers: int, sequences: int, seq: int, out: Path) -> dict[str, Any]:
    raw = smollm2_splitlora_config(
        "data",
        "attack-cost",
        head_layers,
        steps=1,
        batch_size=sequences,
        eval_before=False,
        eval_max_new_tokens=0,
    )
    raw["data"] |= {"max_length": seq, "max_train": 4 * sequences, "max_eval": 1}
    shutil.rmtree(raw["output_dir"], ignore_errors=True)
    raw["output_dir"] = str(out / f"run-{head_layers}")
    return raw


_TRAIN = """
import json, sys
from transformers.utils import logging
from splitfed.config import parse_config
from splitfed.run import train

logging.set_verbosity_error()
logging.disable_progress_bar()
train(parse_config(json.loads(sys.argv[1])), progress=False, log=lambda _: None, record=sys.argv[2])
"""


_GENERATE = """
import json, sys
from transformers.utils import logging
from splitfed.config import parse_config
from splitfed.privacy.recording import GroundTruthWriter, RecordingWriter, ground_truth_dir
from splitfed.runtime import open_generator
from splitfed.split.decoding import DecodingConfig

logging.set_verbosity_error()
logging.disable_progress_bar()
cfg, path, prompts = parse_config(json.loads(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3])
decoding = DecodingConfig(max_new_tokens=int(sys.argv[4]))
with RecordingWriter(path, tap="in_process_channel") as recorder, GroundTruthWriter(
    ground_truth_dir(path)
) as truth, open_generator(cfg, decoding=decoding, recorder=recorder, ground_truth=truth.generation) as gen:
    gen.generate(prompts)
"""


def record_generation(raw: dict[str, Any], prompts: list[str], new_tokens: int, path: Path) -> Path:
    """A recorded greedy generation from ``prompts`` (one batch) with the run of ``raw`` (fresh process)."""
    args = [json.dumps(raw), str(path), json.dumps(prompts), str(new_tokens)]
    subprocess.run([sys.executable, "-c", _GENERATE, *args], check=True)
    return path


def held_out_prompts(cfg: Any, skip: int, count: int, tokens: int) -> list[str]:
    """``count`` prompts of about ``tokens`` tokens: test-split texts after the first ``skip``
    (which are the attacker's auxiliary text), cut to their first ``tokens`` tokens."""
    from splitfed.models.loading import load_tokenizer
    from splitfed.privacy.attack_runs import auxiliary_texts

    tokenizer = load_tokenizer(cfg.model.name)
    texts = auxiliary_texts(_all_test(cfg), limit=skip + 4 * count)[skip:]
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            prompts.append(tokenizer.decode(ids[:tokens]).strip())
        if len(prompts) == count:
            break
    if len(prompts) < count:
        raise SystemExit(f"only {len(prompts)} held-out test texts of {tokens}+ tokens; lower --prompts")
    return prompts


def record(head_layers: int, sequences: int, seq: int, scratch: Path) -> tuple[Path, Any]:
    """One recorded training step at ``head_layers`` (in a fresh process, as the data and model
    parties' own processes would run it); the recording and the run's config."""
    from splitfed.config import parse_config

    raw = _raw(head_layers, sequences, seq, scratch)
    path = scratch / f"rec-{head_layers}"
    subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(raw), str(path)], check=True)
    return path, parse_config(raw)


def attack(spec: dict[str, Any], path: Path, cfg: Any, sequences: int, aux: list[str]) -> Any:
    """``spec`` run on the recording's training forwards (at most ``sequences``), scored."""
    from splitfed.privacy.attack_runs import attack_context
    from splitfed.privacy.attacks import build_attack, run_attack

    context = attack_context(cfg, aux, max_examples=sequences)
    return run_attack(build_attack(spec), path, context, phases="train")


def _all_test(cfg: Any) -> Any:
    """``cfg`` without its ``max_eval`` cap: the auxiliary text is the whole test split."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_eval": None})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64, help="sequences VMI inverts at block 2")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--blocks", default="1,2,4,8", help="split blocks of the table")
    parser.add_argument("--table-sequences", type=int, default=16, help="sequences per cell of the table")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts of the generation attacked")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 x 16 at block 2, no table: under a minute")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.seq, args.blocks, args.table_sequences = 8, 16, "", 0
        args.prompts, args.new_tokens = 4, 8
    import torch
    from transformers.utils import logging as hf_logging

    from splitfed.privacy.attack_runs import auxiliary_texts

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    blocks = [int(b) for b in args.blocks.split(",") if b]
    scratch = Path(tempfile.mkdtemp(prefix="splitfed-bench-attack-cost-"))
    t0 = time.perf_counter()
    print(
        f"smollm2-135m, HT, SplitLoRA r=8 q/v, causal LM on shakespeare, no defense; {args.sequences} x "
        f"{args.seq} tokens attacked at split block 2, {args.threads} threads, {AUX_TEXTS} auxiliary texts"
    )
    try:
        path, cfg = record(2, args.sequences, args.seq, scratch)
        aux = auxiliary_texts(_all_test(cfg), limit=AUX_TEXTS)
        vmi = attack({"name": "vmi"}, path, cfg, args.sequences, aux)
        minutes = vmi.seconds / 60
        f1 = vmi.metrics["token_f1"]
        print(
            f"  vmi: {vmi.n_examples} sequences in {vmi.seconds:.1f} s, token F1 {f1:.3f} "
            f"(linear baseline {vmi.baseline.get('token_f1', float('nan')):.3f}, chance {vmi.chance:.3f})"
        )
        for example in vmi.examples[:2]:
            print(f"    original:      {example.original[:90]!r}")
            print(f"    reconstructed: {example.reconstructed[:90]!r}")
        from splitfed.privacy.attack_runs import attack_context
        from splitfed.privacy.attacks import build_attack, run_generation_attack

        prompts = held_out_prompts(cfg, AUX_TEXTS, args.prompts, args.seq)
        generation = record_generation(
            _raw(2, args.sequences, args.seq, scratch), prompts, args.new_tokens, scratch / "gen-2"
        )
        recovered = run_generation_attack(
            build_attack({"name": "vmi"}), generation, attack_context(cfg, aux), baseline=False
        )
        prompt_f1 = recovered.metrics["prompt_token_f1"]
        print(
            f"  prompt recovery (vmi on a generate recording, {args.prompts} prompts of ~{args.seq} tokens, "
            f"{args.new_tokens} new each): prompt token F1 {prompt_f1:.3f}, generated "
            f"{recovered.metrics['generated_token_f1']:.3f}, all {recovered.metrics['token_f1']:.3f} "
            f"in {recovered.seconds:.1f} s"
        )
        if blocks:
            names = [str(s["name"]) for s in ATTACKS]
            print(f"  token F1 by split block ({args.table_sequences} sequences each; seconds in brackets)")
            print("    block  " + "  ".join(f"{n:>13}" for n in names) + "   chance")
            for block in blocks:
                rec, rec_cfg = (path, cfg) if block == 2 else record(block, args.sequences, args.seq, scratch)
                row, chance = [], 0.0
                for spec in ATTACKS:
                    result = attack(spec, rec, rec_cfg, args.table_sequences, aux)
                    row.append(f"{result.metrics['token_f1']:.3f} ({result.seconds:4.0f})")
                    chance = result.chance
                print(f"    {block:>5}  " + "  ".join(f"{c:>13}" for c in row) + f"   {chance:.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"  total {time.perf_counter() - t0:.0f} s")
    print(f"BENCH vmi_{args.sequences}x{args.seq}_minutes {minutes:.2f} <= {TARGET_MINUTES:.0f}")
    print(f"BENCH vmi_f1_split2 {f1:.3f} >= {TARGET_F1}")
    print(f"BENCH prompt_recovery_f1_split2 {prompt_f1:.3f} >= {TARGET_F1}")


if __name__ == "__main__":
    main()
