"""peftcalc.backward: the autograd engine's replay (run_backward) and a block's plain and checkpointed replays
in one walk (run_backward_both), on node sequences written out by hand."""

from peftcalc.backward import GRAD, Node, run_backward, run_backward_both


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


def test_backward_replay_by_hand():
    """peftcalc.backward on a chain written out by hand: y = relu(h), h = x @ W^T, with W trainable
    (its gradient 128 bytes) and x needing a gradient. Tensor ids: 1 x (32 bytes, saved by the matmul
    for W's gradient), 2 h (64 bytes, saved by relu), 3 y (64 bytes)."""
    mm = Node(out=2, steps=(("new", "dx", 32), ("param", 128)), outputs=((1, "dx"),), saved=(1,))
    relu = Node(out=3, steps=(("new", "dh", 64),), outputs=((2, "dh"),), saved=(2,))
    replay = run_backward([mm, relu], {1: 32, 2: 64}, {3: 64}, in_place=False)
    # start: x and h saved (96) + dy (64) = 160; relu: + dh (64) = 224; then dy and h go (96);
    # mm: + dx (32) + dW (128, a .grad) = 256 with x still saved and dh alive
    assert replay.peak.total == 32 + 64 + 32 + 128
    assert (replay.peak.saved, replay.peak.buffers, replay.peak.params) == (32, 96, 128)
    assert replay.outgoing == ((1, 32),) and replay.params == 128
    # a pass-through (add) hands the same buffer to both inputs: no allocation
    add = Node(out=4, outputs=((5, GRAD), (6, GRAD)))
    assert run_backward([add], {}, {4: 40}, in_place=False).peak.total == 40


def test_checkpointed_replay_recomputes_at_first_unpack():
    """peftcalc.backward with a checkpoint's recompute, by hand: the block's saved tensors (id 5, 48 bytes)
    do not exist until the first node that unpacks a saved variable runs. Nodes in creation order: n1
    (out 2) saves tensor 5 and makes a 32-byte gradient of tensor 1; n2 (out 3) is bitsandbytes MatMul4Bit,
    which keeps its weight outside save_for_backward: it dequantizes a 128-byte weight and makes a
    64-byte gradient of tensor 2, before anything is recomputed."""
    n1 = Node(out=2, steps=(("new", "dx", 32),), outputs=((1, "dx"),), saved=(5,), unpacks=True)
    n2 = Node(out=3, steps=(("new", "w", 128), ("new", "dh", 64), ("free", "w")), outputs=((2, "dh"),))
    # n2 runs first: the incoming 64 + the weight 128 + dh 64 = 256, nothing saved yet
    small = run_backward([n1, n2], {5: 48}, {3: 64}, in_place=False, recompute=100)
    assert (small.peak.saved, small.peak.buffers, small.peak.params) == (0, 256, 0)
    # n1 unpacks: the recompute's peak (300) on top of dh (64) is the step's peak, counted as buffers
    big = run_backward([n1, n2], {5: 48}, {3: 64}, in_place=False, recompute=300)
    assert (big.peak.saved, big.peak.buffers, big.peak.params) == (0, 64 + 300, 0)
    # without checkpointing tensor 5 is held from the start: 48 + 256
    assert run_backward([n1, n2], {5: 48}, {3: 64}, in_place=False).peak.total == 48 + 256


def test_checkpoint_recompute_starts_at_the_first_node_that_unpacks():
    """torch.utils.checkpoint (non-reentrant) recomputes when backward first unpacks a saved tensor: a
    node that saves none (MatMul4Bit, AddBackward, ToCopyBackward) runs before the recompute, so the
    gradients it makes are alive during it and the saved tensors are not alive during it."""
    # x (the block's input, 400 B) -> h (400 B, its node unpacks s, 200 B) -> out (a Linear4bit output:
    # its node unpacks nothing, a 30 B temporary); the recompute makes s (peak 200 B, counted as buffers)
    nodes = [Node(3, (("new", "d0", 400),), ((1, "d0"),), saved=(2,), unpacks=True),
             Node(4, (("new", "t", 30), ("new", "d0", 400), ("free", "t")), ((3, "d0"),))]
    peak = run_backward(nodes, {2: 200}, {4: 400}, False, recompute=200).peak
    # out's node: grad_out 400 + temp 30 + grad_h 400, nothing saved yet; then grad_out dies and the
    # recompute runs with grad_h alive (400 + 200); h's node: grad_h 400 + s 200 + grad_x 400
    assert (peak.total, peak.saved) == (1000, 200)


def test_backward_sums_a_second_gradient_out_of_place_under_a_tracer():
    """y = x.sum(...) and z = x.sum(...) (x 1,000 values, y and z 100), out = y + z, all fp32: AddBackward
    hands its gradient (400 bytes) to y and z; z's node (the later one) runs first and makes x's first
    gradient (4,000), y's node its second (4,000 more, while the incoming gradient is still alive: 8,400).
    Summing them: out of place under a dispatch mode (a storage tracer; ATen isTensorSubclassLike), the
    sum is allocated while both exist: 12,000 bytes; on CUDA tensors InputBuffer::accumulate adds in
    place and 8,400 stays the peak."""
    nodes = [Node(2, (("new", "d0", 4_000),), ((1, "d0"),)), Node(3, (("new", "d0", 4_000),), ((1, "d0"),)),
             Node(4, (), ((2, GRAD), (3, GRAD)))]
    for inplace, expected in ((False, 12_000), (True, 8_400)):
        assert run_backward(nodes, {}, {4: 400}, inplace).peak.total == expected
