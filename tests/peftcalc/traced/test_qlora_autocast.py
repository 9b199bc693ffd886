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
