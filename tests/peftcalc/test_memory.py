"""Memory terms against independent sources: the real models' parameter dtypes, the real torch
optimizers' state tensors, and hand derivations written out below."""

from pathlib import Path

import peftcalc

import pytest
import torch

from measure.build import build_model
from peftcalc.errors import InputError
from peftcalc.memory import timeline
from peftcalc.model_states import model_states, nf4_bytes
from peftcalc.methods import MethodSettings, make_plan
from peftcalc.settings import TrainingSettings
from peftcalc.config import load_spec

CONFIGS = Path(__file__).parent / "configs"
METHODS = [MethodSettings(m) for m in ("full", "frozen", "freeze", "lora", "adapter", "prefix", "prompt", "bitfit", "ia3")]
METHODS += [MethodSettings("lora", dora=True, targets="all-linear")]


@pytest.mark.parametrize("settings", METHODS, ids=lambda s: f"{s.method}-{s.dora}")
@pytest.mark.parametrize("model_name,precision", [("llama-3.2-1b", "bf16"), ("qwen2.5-0.5b", "fp16"),
                                                  ("gpt2", "bf16"), ("bert-base", "fp32"),
                                                  (str(CONFIGS / "llama_cls.json"), "bf16")])
def test_weight_bytes_equal_real_parameter_storage(model_name, precision, settings):
    """peft keeps its adapters in fp32 on a bf16/fp16 base; everything else is in the model dtype."""
    spec = load_spec(model_name)
    try:
        plan = make_plan(spec, settings)
    except InputError:
        pytest.skip("method does not apply")
    t = TrainingSettings(precision=precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = build_model(spec, settings, dtype=dtype)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ms = model_states(plan, t)
    assert (ms.weights_frozen, ms.weights_trainable) == (frozen, trainable)


@pytest.mark.parametrize("model_name,precision", [("llama-3.1-8b", "bf16"), ("qwen2.5-0.5b", "fp32"), ("gpt2", "bf16"),
                                                  ("bert-base", "fp32"), ("roberta-base", "bf16"), ("vit-b-16", "fp32"),
                                                  ("clip-vit-l-14-336-vision", "bf16"), ("llava-1.5-7b", "bf16")])
def test_buffer_bytes_equal_real_model_buffers(model_name, precision):
    """Rotary inv_freq pairs (fp32 in any dtype), BERT/RoBERTa position and token-type ids, CLIP position
    ids: the bytes of the real model's buffers (built on the meta device)."""
    from peftcalc.model_states import buffer_bytes

    spec = load_spec(model_name)
    method = MethodSettings("projector" if spec.is_vlm else "full")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model = build_model(spec, method, dtype=dtype)
    assert buffer_bytes(spec) == sum(b.numel() * b.element_size() for b in model.buffers())


def _real_optimizer_state_bytes(model, optimizer: str) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-3)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize("settings", [MethodSettings("full"), MethodSettings("lora", rank=4)], ids=lambda s: s.method)
def test_optimizer_states_equal_real_optimizer(optimizer, settings):
    """Every state tensor the real optimizer creates on CPU, the 0-dim AdamW 'step' and Adafactor
    'RMS' included."""
    spec = load_spec(str(CONFIGS / "llama_cls.json"))
    model = build_model(spec, settings, device="cpu", dtype=torch.bfloat16)
    real = _real_optimizer_state_bytes(model, optimizer)
    ms = model_states(make_plan(spec, settings), TrainingSettings(precision="bf16", optimizer=optimizer, device="cpu"))
    assert ms.optimizer_states == real


def test_full_finetune_fp32_adamw_is_16_bytes_per_parameter():
    """Weights 4 + gradients 4 + AdamW m and v 8 = 16 bytes per parameter (ZeRO paper, section 3.1,
    for fp32 training), for Llama-2-7B's 6,738,415,616 parameters."""
    ms = model_states(make_plan(load_spec("llama-2-7b"), MethodSettings("full")),
                      TrainingSettings(precision="fp32", optimizer="adamw"))
    n = 6_738_415_616
    assert (ms.weights_trainable, ms.gradients, ms.optimizer_states) == (4 * n, 4 * n, 8 * n)


def test_nf4_bits_per_parameter_match_qlora_paper():
    """QLoRA section 3: 4-bit codes + 8-bit absmax per 64 values + fp32 per 256 blocks = 4.127 bits
    (the paper's 32/(64*256) term); without double quantization 4 + 32/64 = 4.5 bits."""
    n = 4096 * 4096
    tables = 16 * 4  # the NF4 code table; double quantization adds a 256-entry fp32 code and an offset
    assert nf4_bytes(n, False) == n // 2 + 4 * (n // 64) + tables
    assert nf4_bytes(n, True) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + tables + 256 * 4
    assert abs(8 * nf4_bytes(n, True) / n - 4.127) < 0.001
    assert abs(8 * nf4_bytes(n, False) / n - 4.5) < 0.0001


def test_qlora_quantizes_the_linears_and_keeps_embeddings_and_head():
    """Llama-2-7B: the 32 x (4 x 4096^2 + 3 x 4096 x 11008) linear weights are NF4; the embeddings,
    lm_head (2 x 32000 x 4096) and norms (65 x 4096) stay bf16."""
    plan = make_plan(load_spec("llama-2-7b"), MethodSettings("qlora"))
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert plan.numel_by(quantized=True) == linear
    assert plan.numel_by(quantized=False, trainable=False) == 2 * 32000 * 4096 + 65 * 4096


def test_causal_lm_loss_buffers_by_hand():
    """At the start of backward the fp32 log-softmax output, nll_loss's dense gradient and
    log_softmax's input gradient are alive together: 3 x 4 bytes per logit (batch x seq x vocab)."""
    spec = load_spec("llama-3.1-8b")
    tl = timeline(make_plan(spec, MethodSettings("lora")), TrainingSettings(batch_size=2, seq_len=1024))
    from peftcalc.activations import activation_profile

    act = activation_profile(make_plan(spec, MethodSettings("lora")), TrainingSettings(batch_size=2, seq_len=1024))
    assert act.loss_backward_peak == 12 * 2 * 1024 * 128_256
    assert tl.peak_phase.startswith("backward")


def test_frozen_bottom_saves_no_activations():
    """Freezing the bottom 24 of 32 blocks: blocks 0-23 save nothing (no parameter below them trains)."""
    from peftcalc.activations import activation_profile

    plan = make_plan(load_spec("llama-2-7b"), MethodSettings("freeze", trainable_layers=8))
    act = activation_profile(plan, TrainingSettings(batch_size=1, seq_len=512))
    assert all(a == 0 for a in act.per_layer[:24])
    assert all(a > 0 for a in act.per_layer[24:])


def test_checkpointing_keeps_one_hidden_state_per_block():
    """Non-reentrant checkpointing keeps each block's input: 32 x 512 tokens x 4096 x 2 bytes for
    Llama-2-7B LoRA in bf16, and the rest is recomputed one block at a time."""
    from peftcalc.activations import activation_profile

    plan = make_plan(load_spec("llama-2-7b"), MethodSettings("lora"))
    act = activation_profile(plan, TrainingSettings(batch_size=1, seq_len=512, grad_checkpointing=True))
    assert act.checkpoint_inputs == 32 * 512 * 4096 * 2
    off = timeline(plan, TrainingSettings(batch_size=1, seq_len=512)).peak_bytes
    on = timeline(plan, TrainingSettings(batch_size=1, seq_len=512, grad_checkpointing=True)).peak_bytes
    assert on < off


def test_lora_all_linear_crosses_full_finetuning_at_long_context():
    """peft#1514: TinyLlama-1.1B with LoRA r=64 on all linears (50,462,720 trainable, the figure in
    the issue) used as much memory as full fine-tuning at long context. Each LoRA layer saves its
    own fp32 copy of its input (4 bytes per element, seven per block) where full fine-tuning saves
    the shared bf16 input once, so activations grow faster and overtake the 8 bytes per parameter
    of full fine-tuning's weights, gradients and AdamW states between 2k and 4k tokens."""
    def peak(method, seq, **kw):
        e = peftcalc.estimate("tinyllama-1.1b", method=method, seq_len=seq, precision="bf16", **kw)
        return e.memory.peak_bytes, e.params.trainable

    lora_short, trainable = peak("lora", 2048, rank=64, targets="all-linear")
    assert trainable == 22 * 64 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 5632))
    assert trainable == 50_462_720
    assert lora_short < peak("full", 2048)[0]
    assert peak("lora", 4096, rank=64, targets="all-linear")[0] > peak("full", 4096)[0]


def test_peak_ties_go_to_the_earlier_event():
    """An exact tie names the earlier phase, the rule measure.loop's meters follow (a later phase's peak
    replaces the step's only when strictly larger)."""
    from peftcalc.memory import peak_event

    events = [("forward", 10, {}), ("backward:loss", 12, {}), ("backward:layer0", 12, {}), ("optimizer", 12, {})]
    assert peak_event(events)[0] == "backward:loss"


# Step 1 (no optimizer state until its optimizer step) against the traced first step of committed rows of
# reports/data/ci.jsonl (key given; StorageTracer on cpu, batch 2 x 32 unless the row says otherwise), run by
#     python -c "from measure.matrix import run_matrix; run_matrix('ci', 'reports/data/ci.jsonl')"
STEP1_TRACED = [
    # the first step peaks in backward, before any optimizer state exists
    ("tiny-bert", "adapter", {}, 1_310_536, "6b8cac3fa733b2ed"),
    # ... with bitsandbytes' quantization maps made by AdamW8bit's constructor, held by the optimizer alone
    ("tiny-llama-gqa", "full", {"optimizer": "adamw-8bit"}, 1_567_816, "49f260fd2e8924eb"),
    # the first step peaks in its optimizer step, where the states are created
    ("tiny-bert", "full", {}, 2_072_744, "c601fcabffba3e16"),
    ("tiny-bert", "full", {"precision": "bf16", "batch_size": 4, "grad_checkpointing": True}, 1_039_016,
     "f1591a45e3155233"),
]


@pytest.mark.parametrize("model,method,training,traced,key", STEP1_TRACED, ids=[r[4] for r in STEP1_TRACED])
def test_step1_peak_against_traced_first_step(model, method, training, traced, key):
    from measure.matrix import load_matrix

    spec = load_spec({**load_matrix("ci")["models"][model], "_name_or_path": model})
    t = {"batch_size": 2, "seq_len": 32, "precision": "fp32", "optimizer": "adamw", **training}  # as the rows ran
    e = peftcalc.estimate(spec, method=method, device="cpu", **t)
    assert e.memory.step1_peak_bytes == traced
