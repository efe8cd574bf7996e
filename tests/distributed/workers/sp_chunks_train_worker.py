"""``train_steps_worker`` on a tiny llama with enough KV heads for the head-chunked Ulysses pipeline.

Usage: torchrun ... sp_chunks_train_worker.py OUT_JSON llama_chunked [key=value ...]: the keys of
``train_steps_worker`` plus ``chunks=C``: ``apply_sequence_parallel`` is asked for ``head_chunks=C``, and every
``UlyssesAttention`` the run builds must have ``C`` chunks. The model has 16 query / 8 KV heads, so with SP=2 each
rank holds 4 KV heads (C = 2: two chunks of two GQA groups, 4 query heads and 2 KV heads each).
"""

import sys

import train_steps_worker as base

from veofast.distributed import sequence_parallel
from veofast.utils.helper import exit_process

base.TINY["llama_chunked"] = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
                              "head_dim": 8}


def checked_apply(apply, chunks: int):
    def apply_and_check(model, ps, **kwargs):
        model = apply(model, ps, **{**kwargs, "head_chunks": chunks})
        found = [m.head_chunks for m in model.modules() if isinstance(m, sequence_parallel.UlyssesAttention)]
        if not found or any(c != chunks for c in found):
            raise AssertionError(f"expected every UlyssesAttention with head_chunks={chunks}, got {found}")
        return model

    return apply_and_check


if __name__ == "__main__":
    code = 0
    try:
        opts = dict(o.split("=", 1) for o in sys.argv[3:])
        if "chunks" in opts:
            sequence_parallel.apply_sequence_parallel = checked_apply(sequence_parallel.apply_sequence_parallel,
                                                                      int(opts["chunks"]))
        base.main()
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
