"""The storage tracer on cases small enough to count by hand, with real and with fake tensors."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from measure.tracer import CATEGORIES, FakeScalars, StorageTracer, optimizer_state_tensors

F32 = 4


@pytest.fixture(params=["real", "fake"])
def mode(request):
    return FakeTensorMode() if request.param == "fake" else contextlib.nullcontext()


def _two_layer(mode):
    """x (4, 8) -> relu(x @ w1.T) (4, 16) -> @ w2.T (4, 2) -> sum; no biases, x needs no grad."""
    with mode:
        w1 = torch.nn.Parameter(torch.randn(16, 8))
        w2 = torch.nn.Parameter(torch.randn(2, 16))
        x = torch.randn(4, 8)
    return w1, w2, x


def test_two_layer_forward_backward_by_hand(mode):
    w1, w2, x = _two_layer(mode)
    W1, W2, X = 16 * 8 * F32, 2 * 16 * F32, 4 * 8 * F32  # 512, 128, 128
    A = H = DH = DA = 4 * 16 * F32  # pre-activation, relu output and their gradients: 256 each
    LOSS = SEED = F32  # the scalar loss and backward's ones_like seed
    tracer = StorageTracer()
    with mode, tracer:
        tracer.mark([w1, w2], "parameters")
        tracer.mark(x, "inputs")
        with tracer.phase("forward") as fwd, tracer.saving():
            h = torch.relu(x @ w1.t())  # x @ w1.t() (A) is freed once relu has made h
            loss = (h @ w2.t()).sum()  # the (4, 2) product is freed after sum; h is saved by relu and mm
            del h
        with tracer.phase("backward") as bwd:
            loss.backward()
        tracer.mark([w1.grad, w2.grad], "gradients")

    assert fwd.start_bytes == W1 + W2 + X
    # peak: while relu runs, both its input A and its output H are live
    assert fwd.peak_bytes == W1 + W2 + X + A + H
    assert fwd.end_bytes == W1 + W2 + X + H + LOSS
    after_forward = tracer.breakdown(fwd.end_seq)
    assert after_forward["activations"] == H  # x is saved too but stays an input; w2 stays a parameter
    assert after_forward["inputs"] == X and after_forward["parameters"] == W1 + W2
    # backward peak: dW2 (stored as w2.grad), dH = seed @ w2 and dA = threshold_backward(dH, H) are
    # live together with H, before dW1 is computed (dW1 comes after dH is freed, so it does not add)
    assert bwd.peak_bytes == W1 + W2 + X + H + LOSS + SEED + W2 + DH + DA
    at_peak = tracer.breakdown(bwd.peak_seq)
    assert at_peak["gradients"] == W2 and at_peak["activations"] == H
    # after backward: the activations are gone, gradients of both weights stay
    assert bwd.end_bytes == W1 + W2 + X + LOSS + W1 + W2
    assert tracer.breakdown(tracer.seq)["gradients"] == W1 + W2
    assert tracer.breakdown(tracer.seq)["activations"] == 0


def test_views_share_one_storage_and_frees_subtract(mode):
    tracer = StorageTracer()
    with mode, tracer:
        a = torch.empty(10, 10)
        views = [a.t(), a[2:], a.view(100), a.reshape(5, 20)]
        assert tracer.live_bytes == 400
        b = a * 2
        assert tracer.live_bytes == 800
        del a, views
        assert tracer.live_bytes == 400
        del b
        assert tracer.live_bytes == 0
    assert tracer.peak_bytes == 800


def test_resize_changes_the_count(mode):
    tracer = StorageTracer()
    with mode, tracer:
        a = torch.empty(10)
        a.resize_(100)
        assert tracer.live_bytes == 400


def test_reset_peak_starts_from_live_bytes(mode):
    tracer = StorageTracer()
    with mode, tracer:
        a = torch.empty(1000)
        del a
        keep = torch.empty(10)
        tracer.reset_peak()
        assert tracer.peak_bytes == 40
        b = torch.empty(20)
        assert tracer.peak_bytes == 120
        del keep, b


def test_stronger_category_wins_and_top_tensors_name_the_op(mode):
    tracer = StorageTracer()
    with mode:
        w = torch.nn.Parameter(torch.empty(8, 16))  # made before tracing: registered by mark()
    with mode, tracer:
        tracer.mark(w, "parameters")
        tracer.mark(w, "activations")  # a weight saved for backward stays a parameter
        with tracer.saving():
            y = torch.matmul(torch.ones(4, 8), w)  # mm saves the (4, 8) ones for w's gradient
        top = tracer.top_tensors(tracer.seq, 3)
    assert tracer.breakdown(tracer.seq) == {**dict.fromkeys(CATEGORIES, 0), "parameters": 512,
                                            "activations": 128, "other": 256}
    assert top[0] == {"op": "<registered>", "bytes": 512, "category": "parameters", "phase": "setup",
                      "shape": [8, 16], "dtype": "float32"}
    assert (top[1]["op"], top[1]["bytes"], top[1]["category"]) == ("aten.mm", 256, "other")
    assert (top[2]["op"], top[2]["bytes"], top[2]["category"]) == ("aten.ones", 128, "activations")
    del y


def test_saving_keeps_no_graph_alive_that_backward_never_runs(mode):
    """A graph dropped without backward frees what it saved, as it does with no hooks at all:
    exp saves its own output, and a pack hook returning that tensor (with its grad_fn) would tie
    node and tensor in a cycle nothing breaks (the DoRA weight-norm leak on Conv1D layers)."""
    tracer = StorageTracer()
    with mode:
        w = torch.nn.Parameter(torch.empty(8, 16))
    with mode, tracer:
        tracer.mark(w, "parameters")
        with tracer.saving():
            y = torch.exp(w * 2)  # mul saves nothing (a python scalar); exp saves its output y
            assert tracer.breakdown(tracer.seq)["activations"] == 512
            del y  # nothing will run backward through exp: its graph and y's storage go
        assert tracer.live_bytes == 512
        with tracer.saving():
            loss = torch.exp(w).sum()
        loss.backward()  # the saved output is still usable by backward
        assert w.grad is not None and tuple(w.grad.shape) == (8, 16)


def test_unknown_category_is_an_error():
    with pytest.raises(ValueError, match="unknown category"):
        StorageTracer().mark(torch.empty(1), "weights")
    assert "activations" in CATEGORIES


def test_fake_scalars_answer_item_and_tolist():
    with FakeTensorMode(), FakeScalars():
        t = torch.empty(3)
        assert t.sum().item() == 1.0
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert torch.empty(2, dtype=torch.int64).tolist() == [1, 1]
        assert bool(torch.empty(()) > 0) is False


def test_adamw_state_is_two_moments_and_a_step(mode):
    """torch.optim.AdamW (single-tensor, CPU): exp_avg and exp_avg_sq like the parameter, and a
    float32 scalar step per parameter."""
    tracer = StorageTracer()
    with mode:
        w = torch.nn.Parameter(torch.empty(32, 16))
    with mode, tracer:
        tracer.mark(w, "parameters")
        opt = torch.optim.AdamW([w])
        w.sum().backward()
        opt.step()
        tracer.mark(optimizer_state_tensors(opt), "optimizer_state")
    assert tracer.breakdown(tracer.seq)["optimizer_state"] == 2 * 32 * 16 * F32 + F32


def test_a_graph_that_never_runs_backward_is_freed_with_its_output(mode):
    """sigmoid saves its own output. A pack hook that returned that tensor itself would make it hold its
    own grad_fn, a reference cycle through C++ that even gc.collect() cannot break when backward never
    runs (pytorch#189025); the tracer's pack hook detaches, so the saved output (4 x 16 x 4 = 256 bytes)
    and the input it depends on die with the output, as they do without a tracer."""
    import gc

    with mode:
        w = torch.nn.Parameter(torch.randn(16, 8))
    tracer = StorageTracer()
    with mode, tracer:
        tracer.mark(w, "parameters")
        with tracer.saving():
            y = torch.sigmoid(torch.ones(4, 8) @ w.t())  # mm saves the ones (128 bytes), sigmoid y (256)
        assert tracer.breakdown(tracer.seq)["activations"] == 128 + 256
        del y
        gc.collect()
        assert tracer.live_bytes == 16 * 8 * F32


def test_checkpoint_recompute_saved_tensors_are_activations():
    """A checkpointed step (tiny-gpt2 full fp32 b4 s32, grad checkpointing, cpu): the tensors the
    recompute saves into the checkpoint's frame (torch/utils/checkpoint.py _recomputation_hook) are
    activations at the backward peak. Traced with measure.run.measure_one: peak 3,567,992 bytes in
    backward, activations 1,050,880 (65,792 before the recompute's pack was marked)."""
    from measure.matrix import load_matrix, to_run
    from measure.run import measure_one

    run = to_run({"model": "tiny-gpt2", "method": "full", "precision": "fp32", "batch_size": 4, "seq_len": 32,
                  "grad_checkpointing": True}, load_matrix("ci")["models"])
    m = measure_one(run.spec, run.method, run.training, device="cpu", steps=2, predicted=False)["measured"]
    assert (m["peak_bytes"], m["peak_phase"]) == (3_567_992, "backward")
    assert m["categories_at_peak"]["activations"] == 1_050_880
    recomputed = [t for t in m["top_tensors"] if t["phase"] == "backward" and t["op"] in ("aten.addmm", "aten.tanh")]
    assert recomputed and all(t["category"] == "activations" for t in recomputed)
