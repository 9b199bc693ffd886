"""peftcalc.ops.recorder: symbolic tensors and the Recorder's bookkeeping, on sequences written out by hand.

The Recorder counts what a storage tracer (and ``torch.cuda.max_memory_allocated``) counts: every tensor
is allocated when made and freed when the modeling code drops it, unless autograd saved it; a saved
storage is counted once, whatever views of it are saved."""

from opkit import BF16, F32, context

from peftcalc.ops.recorder import Recorder, first_node_since, input_grads


def test_new_and_free_follow_the_live_bytes_and_the_peak():
    """a (100 fp32, 400 B), then b (50 bf16, 100 B): 500 live, the peak; a freed: 100; c (25 fp32, 100 B):
    200 live, the peak stays 500. Freeing twice, or freeing a view, changes nothing."""
    rec = Recorder(context())
    a = rec.new(100, "float32", False)
    b = rec.new(50, "bfloat16", False)
    assert (a.nbytes, b.nbytes) == (100 * F32, 50 * BF16)
    assert (rec.live_bytes, rec.forward_peak) == (500, 500)
    rec.free(a)
    rec.free(a, None)
    rec.free(rec.view(b, 10))  # a view has no storage of its own
    assert rec.live_bytes == 100
    rec.new(25, "float32", False)
    assert (rec.live_bytes, rec.forward_peak, rec.saved_total) == (200, 500, 0)


def test_a_saved_storage_is_counted_once():
    """t (100 fp32) saved under two tags and through a view of it: one storage, 400 bytes, the first tag.
    Saving moves it from the live bytes to the saved ones (the total does not change); a free() of it
    afterwards does nothing (autograd holds it)."""
    rec = Recorder(context())
    t = rec.new(100, "float32", True)
    assert rec.save(t, "first") == t.id
    rec.save(t, "second")
    v = rec.view(t, 20)
    assert (v.nbytes, v.base) == (20 * F32, t)
    assert rec.save(v, "view") == t.id
    rec.free(t)
    assert rec.saved_bytes() == {t.id: 400}
    assert rec.bytes_by_tag() == {"first": 400}
    assert (rec.live_bytes, rec.saved_total, rec.forward_peak) == (0, 400, 400)


def test_buckets_tags_and_release():
    """Saves land in the bucket current when they are made ('pre' by default, a layer index, 'post');
    release() drops a graph's saved tensors (through a view too)."""
    rec = Recorder(context())
    a = rec.save_new(10, "float32", "embed")  # 40 B in 'pre'
    rec.bucket = 0
    x = rec.new(20, "bfloat16", True)
    rec.save(x, "layer.input")  # 40 B in layer 0
    rec.save_new(5, "uint8", "layer.mask")  # 5 B in layer 0
    rec.bucket = "post"
    rec.save_new(1, "float32", "loss")  # 4 B in 'post'
    assert rec.bytes_by_bucket() == {"pre": 40, 0: 45, "post": 4}
    assert rec.bytes_by_tag() == {"embed": 40, "layer.input": 40, "layer.mask": 5, "loss": 4}
    rec.release(rec.view(x, 4))
    assert rec.bytes_by_bucket() == {"pre": 40, 0: 5, "post": 4}
    assert (rec.saved_total, a) == (49, 1)


def test_a_node_is_recorded_only_for_an_output_that_needs_a_gradient():
    """input_grads allocates one gradient like each input that needs one (and none for the others)."""
    rec = Recorder(context())
    x = rec.new(8, "float32", True)
    w = rec.new(4, "bfloat16", False)
    steps, outputs = input_grads(x, w, None)
    assert (steps, outputs) == ([("new", "d0", 32)], [(x.id, "d0")])
    mark = len(rec.nodes)
    rec.node(rec.new(8, "float32", False), steps, outputs)
    assert rec.nodes == [] and first_node_since(rec, mark) == 0
    y = rec.new(8, "float32", True)
    rec.node(y, steps, outputs, saved=[x.id])
    assert rec.nodes == [(y.id, (("new", "d0", 32),), ((x.id, "d0"),), (x.id,), 0, True)]
    assert first_node_since(rec, mark) == y.id


def test_forward_peak_saved_counts_tensors_saved_after_the_peak():
    """a (400 B) and b (800 B) make the 1,200-byte peak; b goes; a is saved later: the tracer decides a
    storage's category at the end, so a counts among the saved bytes at the peak. c, made after the peak,
    does not."""
    rec = Recorder(context())
    a = rec.new(100, "float32", True)
    b = rec.new(200, "float32", False)
    rec.free(b)
    rec.save(a, "a")
    c = rec.new(10, "float32", True)
    rec.save(c, "c")
    assert (rec.forward_peak, rec.forward_peak_saved) == (1_200, 400)


def test_recompute_stops_at_the_last_save():
    """torch.utils.checkpoint's early stop: nothing after the last packed tensor is recomputed, and what
    a later op still uses is alive where it stops (Recorder.recompute_peak)."""
    ctx = context(batch=1, seq=1, kv_seq=1)
    rec = Recorder(ctx)
    x = rec.new(10, "float32", True)  # the checkpoint's input: 40 bytes
    rec.save(rec.new(100, "float32", True), "a")  # 400 bytes, saved
    b = rec.new(1000, "float32", True)  # 4,000 bytes, used later: alive at the stop
    rec.save_param()  # a parameter saved: the last save
    rec.new(10_000, "float32", True)  # never recomputed
    rec.free(b)
    assert rec.recompute_peak - x.nbytes == 400 + 4_000
    assert rec.saved_bytes() == {2: 400}
    # the recompute's saved bytes at its peak: the 400 saved before it (b is never saved)
    assert rec.recompute_peak_saved == 400
    # the forward went on to 40 + 400 + 4,000 + 40,000
    assert rec.forward_peak == 44_440
