"""The phase of the peak, from the peaks of every phase: the calculator's largest event of each phase
(forward, backward) against the traced peak of that phase, and the components at the peak against the
tracer's categories there (activations: what autograd saved; other: everything unsaved that is neither
a parameter, a gradient, an optimizer state nor an input). Every figure is a committed row of
reports/data/ci.jsonl (its key is given; measured.steps[-1].phases and measured.phase_categories),
traced with the StorageTracer by

    python -c "from measure.matrix import run_matrix; run_matrix('ci', 'reports/data/ci.jsonl')"

(two steps, the steady-state step; AdamW; the tiny models are measure/matrices/ci.toml's [models.*]).
A single row is re-traced with measure.run.measure_one(spec, MethodSettings(...), TrainingSettings(...),
device, steps=2)."""

import pytest

import peftcalc
from matrix_models import matrix_spec

# (model, method settings, training settings, device, ci.jsonl key, traced forward peak, traced backward
#  peak, traced phase of the step's peak, traced (activations, other) at the peak or None, predicted -
#  traced backward peak in bytes where it is not the step's peak and not exact, what that difference is)
PHASES = [
    # the forward's peak is nll_loss_forward's return: ForCausalLMLoss still holds the padded labels
    # (2 x 25 int64), and the loss and total_weight are two fp32 scalars; Blip2ForConditionalGeneration
    # computes the loss after OPTForCausalLM has returned, so the decoder's last hidden state (2 x 24 x 64
    # fp32) is gone: the forward was 11,880 bytes over (2,516,972) and the peak's phase forward
    ("tiny-blip2", {"method": "qformer"}, {"precision": "amp-bf16", "batch_size": 2, "seq_len": 16}, "cpu",
     "c7454a3e3c0305ad", 2_505_092, 2_513_652, "backward", (710_576, 196_616), 0, ""),
    ("tiny-blip2", {"method": "qformer"}, {"precision": "amp-bf16", "batch_size": 2, "seq_len": 16}, "fake",
     "f5a5a840730b16e6", 2_505_092, 2_513_652, "backward", (710_576, 196_616), 0, ""),
    # the same step with checkpointing peaks in that loss (was +0.58%, 2,072,556)
    ("tiny-blip2", {"method": "qformer"}, {"precision": "amp-bf16", "batch_size": 2, "seq_len": 16,
     "grad_checkpointing": True}, "cpu", "26d7899c34e7aad6", 2_060_676, 2_024_692, "forward", None, 0, ""),
    # peft IA3's feedforward scaling runs before the base layer's F.linear, whose autocast weight copy
    # comes after the scaling's fp32 product is freed: forward:block was 16,384 bytes over (one fc2 copy
    # counted as saved at the peak), and the peak's phase forward
    ("tiny-vit-cls", {"method": "ia3"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "afebe32a5fd6233e", 736_640, 750_216, "backward", (290_344, 91_912), 0, ""),
    ("tiny-clip-vision", {"method": "ia3"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "64f4f9e549457271", 760_520, 774_096, "backward", (316_456, 91_912), 0, ""),
    # the frozen EVA tower runs before the Q-Former has saved anything: at its peak nothing is saved (the
    # calculator had the Q-Former's and the language model's input's saved bytes there as activations:
    # 435,248 / 327,600 / 439,344 / 433,200, and that much less as other)
    ("tiny-blip2-wide-vision", {"method": "qformer"}, {"precision": "fp32", "batch_size": 4, "seq_len": 4}, "cpu",
     "8f233f77062f0f9e", 8_521_020, 5_035_764, "forward", (0, 4_526_080), 0, ""),
    ("tiny-blip2-wide-vision", {"method": "qformer"}, {"precision": "bf16", "batch_size": 4, "seq_len": 4}, "cpu",
     "419016aac6550cae", 4_260_796, 2_776_244, "forward", (0, 2_263_040), 0, ""),  # backward was +128: the
    # Q-Former layernorm's mean and rstd are bf16 on the CPU with bf16 query tokens and weights
    ("tiny-blip2-wide-vision", {"method": "qformer"}, {"precision": "amp-bf16", "batch_size": 4, "seq_len": 4},
     "cpu", "bcaf876f9efcdd69", 6_391_100, 5_179_124, "forward", (0, 2_396_160), 0, ""),
    ("tiny-blip2-wide-vision", {"method": "qformer"}, {"precision": "fp16", "batch_size": 4, "seq_len": 4}, "cpu",
     "a7b03c2e9f064bef", 4_453_180, 3_074_356, "forward", (0, 2_263_040), 0, ""),
    # a frozen ViT's blocks save nothing, so checkpointing changes none of their ops: the peak is layer 1's
    # fc1 (the embeddings output, the block's input, its residual and LayerNorm output; autocast's copies of
    # fc1's weight, its frozen bias and its input; the addmm's output), the same with and without it (was
    # -2.22% under checkpointing, a formula without the copies; -256 bytes without: the bias copy). The
    # backward's peak holds the classifier bias's bf16 gradient (10 x 2 bytes), pending in the head's
    # backward while the weight's ToCopyBackward runs (was -20 before the head Linear's bias was replayed)
    ("tiny-vit-cls", {"method": "frozen"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "440d72170c04eea2", 455_448, 370_868, "forward", (0, 88_448), 0, ""),
    ("tiny-vit-cls", {"method": "frozen"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48,
     "grad_checkpointing": True}, "fake", "ec3c86997747564f", 455_448, 370_868, "forward", None, -816,
     "memory._checkpointed_backward's head event counts the logits and loss scalars, not the head's replay "
     "(its 1,280-byte bf16 weight gradient), and the 20 bytes above"),
    # a trainable lm_head over frozen blocks: autocast caches its bf16 copy (512 x 64) to the end of the
    # forward, and no op saves it (the blocks' output needs no gradient): the forward was 65,536 under
    ("tiny-llama", {"method": "frozen"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "e758cb5213cba413", 1_714_916, 1_757_644, "backward", (313_344, 589_832), 0, ""),
    ("tiny-mistral", {"method": "frozen"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "1cb3d3ac914386e1", 1_665_764, 1_708_492, "backward", (313_344, 589_832), 0, ""),
    # causal LMs peaking in their loss: the padded labels (3 x 49 int64) and the two scalars (was -1,184)
    ("tiny-llama", {"method": "prefix"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "3883295df10d0dae", 2_443_140, 2_342_508, "forward", (1_100_068, 689_308), 0, ""),
    ("tiny-gpt2", {"method": "prefix"}, {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48}, "fake",
     "528b3a45bd4ddea8", 3_835_972, 3_735_340, "forward", (2_519_844, 689_308), 0, ""),
]


def _estimate(model, method, training):
    spec = matrix_spec(model)
    kw = dict(method)
    name = kw.pop("method")
    return peftcalc.estimate(spec, method=name, **kw, **{"optimizer": "adamw", **training}, device="cpu")


@pytest.mark.parametrize("model,method,training,device,key,forward,backward,phase,categories,diff,why", PHASES,
                         ids=[f"{r[0]}-{r[1]['method']}-{r[2]['precision']}-{r[4]}" for r in PHASES])
def test_phase_peaks_against_trace(model, method, training, device, key, forward, backward, phase,
                                   categories, diff, why):
    e = _estimate(model, method, training)
    by_phase: dict = {}
    for name, nbytes in e.memory.events.items():
        group = name.split(":")[0]
        by_phase[group] = max(by_phase.get(group, 0), nbytes)
    assert (by_phase["forward"], by_phase["backward"] - backward) == (forward, diff)
    assert e.memory.peak_phase.split(":")[0] == phase
    if categories is not None:
        c = e.memory.components
        assert (c["activations"], c["logits_loss"] + c["temporaries"]) == categories


def test_checkpointed_forward_keeps_the_trainable_biases_copies():
    """Under checkpointing the blocks' autocast copies are saved by no op, but the cache (autocast_mode.cpp
    cached_cast: every leaf that requires grad) keeps them to the end of the forward: the trainable weights'
    and, cast as addmm's bias argument, the trainable biases' (fake tiny-qwen2 full amp-bf16 b3 s48 ckpt,
    ci.jsonl e1ca614872be8d14: its q/k/v biases, 2 x (64 + 32 + 32) x 2 bytes, were missing at the loss).
    The traced forward peak is 2,449,160, the 1 x 48 int64 position_ids the checkpoints keep as a keyword
    input included (ActivationProfile.checkpoint_kwargs)."""
    e = _estimate("tiny-qwen2", {"method": "full"},
                  {"precision": "amp-bf16", "batch_size": 3, "seq_len": 48, "grad_checkpointing": True})
    assert e.memory.events["forward"] == 2_449_160
