"""QLoRA (no prepare_model_for_kbit_training) under amp-bf16 and checkpointing, against traced steps.

Every peak below is a committed row of reports/data/ci.jsonl (its key is given), traced on fake tensors
by the StorageTracer (two steps, AdamW; the steady-state step's peak):

    python -c "from measure.matrix import run_matrix; run_matrix('ci', 'reports/data/ci.jsonl')"

or one row at a time, e.g. for the first one

    python -c "from measure.matrix import to_run, load_matrix; from measure.run import measure_one;
    r = to_run({'model': 'tiny-llama', 'method': 'qlora', 'precision': 'amp-bf16', 'batch_size': 3,
    'seq_len': 48, 'device': 'fake'}, load_matrix('ci')['models']);
    print(measure_one(r.spec, r.method, r.training, device='fake', steps=2)['measured']['peak_bytes'])"

Under amp-bf16 the harness loads the model in fp32 (torch_dtype) with bnb_4bit_compute_dtype bf16 and runs
the step under torch.autocast(bf16) (measure.setup.precision_policy, measure.build.build_qlora_model)."""

import pytest

import peftcalc
from peftcalc.ops.context import StepContext
from peftcalc.ops.linear import matmul_4bit_backward_steps
from peftcalc.backward import Node, run_backward
from matrix_models import matrix_spec

# (model, precision, batch, seq, checkpointing, traced peak bytes, ci.jsonl key, predicted - traced)
TRACED = [
    # Llama: fp32 embeddings, norms and lm_head; Linear4bit returns fp32 (q, k, v, the MLP's
    # intermediates), SDPA autocasts q, k, v, LoRA's autocast copies of its input
    ("tiny-llama", "amp-bf16", 3, 48, False, 2_161_112, "a20e1eadbe0da051", 0),
    ("tiny-mistral", "amp-bf16", 3, 48, False, 2_088_728, "5352328631a8adc9", 0),
    ("tiny-qwen2", "amp-bf16", 3, 48, False, 1_982_296, "51e8b502fea40a14", 0),
    # checkpointed: the (1, 48) int64 position ids the checkpoints' kwargs hold count (they were the
    # 384 bytes every checkpointed tiny-llama row lacked, whatever the method)
    ("tiny-llama", "amp-bf16", 3, 48, True, 1_439_384, "e45af761808286be", 0),
    # GPT-2's Conv1D layers are Linear4bit too
    ("tiny-gpt2", "amp-bf16", 3, 48, False, 3_604_440, "89b4fc36b7fb9482", 0),
    ("tiny-gpt2", "amp-bf16", 3, 48, True, 2_020_184, "6c4c612c49c68a38", 0),
    # BERT: the MLM transform dense is NF4 (fp32 output, GELU and LayerNorm in fp32), the CPU math path
    # upcasts SDPA's bf16 copies of q, k, v and returns bf16 (attention.output.dense keeps it: its input is bf16)
    ("tiny-bert", "amp-bf16", 3, 48, False, 2_647_312, "dd9dd1824bca3fee", 0),
    ("tiny-bert", "amp-bf16", 3, 48, True, 1_485_712, "d383e5f7680d1306", 0),
    # checkpointed vision blocks: fc2's MatMul4Bit backward runs before the recompute; fc1's compute-dtype
    # input stays alive until Linear4bit.forward returns
    ("tiny-clip-vision", "amp-bf16", 3, 48, True, 421_072, "e40af5c7c784bc9c", 0),
    ("tiny-vit-cls", "amp-bf16", 3, 48, True, 376_454, "ab39d6d503b5bab9", 0),
    ("tiny-vit-cls", "fp32", 1, 64, True, 260_386, "435f67114eb1e978", 0),
    ("tiny-clip-vision", "fp32", 1, 64, True, 259_304, "588acee9e4b09019", 0),
]


def _estimate(model, precision, batch, seq, ckpt):
    spec = matrix_spec(model)
    return peftcalc.estimate(spec, method="qlora", batch_size=batch, seq_len=seq, precision=precision,
                             grad_checkpointing=ckpt, optimizer="adamw", device="cpu")


@pytest.mark.parametrize("model,precision,batch,seq,ckpt,traced,key,diff", TRACED,
                         ids=[f"{r[0]}-{r[1]}-{'ckpt' if r[4] else 'nockpt'}-{r[6]}" for r in TRACED])
def test_qlora_peak_against_traced_step(model, precision, batch, seq, ckpt, traced, key, diff):
    e = _estimate(model, precision, batch, seq, ckpt)
    assert e.memory.peak_bytes - traced == diff
    assert e.memory.peak_phase.startswith("backward")


def test_qlora_amp_components_at_the_peak():
    """ci.jsonl row a20e1eadbe0da051 (tiny-llama qlora amp-bf16, 3 x 48, fake): at the peak the tracer
    counts parameters 337,456 (the NF4 layers plus the fp32 embeddings, lm_head and norms, the rotary
    buffers), activations 1,199,872 and other 589,832 (the loss's two fp32 gradients and scalars)."""
    c = dict(_estimate("tiny-llama", "amp-bf16", 3, 48, False).memory.components)
    assert c["weights_frozen"] + c["weights_trainable"] + c["buffers"] == 337_456
    assert c["activations"] == 1_199_872
    assert c["logits_loss"] + c["temporaries"] == 589_832


def test_matmul_4bit_backward_dequantizes_in_the_loaded_dtype():
    """MatMul4Bit.backward on tiny-vit-cls's fc2 (in 128, out 64; 51 tokens) under amp-bf16, traced on
    fake tensors: dequantize_blockwise (128,) fp32 512 B, dequantize_4bit (64, 128) fp32 32,768 B, its
    .to(bf16) 16,384 B, then mm (51, 128) bf16 13,056 B (the first two die before the mm). The peak is
    the fp32 weight and its bf16 copy: 49,152 bytes, 36,096 besides grad_A."""
    ctx = StepContext(batch=3, seq=17, kv_seq=17, compute_dtype="bfloat16", weight_dtype="float32", autocast="bfloat16",
              adapter_dtype="float32", device="cpu", attention="sdpa", quant_compute="bfloat16",
              quant_source="float32", quant_nested=True)
    grad_out, grad_a = 51 * 64 * 2, 51 * 128 * 2

    def replay(c: StepContext) -> int:  # MatMul4Bit's node as ops.linear.matmul records it, from a bf16 grad_output
        steps = tuple(matmul_4bit_backward_steps(c, 128, 64)) + (("new", "d0", grad_a), ("free", "wc"))
        return run_backward([Node(2, steps, ((1, "d0"),))], {}, {2: grad_out}, False).peak.total

    assert replay(ctx) == grad_out + 32_768 + 16_384
    # loaded in bf16 (the bf16 policy): dequantize_4bit returns bf16, .to() copies nothing; the
    # nested absmax (512 B) is smaller than grad_A, so the peak is the weight and grad_A
    bf16 = StepContext(**{**ctx.__dict__, "weight_dtype": "bfloat16", "autocast": None, "quant_source": "bfloat16"})
    assert replay(bf16) == grad_out + 16_384 + grad_a


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
