"""Gradient checkpointing: each block's recompute and backward replayed (peftcalc.backward) against traced steps.

Traced figures are rows of the ci matrix (measure/matrices/ci.toml, committed in reports/data/ci.jsonl),
re-measured one at a time with measure.run.measure_one (see tests/peftcalc/traced/test_prepare_kbit.py for
the command), e.g. tiny-bert, MethodSettings('lora'), TrainingSettings(batch_size=4, seq_len=32,
precision='bf16', grad_checkpointing=True), device='cpu', steps=2. What was live at a traced peak was
listed with measure.tracer.StorageTracer.live_records(peak_seq) (op, shape, dtype of each storage).
"""


import pytest

from peftcalc import estimate
from peftcalc.activations import activation_profile
from peftcalc.backward import BackwardPeak
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from matrix_models import matrix_spec

tiny = matrix_spec


def ckpt(precision: str, batch: int = 4, seq: int = 32) -> TrainingSettings:
    return TrainingSettings(batch_size=batch, seq_len=seq, precision=precision, grad_checkpointing=True, device="cpu")


# (model, method, precision, traced peak): the checkpointed rows of the ci matrix that were 3.6-13% off
# before the block timeline (tiny models, batch 4 x 32 tokens)
TRACED = [
    ("tiny-bert", "lora", "bf16", 1_008_804),  # was -13.0%: the recompute's math SDPA
    ("tiny-bert", "lora", "fp32", 1_522_984),  # was -6.7%: the hooked embeddings' saved tensors
    ("tiny-bert", "lora", "amp-bf16", 1_563_944),  # was -5.4%
    ("tiny-bert", "full", "fp32", 2_466_480),  # was +5.2%: the end of the recompute
    ("tiny-gpt2", "lora", "fp32", 2_095_384),  # was -4.7%: gelu_new's backward
    ("tiny-gpt2", "lora", "bf16", 1_238_808),  # was -3.9%
    ("tiny-llama-gqa", "full", "fp32", 2_716_572),  # was +3.6%: the MLP's backward
    ("tiny-gpt2", "full", "amp-bf16", 3_109_240),  # was +1.6%
    ("tiny-bert", "full", "amp-bf16", 2_467_376),  # was +1.6%
    ("tiny-llama-gqa", "full", "amp-bf16", 2_731_708),  # was +1.1%: the forward (model output alive)
]


@pytest.mark.parametrize("model,method,precision,traced", TRACED, ids=[f"{m}-{me}-{p}" for m, me, p, _ in TRACED])
def test_checkpointed_peak_matches_traced_step(model, method, precision, traced):
    e = estimate(tiny(model), method=method, **ckpt(precision).__dict__)
    # (BERT's rows are 2,048 bytes low: its int64 position_ids and token_type_ids buffers, 2 x 128 x 8)
    assert abs(e.memory.peak_bytes - traced) / traced < 0.002


def test_real_shape_checkpointed_forward_peak():
    """Llama-3.2-1B full fine-tuning, amp-bf16, batch 4 x 1024, checkpointing, on fake tensors: traced
    23,209,591,664 bytes in the forward (was +2.1%: the lm_head's autocast copy was counted twice, once
    saved and once as autocast's cache)."""
    e = estimate("llama-3.2-1b", method="full", **ckpt("amp-bf16", 4, 1024).__dict__)
    assert abs(e.memory.peak_bytes - 23_209_591_664) / 23_209_591_664 < 1e-4
    assert e.memory.peak_phase == "forward"


def test_llama_mlp_backward_composition():
    """tiny-llama-gqa full fp32, batch 4 x 32 (128 tokens, hidden 64, intermediate 128), layer 0 under
    checkpointing. Traced peak (2,716,572 bytes) is in the MLP's backward, right after mul's backward
    made its two gradients. Live then, above the checkpoint input and everything outside the block:
      the recomputed saved tensors, less the input and down_proj's input (released by its backward):
        560,128 - 32,768 - 65,536                                   = 461,824
      the incoming gradient of the block's output, 128 x 64 x 4    =  32,768
      down_proj.weight.grad, 64 x 128 x 4                           =  32,768
      down_proj's input gradient and mul's two gradients, 3 x 128 x 128 x 4 = 196,608
    = 723,968, of which 32,768 parameter gradient and 461,824 saved (the rest, 229,376, gradient buffers)."""
    plan = make_plan(tiny("tiny-llama-gqa"), MethodSettings("full"))
    block = activation_profile(plan, ckpt("fp32")).blocks[0]
    assert block.checkpointed_backward == BackwardPeak(saved=461_824, buffers=229_376, params=32_768)


def test_bert_recompute_math_attention_composition():
    """tiny-bert LoRA (query, value) bf16, batch 4 x 32, layer 1: the traced peak (1,008,804 bytes) is
    inside the recompute, where torch's _scaled_dot_product_attention_math returns (dropout 0.1 on the
    CPU has no fused kernel). Above the checkpoint input, the incoming gradient and everything outside,
    what the recompute has saved by then into the checkpoint's frame (torch/utils/checkpoint.py
    _recomputation_hook.pack_hook, by autograd's saving rules) and its temporaries:
      saved
        query/value LoRA: lora_A's fp32 input copies 2 x 32,768 (LinearBackward saves its input),
          lora_B's inputs, the lora_A outputs, 2 x 4,096                                =  73,728
        the math kernel's bmm operands: the q and k^T copies (clone) 2 x 32,768, v's copy 32,768 =  98,304
        softmax's output (SoftmaxBackward), the dropout noise (empty_like, saved by mul) and the
          dropped probabilities (the second bmm's input) 3 x 65,536                     = 196,608
                                                                                        = 368,640
      temporaries (nothing saves them)
        q, k, v projections (bf16, 128 x 64) 3 x 16,384                                 =  49,152
        the math kernel's fp32 q, k, v copies 3 x 32,768, q * scale 32,768, the probabilities'
          bf16 copy 32,768, the bmm output 32,768, its bf16 cast 16,384                 = 212,992
                                                                                        = 262,144
    = 630,784, and the incoming gradient (bf16, 128 x 64 x 2 = 16,384) beside it: 647,168, the block's
    checkpointed peak. The tracer (measure.tracer.StorageTracer.recomputing marks the recompute's saved
    tensors) lists at that peak exactly these: activations 434,688 = the embeddings' 66,048 kept from
    the forward (outside the block) + 368,640; 'other' from the backward 262,144 + 16,384 (the rest of
    'other', 16,388: the forward's embedding output, the loss and its ones_like gradient)."""
    plan = make_plan(tiny("tiny-bert"), MethodSettings("lora"))
    block = activation_profile(plan, ckpt("bf16")).blocks[1]
    assert block.checkpointed_backward == BackwardPeak(saved=368_640, buffers=262_144 + 16_384, params=0)


def test_input_require_grads_hook_keeps_embedding_tensors():
    """transformers' gradient_checkpointing_enable calls enable_input_require_grads: tiny-bert LoRA fp32
    batch 4 x 32 under checkpointing saves the embeddings' LayerNorm input (32,768), mean and rstd (1,024)
    and the dropout noise (32,768), and the word embeddings' output is a leaf that requires grad, held by
    its AccumulateGrad node (32,768, not saved: the tracer's 'other'), all traced at the peak (1,522,984
    bytes at the start of backward: activations 460,800, other 557,064 = the loss buffers 524,296 and
    the leaf)."""
    no_ckpt = TrainingSettings(batch_size=4, seq_len=32, precision="fp32", device="cpu")
    plan = make_plan(tiny("tiny-bert"), MethodSettings("lora"))
    assert activation_profile(plan, no_ckpt).pre == 0
    profile = activation_profile(plan, ckpt("fp32"))
    assert (profile.pre, profile.input_leaf) == (32_768 + 1_024 + 32_768, 32_768)
    peak, phase, c = _components("tiny-bert", "lora", "fp32", 4, 32)
    assert (peak, c["activations"], c["logits_loss"] + c["temporaries"]) == (1_522_984, 460_800, 557_064)
    vit = make_plan(tiny("tiny-vit-cls"), MethodSettings("lora"))  # main_input_name pixel_values: no hook
    assert activation_profile(vit, ckpt("fp32")).pre == activation_profile(vit, no_ckpt).pre


def _components(model, method, precision, batch, seq, **kw):
    e = estimate(tiny(model), method=method, batch_size=batch, seq_len=seq, precision=precision,
                 grad_checkpointing=True, device="cpu", **kw)
    return e.memory.peak_bytes, e.memory.peak_phase, dict(e.memory.components)


def test_tied_head_gradient_is_pending_not_a_grad():
    """tiny-gpt2 frozen (only the tied wte/lm_head trains) fp32 batch 2 x 32, checkpointed, on the CPU:
    traced peak 1,663,756 bytes in block 1's backward, where the lm_head's gradient (aten.mm, 512 x 64
    fp32 = 131,072) waits in AccumulateGrad's input buffer for the lookup's (torch engine.cpp not_ready
    InputBuffer): no parameter has a .grad yet. Traced categories (measure.loop TracerMeter, StorageTracer
    .breakdown at the peak): parameters 564,224, optimizer_state 262,148, inputs 512, activations
    492,544, other 344,328 (the pending gradient among it), gradients 0."""
    peak, phase, c = _components("tiny-gpt2", "frozen", "fp32", 2, 32)
    assert (peak, phase) == (1_663_756, "backward:layer1")
    assert c["gradients"] == 0
    assert (c["activations"], c["logits_loss"] + c["temporaries"]) == (492_544, 344_328)


def test_embedding_norm_gradient_arrives_last():
    """tiny-bert BitFit fp32 batch 1 x 64, checkpointed (fake tensors): the embeddings' LayerNorm bias
    gets its gradient after block 0's backward (BertEmbeddings.forward runs it before the blocks), so at
    the traced peak in block 1's backward (998,232 bytes) the gradients are the MLM head's biases and
    block 1's: 2,560 traced (was 2,816 with the LayerNorm's 256 counted on the head side)."""
    peak, phase, c = _components("tiny-bert", "bitfit", "fp32", 1, 64)
    assert (peak, c["gradients"]) == (998_232, 2_560)


def test_batch_one_math_attention_saves_views():
    """tiny-gpt2 LoRA fp32 batch 1 x 64, checkpointed (fake tensors): with batch 1 at::matmul folds the
    math path's (1, heads, s, d) operands into bmm's without copies, so bmm saves the scaled q and k^T
    and v, a view keeping c_attn's whole (1, 64, 192) fp32 output (49,152 bytes) alive instead of a
    16,384-byte copy; traced peak 1,485,848 (the calculator was 33,280 low: 2 x 16,384 for that and
    512 for the position ids the checkpoints hold)."""
    peak, phase, c = _components("tiny-gpt2", "lora", "fp32", 1, 64)
    assert (peak, phase) == (1_485_848, "backward:layer1")


def test_checkpoints_hold_the_position_ids():
    """tiny-llama LoRA fp32 batch 2 x 32, checkpointed (fake tensors): transformers'
    GradientCheckpointingLayer checkpoints partial(forward, **kwargs), so the (1, 32) int64 position_ids
    (256 bytes, 'other') outlive the forward; traced peak 1,087,848 at the start of backward with
    activations 184,576 and other 262,408 (the loss buffers 262,152 and the position ids)."""
    peak, phase, c = _components("tiny-llama", "lora", "fp32", 2, 32)
    assert (peak, phase) == (1_087_848, "backward:loss")
    assert (c["activations"], c["logits_loss"] + c["temporaries"]) == (184_576, 262_408)
    assert c["temporaries"] == 32 * 8


def test_checkpointed_ia3_reduction_after_recomputed_tensors_go():
    """tiny-llama-cls IA3 fp32 batch 2 x 32, checkpointed, on the CPU: in the feedforward IA3 mul's
    backward the recomputed input (32,768) and scaling vector (512) are freed when the formula returns
    (checkpoint.py Rule 4: unpacking drops the frame's reference), before the engine sums the vector's
    gradient down to (128,) (validate_outputs); traced peak 803,444 (was 512 over with the sum counted
    beside them)."""
    peak, phase, c = _components("tiny-llama-cls", "ia3", "fp32", 2, 32)
    assert (peak, phase) == (803_444, "backward:layer1")


# Checkpointed rows whose every component equals the tracer's categories at the traced peak (ci.jsonl,
# re-measured with the tracer that marks a checkpoint's recomputed saved tensors as activations):
# (model, method, trainable_layers, precision, batch, seq, ci.jsonl key, peak, activations, other, gradients)
CATEGORIES = [
    # the recompute's last LayerNorm mean and rstd, live at its peak and saved right after: activations
    # (Recorder.recompute_peak_saved); the token types token_type_embeddings saves (256 bytes, int64)
    ("tiny-bert", "full", 0, "fp32", 4, 32, "aecebd82532c8ba0", 2_466_480, 724_224, 229_384, 153_088),
    # a frozen encoder's forward peak: the embeddings output and the block's input were checkpoint inputs,
    # saved by _NoopSaveInputs (ActivationProfile.forward_checkpoint_inputs)
    ("tiny-vit-cls", "frozen", 0, "fp32", 2, 32, "358992534aed9b5d", 424_336, 17_408, 52_224, 0),
    # fc2's bias gradient is summed by the engine after the formula returns, once the recomputed gelu
    # output is gone, so the peak is gelu_backward's output with it freed (peftcalc.backward "returned")
    ("tiny-vit-cls", "freeze", 1, "bf16", 3, 48, "3f111b197064cc37", 435_204, 66_504, 32_644, 18_068),
]


@pytest.mark.parametrize("model,method,layers,precision,batch,seq,key,peak,activations,other,gradients", CATEGORIES,
                         ids=[r[6] for r in CATEGORIES])
def test_checkpointed_components_match_traced_categories(model, method, layers, precision, batch, seq, key, peak,
                                                         activations, other, gradients):
    kw = {"trainable_layers": layers} if layers else {}
    total, _phase, c = _components(model, method, precision, batch, seq, **kw)
    assert (total, c["activations"], c["logits_loss"] + c["temporaries"], c["gradients"]) == \
        (peak, activations, other, gradients)
