"""peftcalc.backward.run_backward_both: a block's plain and checkpointed replays in one walk, by hand."""

from peftcalc.backward import Node, run_backward, run_backward_both


def test_both_replays_by_hand():
    """y = relu(h), h = x @ W^T + b with x the block's input (id 1, 40 bytes, saved by the matmul: under
    checkpointing it is the checkpoint's input, counted outside the block), h (id 2, 64 bytes) saved by
    relu, and a 30-byte tensor (id 5) the matmul saves too. The matmul makes dx (40 bytes), returns, and
    the engine then sums the bias gradient (200 bytes, a .grad: the "returned" step). Checkpointed: the
    recompute peaks at 100 bytes, 50 of them saved into the checkpoint's frame."""
    mm = Node(out=2, steps=(("new", "dx", 40), ("returned",), ("param", 200)), outputs=((1, "dx"),), saved=(1, 5),
              unpacks=True)
    relu = Node(out=3, steps=(("new", "dh", 64),), outputs=((2, "dh"),), saved=(2,), unpacks=True)
    saved = {1: 40, 2: 64, 5: 30}
    plain, checkpointed = run_backward_both([mm, relu], saved, {3: 64}, False, 100, 50, checkpoint_input=1)
    # plain: 134 saved + dy 64; relu's dh (64): 262; dy and h go (saved 70, live 64); mm's dx (40) and, after
    # it returns, the bias gradient (200) with x and tensor 5 still held: 70 + 104 + 200 = 374
    assert (plain.peak.saved, plain.peak.buffers, plain.peak.params) == (70, 104, 200)
    # checkpointed: relu unpacks first: dy 64 + the recompute 100 = 164 (50 saved, 114 other); then the
    # recomputed tensors (134 - the input's 40 = 94) + dy + dh = 222; after relu 30 + 64; mm's dx (104 live);
    # its saved tensors go when its formula returns (torch/utils/checkpoint.py unpack hook), so the bias
    # gradient comes with none held: 0 + 104 + 200 = 304
    assert (checkpointed.peak.saved, checkpointed.peak.buffers, checkpointed.peak.params) == (0, 104, 200)
    assert plain.outgoing == checkpointed.outgoing == ((1, 40),) and plain.params == checkpointed.params == 200
    # run_backward gives each on its own
    assert run_backward([mm, relu], saved, {3: 64}, False).peak == plain.peak
    assert run_backward([mm, relu], {**saved, 1: 0}, {3: 64}, False, recompute=100, recompute_saved=50).peak == \
        checkpointed.peak
    # a larger recompute is the checkpointed peak: dy 64 + 400, counted as buffers but for its 50 saved
    _, big = run_backward_both([mm, relu], saved, {3: 64}, False, 400, 50, checkpoint_input=1)
    assert (big.peak.saved, big.peak.buffers, big.peak.params) == (50, 64 + 400 - 50, 0)
