"""measure.dist.measure_ddp with the loop's recipes: the HF Trainer's no_sync micro-batches (measure.loop._unsynced)
and clipping, traced on real CPU tensors, against the calculator (peftcalc.sharding.ddp over the one-GPU loop)."""

from unittest import mock

from torch.nn.parallel import DistributedDataParallel

from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings

from measure.run import measure_one


def test_no_sync_accumulation_trace_equals_prediction(tiny):
    """tiny-llama full fp32, 2 ranks, two micro-batches and clipping: every micro-batch but the last runs under
    DistributedDataParallel.no_sync (entered once for its forward, once for its backward, each step), and rank 0's
    trace is the prediction: the one-GPU loop's 3,404,700 plus the buckets' 591,104 (one fp32 gradient)."""
    run = tiny("tiny-llama", method="full")
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu", gpus=2,
                         sharding="ddp", grad_accum=2, max_grad_norm=1.0)
    with mock.patch.object(DistributedDataParallel, "no_sync", autospec=True,
                           side_effect=DistributedDataParallel.no_sync) as no_sync:
        row = measure_one(run.spec, MethodSettings(method="full"), t, device="cpu", steps=2)
    assert row["outcome"] == "ok", row["error"]
    assert no_sync.call_count == 2 * 2  # 2 steps x (forward, backward) of micro-batch 1
    m, p = row["measured"], row["predicted"]
    assert m["peak_bytes"] == p["peak_bytes"] == 3_404_700 + 591_104 == 3_995_804
