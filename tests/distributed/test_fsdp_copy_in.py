"""The FSDP2 gradient copy-in replacement equals torch._chunk_cat, and FSDP2 picks it up."""

import pytest
import torch

from veofast.distributed.fsdp_copy_in import copy_in_gradients, install_reduce_scatter_copy_in


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_copy_in_matches_chunk_cat(world_size, out_dtype):
    gen = torch.Generator().manual_seed(world_size)
    shapes = [(7, 5), (8,), (3, 2, 4), (1, 9), (12, 3)]  # dim 0 not always divisible: padded with zeros
    grads = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    width = sum(-(-s[0] // world_size) * (torch.Size(s).numel() // s[0]) for s in shapes)
    want = torch.full((world_size, width), float("nan"), dtype=out_dtype)
    torch._chunk_cat(grads, 0, world_size, out=want)
    got = torch.full((world_size * width,), float("nan"), dtype=out_dtype)
    copy_in_gradients(grads, got, world_size)
    assert torch.equal(got.view(world_size, width), want)


def test_copy_in_rejects_a_buffer_of_the_wrong_size():
    with pytest.raises(ValueError, match="columns per rank"):
        copy_in_gradients([torch.ones(4, 2)], torch.empty(2 * 5), 2)


def test_fsdp2_uses_the_copy_in():
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    assert install_reduce_scatter_copy_in()
    assert _fsdp_collectives.foreach_reduce_scatter_copy_in is copy_in_gradients
    assert install_reduce_scatter_copy_in()  # idempotent
