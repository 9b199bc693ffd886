"""The auxiliary load-balancing loss of mixture-of-experts models (output_router_logits; transformers
models/mixtral/modeling_mixtral.py load_balancing_loss_func, added to the loss times router_aux_loss_coef):
predictions held against the harness's fake-tensor traces, and the extra bytes derived by hand."""

import pytest

from measure.run import measure_one
from peftcalc import estimate
from peftcalc.errors import CombinationError
from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings

TINY_MIXTRAL = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                "vocab_size": 512, "num_local_experts": 4, "num_experts_per_tok": 2}
TINY_QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                  "intermediate_size": 128, "moe_intermediate_size": 32, "vocab_size": 512, "num_experts": 8,
                  "num_experts_per_tok": 2, "norm_topk_prob": True}
T, E, K, L = 2 * 64, 4, 2, 2  # tokens (batch 2 x 64), experts, top-k, layers of TINY_MIXTRAL


def _events(precision, aux):
    e = estimate(TINY_MIXTRAL, method="lora", batch_size=2, seq_len=64, precision=precision, device="cpu",
                 router_aux_loss=aux)
    return e.memory.peak_bytes, dict(e.memory.events)


@pytest.mark.parametrize("precision,nbytes", [("bf16", 2), ("fp32", 4)])
def test_extra_bytes_by_hand(precision, nbytes):
    """Each layer's router logits, T x E in the weights' dtype: all L held at the loss's forward, all L gradients
    (made by the auxiliary loss's backward, which runs first) pending at the loss and the head, at block i those of
    blocks 0..i (its own among its backward's incoming gradients)."""
    logits = T * E * nbytes
    _, off = _events(precision, False)
    _, on = _events(precision, True)
    assert on["forward"] - off["forward"] == L * logits
    assert on["backward:loss"] - off["backward:loss"] == L * logits
    assert on["backward:head"] - off["backward:head"] == L * logits
    assert on["backward:layer1"] - off["backward:layer1"] == 2 * logits
    assert on["backward:layer0"] - off["backward:layer0"] == logits


def test_aux_loss_forward_by_hand():
    """fp32: ForCausalLMLoss has returned (its padded labels, 2 x 65 int64, gone; no fp32 copy of fp32 logits);
    the last iteration's topk makes its values (fp32) and int64 indices while the previous layer's are still
    referenced by ``_, selected_experts``, with both layers' softmax outputs and the two (E,) fp32 sums alive."""
    _, on = _events("fp32", True)
    padded_labels = 2 * 65 * 8
    softmax = L * T * E * 4
    topk = 2 * T * K * (4 + 8)
    assert on["forward:aux_loss"] - on["forward"] == -padded_labels + softmax + topk + 2 * E * 4 == 9_232


@pytest.mark.parametrize("precision,peak,forward", [
    ("bf16", 2_082_568, 1_969_944),  # traced, fake tensors: 2,048 B (L x T x E x 2) over the run without it
    ("fp32", 2_958_728, 2_740_648),  # the forward's peak is the auxiliary loss's topk
])
def test_traced_tiny_mixtral_lora(precision, peak, forward):
    predicted, events = _events(precision, True)
    assert predicted == peak
    assert max(v for k, v in events.items() if k.startswith("forward")) == forward


def test_off_is_the_traced_run_without_it():
    assert _events("bf16", False)[0] == 2_080_520  # traced, fake tensors: output_router_logits false


def test_qwen3_moe_full_checkpointed_trace_equals_prediction():
    row = measure_one(TINY_QWEN3_MOE, MethodSettings("full"), TrainingSettings(
        batch_size=2, seq_len=64, precision="bf16", optimizer="sgd", grad_checkpointing=True, router_aux_loss=True),
        "fake", 2)
    assert row["outcome"] == "ok", row["error"]
    assert row["harness"]["output_router_logits"] is True
    forward = row["measured"]["steps"][-1]["phases"]["forward"]["peak_bytes"]
    e = estimate(TINY_QWEN3_MOE, method="full", batch_size=2, seq_len=64, precision="bf16", optimizer="sgd",
                 grad_checkpointing=True, router_aux_loss=True, device="cpu")
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"] == e.memory.peak_bytes == 1_757_064
    assert forward == max(v for k, v in e.memory.events.items() if k.startswith("forward")) == 1_628_056


@pytest.mark.parametrize("training", [dict(precision="amp-bf16"), dict(grad_checkpointing=True, checkpoint_reentrant=True),
                                      dict(grad_accum=2), dict(keep_outputs=True)])
def test_combinations_not_modelled_are_refused(training):
    with pytest.raises(CombinationError, match="router_aux_loss"):
        estimate(TINY_MIXTRAL, method="lora", router_aux_loss=True, device="cpu", **{"precision": "bf16", **training})


def test_a_config_with_output_router_logits_turns_it_on():
    e = estimate({**TINY_MIXTRAL, "output_router_logits": True}, method="lora", batch_size=2, seq_len=64,
                 precision="bf16", device="cpu")
    assert e.memory.peak_bytes == 2_082_568  # the traced run with it on (test_traced_tiny_mixtral_lora)


def test_a_dense_model_is_refused():
    with pytest.raises(CombinationError, match="router_aux_loss"):
        estimate("qwen2.5-0.5b", router_aux_loss=True)


CONFIGS = __import__("pathlib").Path(__file__).parents[1] / "training_configs" / "configs"


def test_llamafactory_sets_output_router_logits_on_mixtral():
    """LLaMA-Factory model/model_utils/moe.py configure_moe: output_router_logits = is_trainable for mixtral (and
    dbrx, jamba, jetmoe, qwen2_moe); its reentrant checkpointing default is not modelled with it: a warning."""
    from peftcalc.training_configs import from_files

    path = CONFIGS / "llamafactory-lora-sft.yaml"
    run = from_files(path, given={"model": "mixtral-8x7b", "grad_accum": 1, "checkpoint_reentrant": False})
    assert run.training["router_aux_loss"] is True
    run = from_files(path, given={"model": "mixtral-8x7b"})
    assert "router_aux_loss" not in run.training and "output_router_logits" in run.warning()
    assert "router_aux_loss" not in from_files(path, given={"model": "qwen3-30b-a3b", "grad_accum": 1,
                                                            "checkpoint_reentrant": False}).training
