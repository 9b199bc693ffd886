"""peftcalc.methods.lora: peft DoRA's weight norm (DoraLinearLayer.get_weight_norm) op by op, against the
storages the harness's tracer saw in a traced step."""

from peftcalc.methods.lora import dora_weight_norm
from peftcalc.ops.context import StepContext
from peftcalc.ops.recorder import Recorder


def test_dora_weight_norm_under_autocast_by_hand():
    """peft DoraLinearLayer.forward's weight norm on tiny-vit-cls's last mlp.fc2 (in 128, out 64, r 4) under
    CPU autocast bf16, fp32 weights and adapters: the storages the tracer saw between the base result and
    the norm (events 2230-2242 of the amp-bf16 b3 s48 no-checkpointing run, row 7b7173244261f575):
    aten.eye (128, 128) fp32 65,536; lora_A's autocast copy (4, 128) bf16 1,024; the identity's copy
    (128, 128) bf16 32,768 (saved); mm (128, 4) bf16 1,024 (saved); lora_B's copy (64, 4) bf16 512;
    mm (128, 64) bf16 16,384 -> 117,248; the eye dies; _to_copy (64, 128) fp32 32,768; the bf16 product
    dies; mul and add (64, 128) fp32 32,768 each -> 133,632; the mul dies, linalg_vector_norm (64,) fp32
    256, the add dies. Left: the cached copies, the saved identity copy and A's output, lora_weight and the
    norm: 1,024 + 512 + 32,768 + 1,024 + 32,768 + 256 = 68,352, of which 33,792 saved."""
    ctx = StepContext(batch=3, seq=17, kv_seq=17, compute_dtype="float32", weight_dtype="float32", autocast="bfloat16",
              adapter_dtype="float32", device="cpu", attention="sdpa")
    rec = Recorder(ctx, bucket=1)
    norm = dora_weight_norm(rec, 128, 64, 4, "float32", "mlp.fc2")
    assert rec.forward_peak == 133_632
    assert (rec.saved_total + rec.live_bytes, rec.saved_total) == (68_352, 33_792)
    assert norm.norm.nbytes == 256
    rec.release(*norm.graph_saved)  # the layer returns: lora_weight's graph goes with what it saved
    assert rec.saved_total == 0
