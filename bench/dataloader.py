"""Dataloader throughput on CPU: tokens/s delivered with dynamic batching (rmpad) on embedded-style data.

A JSONL corpus in the style of the embedded data (short documents mixing arithmetic, key-value recall, list
tasks and simple sentences; log-normal lengths) is synthesized in a temporary directory, tokenized with the
project's tokenizer (``tokenizers/tiny`` when present, else a byte-level one built in memory), packed into
8192-token micro-batches (micro_batch_size 2 x max_seq_len 4096) and collated. Throughput counts the tokens in
the delivered micro-batches, everything included (reading, JSON, tokenizing, shuffling, packing, collating,
moving between processes); the "pretokenized" rows give the loader alone (shuffle, packing, collation,
transfer) on samples tokenized beforehand. It is compared with what one H200 consumes training a 1B model
(~40k tokens/s, ANCHORS.md; the goal is >= 20x).

Run: ``python bench/dataloader.py [--docs 20000 --steps 150]``; results append to ``bench/results/dataloader.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for ``bench`` when run as python bench/<suite>.py

from bench.common import print_table, record  # noqa: E402
from veofast.data import build_dataloader, build_iterative_dataset, build_mapping_dataset
from veofast.data.data_transform import process_pretrain_example
from veofast.data.packing import cpp_available

H200_1B_TOKENS_PER_S = 40_000
WORDS = "the a small red cat dog bird sees finds likes near under garden river house tom ann they we".split()


def synth_document(rng: random.Random) -> str:
    lines = []
    for _ in range(max(1, int(rng.lognormvariate(1.8, 0.8)))):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            keys = {f"k{rng.randrange(10)}": rng.choice(WORDS) for _ in range(4)}
            key = rng.choice(list(keys))
            lines.append(" ".join(f"{k}={v}" for k, v in keys.items()) + f" ? {key} -> {keys[key]}")
        elif kind == 2:
            values = [rng.randrange(100) for _ in range(rng.randrange(3, 9))]
            lines.append("sort: " + " ".join(map(str, values)) + " -> " + " ".join(map(str, sorted(values))))
        else:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12))).capitalize() + ".")
    return "\n".join(lines)


def write_corpus(path: Path, docs: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": synth_document(rng)}) + "\n")


def load_tokenizer():
    from transformers import AutoTokenizer

    here = Path(__file__).resolve().parent.parent / "tokenizers" / "tiny"
    if (here / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(here)), "tokenizers/tiny"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>"), "byte-level"


def measure(dataset, *, num_workers: int, steps: int, warmup_steps: int = 3) -> dict:
    loader = build_dataloader(
        dataset,
        micro_batch_size=2,
        global_batch_size=2,
        max_seq_len=4096,
        rmpad=True,
        dyn_bsz_buffer_size=200,
        num_workers=num_workers,
        dp_rank=0,
        dp_size=1,
    )
    for _ in range(warmup_steps):  # worker start-up and the first buffers
        next(loader)
    tokens, micro_batches, start = 0, 0, time.perf_counter()
    for _ in range(steps):
        for mb in next(loader):
            tokens += mb["input_ids"].shape[1]
            micro_batches += 1
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": tokens / elapsed,
        "vs_h200_1b": tokens / elapsed / H200_1B_TOKENS_PER_S,
        "fill": tokens / (micro_batches * 8192),
        "micro_batches": micro_batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000, help="documents in the synthesized corpus")
    parser.add_argument("--steps", type=int, default=150, help="steps (8192-token micro-batches) timed per config")
    parser.add_argument("--workers", default="0,2", help="comma-separated dataloader worker counts to time")
    parser.add_argument("--quick", action="store_true", help="5,000 documents and 50 steps per config")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.steps = 5_000, 50
    tokenizer, tokenizer_name = load_tokenizer()
    transform = partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.jsonl"
        write_corpus(corpus, args.docs)
        for datasets_type in ("iterable", "mapping", "pretokenized"):
            if datasets_type == "iterable":
                dataset = build_iterative_dataset(corpus, transform, seed=0)
            elif datasets_type == "mapping":
                dataset = build_mapping_dataset(corpus, transform)
            else:  # the loader alone: samples tokenized beforehand (a custom map-style dataset)
                mapping = build_mapping_dataset(corpus, transform)
                dataset = [s for i in range(len(mapping)) for s in mapping[i]]
            for num_workers in (int(w) for w in args.workers.split(",")):
                row = {
                    "datasets_type": datasets_type,
                    "num_workers": num_workers,
                    "tokenizer": tokenizer_name,
                    "packer": "cpp" if cpp_available() else "python",
                    "cpus": os.cpu_count(),
                    **measure(dataset, num_workers=num_workers, steps=args.steps),
                }
                rows.append(record("dataloader", row))
    print(f"dataloader throughput, rmpad, 8192-token micro-batches, goal >= 20x {H200_1B_TOKENS_PER_S} tokens/s")
    print_table(rows, ["datasets_type", "num_workers", "tokens_per_s", "vs_h200_1b", "fill", "packer", "tokenizer"])


if __name__ == "__main__":
    main()
