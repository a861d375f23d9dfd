import pytest
import torch

from sparse_grad.ops import BlockLayout


def test_numbering_over_odd_shapes():
    tensors = [torch.randn(10), torch.randn(0), torch.randn(3, 7), torch.randn(4), torch.randn(1)]
    layout = BlockLayout(tensors, block_size=4)
    assert layout.block_counts == (3, 0, 6, 1, 1)
    assert layout.num_blocks == 11
    assert layout.block_offsets.tolist() == [0, 3, 3, 9, 10, 11]
    assert layout.block_offsets.dtype == torch.int64
    assert layout.block_to_tensor().tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2, 3, 4]
    assert layout.block_numels().tolist() == [4, 4, 2, 4, 4, 4, 4, 4, 1, 4, 1]
    assert layout.block_range(2) == (3, 9)
    ids = torch.tensor([0, 2, 3, 8, 9, 10])
    assert layout.tensor_of_block(ids).tolist() == [0, 0, 2, 2, 3, 4]
    assert layout.matches([torch.empty(10), torch.empty(0), torch.empty(21), torch.empty(4), torch.empty(1)])
    assert not layout.matches(tensors[:-1])
    assert "num_blocks=11" in repr(layout)


def test_block_numels_sum_to_elements():
    tensors = [torch.randn(n) for n in torch.randint(0, 300, (20,)).tolist()]
    layout = BlockLayout(tensors, block_size=37)
    assert int(layout.block_numels().sum()) == sum(t.numel() for t in tensors)
    assert layout.block_to_tensor().numel() == layout.num_blocks


def test_empty_list():
    layout = BlockLayout([], block_size=8)
    assert layout.num_blocks == 0 and len(layout) == 0 and layout.device is None
    assert layout.block_offsets.tolist() == [0]


@pytest.mark.parametrize("block_size, error", [(0, ValueError), (-4, ValueError), (1.5, TypeError),
                                                (True, TypeError), ("4", TypeError)])
def test_bad_block_size(block_size, error):
    with pytest.raises(error, match="block_size"):
        BlockLayout([torch.randn(4)], block_size)


def test_rejects_bad_tensors():
    with pytest.raises(ValueError, match=r"tensors\[1\] is not contiguous"):
        BlockLayout([torch.randn(3), torch.randn(4, 5).t()], 4)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        BlockLayout([torch.randn(3), torch.randn(4, device="meta")], 4)
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int64"):
        BlockLayout([torch.arange(3)], 4)
    with pytest.raises(TypeError, match=r"tensors\[0\] is complex"):
        BlockLayout([torch.randn(3, dtype=torch.complex64)], 4)
    with pytest.raises(TypeError, match=r"tensors\[0\] is a sparse tensor"):
        BlockLayout([torch.randn(3, 3).to_sparse()], 4)
    with pytest.raises(TypeError, match="list of tensors"):
        BlockLayout(torch.randn(3), 4)


def test_cached_layout_is_built_once_per_shapes():
    from sparse_grad.layout import cached_layout

    a = cached_layout((40, 3, 17), 8, torch.device("cpu"))
    assert a is cached_layout((40, 3, 17), 8, torch.device("cpu"))
    assert a.block_counts == (5, 1, 3) and a.block_offsets.tolist() == [0, 5, 6, 9]
    assert cached_layout((40, 3, 17), 16, torch.device("cpu")) is not a
