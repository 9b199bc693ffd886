"""GPU catalog (data in data/gpus.json), fit, FLOPs, time and cost of a step."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from peftcalc.errors import InputError
from peftcalc.checkpointing import checkpointed_layers
from peftcalc.families import build_layout
from peftcalc.families.blip2 import LANGUAGE_PROJECTION, QFORMER, QUERY_TOKENS, blip2_image_tokens, blip2_parts, blip2_vision_tokens
from peftcalc.layout import LINEAR_KINDS, Module
from peftcalc.methods import vision_layers_used
from peftcalc.methods.sites import quantized_paths
from peftcalc.model_states import nf4_bytes
from peftcalc.plan import Plan
from peftcalc.settings import DTYPE_BYTES, TrainingSettings
from peftcalc.sim.llava import vision_plan

__all__ = ["DEFAULT_MFU", "GPU", "GPUS_FILE", "MIB", "StepFlops", "dequant_bytes", "dora_weight_flops", "find_gpu",
           "gpu_catalog", "max_batch_size", "moe_matmuls", "peak_tflops", "step_flops", "step_seconds"]

GPUS_FILE = Path(__file__).parent / "data" / "gpus.json"
MIB = 1024**2
DEFAULT_MFU = 0.35  # model FLOPs utilisation of a single-GPU HF fine-tuning run (typical 0.3-0.45)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16_tflops: float
    fp32_tflops: float
    price_per_hour: float
    source: str
    memory_gbs: float = 0.0  # HBM/GDDR bandwidth, GB/s (datasheet): the NF4 dequantization's time
    intra_node_gbps: float = 0.0  # GB/s one way per GPU inside a node (NVLink, PCIe)
    inter_node_gbps: float = 0.0  # GB/s one way per GPU between nodes (InfiniBand, Ethernet)


@lru_cache(maxsize=1)
def gpu_catalog() -> tuple[GPU, ...]:
    data = json.loads(GPUS_FILE.read_text())
    return tuple(
        GPU(g["name"], g["memory_mib"] * MIB, g["bf16_tflops"], g["fp32_tflops"], g["price_per_hour"], g["source"],
            g["memory_gbs"], g.get("intra_node_gbps", 0.0), g.get("inter_node_gbps", 0.0))
        for g in data["gpus"]
    )


@lru_cache(maxsize=1)
def _gpu_keys() -> dict[str, str]:
    keys = {}
    for g in json.loads(GPUS_FILE.read_text())["gpus"]:
        keys[_norm(g["name"])] = g["name"]
        for alias in g["aliases"]:
            keys[_norm(alias)] = g["name"]
    return keys


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "").replace("_", "")


def find_gpu(name: str) -> GPU:
    key = _gpu_keys().get(_norm(name))
    if key is None:
        names = [g.name for g in gpu_catalog()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names)}"
        raise InputError(f"unknown GPU '{name}'{hint}")
    return next(g for g in gpu_catalog() if g.name == key)


def peak_tflops(gpu: GPU, t: TrainingSettings) -> float:
    """Tensor-core bf16/fp16 peak for bf16/fp16/amp policies; the FP32 peak for fp32 (PyTorch keeps
    torch.backends.cuda.matmul.allow_tf32 = False by default)."""
    return gpu.fp32_tflops if t.precision == "fp32" else gpu.bf16_tflops


@dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def step_flops(plan: Plan, t: TrainingSettings, tokens_per_sequence: int) -> StepFlops:
    """Matmul FLOPs of one training step.

    Forward: 2 FLOPs per multiply-accumulate of every Linear (2 * params * tokens, Kaplan et al. 2020,
    "Scaling Laws", section 2.1) plus attention's two s x s matmuls, 4 * s_q * s_k * d per layer and
    sequence (Chowdhery et al. 2022, PaLM, appendix B).
    Backward: each matmul costs one forward again for the gradient of its input, when a trainable
    parameter lies below it, and once more for its weight gradient, when its weight trains (so full
    fine-tuning is the familiar 6N per token, and a frozen layer above LoRA costs 4N, not 6N).
    Nothing below the lowest trainable parameter runs backward. Checkpointing re-runs the forward of
    the blocks that run backward (Narayanan et al. 2021, Megatron-LM, section 5.1), of those it wraps
    (peftcalc.checkpointing: every N-th with --checkpoint-every N; a reentrant checkpoint re-runs the
    whole block, as counted here).
    Embedding lookups, norms and element-wise ops are not counted (under 1% for these models).
    """
    spec = plan.spec
    if spec.is_blip2:
        return _blip2_step_flops(plan, t, tokens_per_sequence)
    layout = build_layout(spec)
    wrapped = checkpointed_layers(spec, t, "text")
    b = t.batch_size
    seq = tokens_per_sequence
    kv_seq = seq + (plan.settings.num_virtual_tokens if plan.settings.method == "prefix" else 0)
    trainable_modules = _trainable_modules(plan)
    lora_modules = set(plan.targets) if plan.settings.method in ("lora", "qlora") else set()
    input_grad_from = _lowest_gradient_layer(plan)
    fwd = bwd = recompute = 0.0
    tokens = b * seq
    matmuls = [m for m in layout.modules if m.kind in LINEAR_KINDS] + moe_matmuls(layout, plan, trainable_modules)
    if layout.head_tied_to_embedding:  # the lm_head runs as a matmul with the embedding's weight
        matmuls.append(Module("lm_head", "linear", (spec.vocab_size, spec.hidden_size), False, None, "head"))
        if plan.embedding_trains:
            trainable_modules.add("lm_head")
    for m in matmuls:
        mac = m.in_features * m.out_features
        if m.role == "head" and spec.task in ("seq_cls", "image_cls"):
            tokens_m = b  # classifiers run on the pooled / last token
        elif m.role == "vision":  # a VLM's vision tower runs on the patches and the class token
            tokens_m = b * spec.vision.vision_seq_len
        elif m.role == "projector":  # and its projector on the image tokens
            tokens_m = b * spec.image_tokens
        elif m.role == "experts":  # one expert's matmul on each of a token's top_k experts
            tokens_m = tokens * spec.experts_per_token
        else:
            tokens_m = tokens
        f = 2.0 * mac * tokens_m
        fwd += f
        layer = m.layer if m.layer is not None else (spec.num_layers if m.role in ("head", "pooler") else -1)
        flows = input_grad_from is not None and layer > input_grad_from
        grad_w = m.path in trainable_modules
        in_lowest = input_grad_from is not None and layer == input_grad_from
        if flows or (in_lowest and grad_w):
            bwd += f * (flows + grad_w)
        if m.path in lora_modules and m.role == "experts":  # the merged weight's baddbmm, forward and backward,
            lf = 2.0 * spec.num_experts * plan.settings.rank * m.in_features * m.out_features  # per expert stack
            fwd += lf
            bwd += 2 * lf
        elif m.path in lora_modules:
            r = plan.settings.rank
            lf = 2.0 * r * (m.in_features + m.out_features) * tokens_m
            fwd += lf
            bwd += 2 * lf
            if plan.settings.dora:  # the weight norm's lora_B(lora_A(eye(in))) (dora_weight_flops), every forward
                fwd += dora_weight_flops(m.in_features, m.out_features, r)
                if wrapped and m.layer is not None and wrapped[m.layer]:
                    recompute += dora_weight_flops(m.in_features, m.out_features, r)
        if wrapped and m.layer is not None and wrapped[m.layer] and (flows or grad_w):
            recompute += f
    if spec.is_vlm:  # the vision tower's attention, its adapters and its backward
        fwd += 4.0 * b * spec.vision.vision_seq_len ** 2 * spec.vision.q_dim * spec.vision.num_layers
        vision = _vision_tower_flops(plan, t)
        fwd, bwd, recompute = fwd + vision.forward, bwd + vision.backward, recompute + vision.recompute
    attn_per_layer = 4.0 * b * seq * kv_seq * spec.q_dim
    for i in range(spec.num_layers):
        fwd += attn_per_layer
        if input_grad_from is not None and i >= input_grad_from:
            bwd += 2 * attn_per_layer
            if wrapped and wrapped[i]:
                recompute += attn_per_layer
    return StepFlops(fwd, bwd, recompute)


def _blip2_step_flops(plan: Plan, t: TrainingSettings, tokens_per_sequence: int) -> StepFlops:
    """step_flops for Blip2ForConditionalGeneration (the same counting rules): the EVA tower's Linears on its
    patches and class token and its attention, forward only (frozen, nothing below it trains); the Q-Former on
    num_query_tokens, its cross-attention keys and values on the tower's tokens, and the language projection
    on the queries; OPT on the queries and the text (`tokens_per_sequence`) with the lm_head tied to the
    embeddings. A trainable Q-Former sends gradients back through every OPT block to the projection (input
    gradients), and through its own layers (input gradients, except for the cross-attention keys and values,
    whose input is the frozen tower's output; weight gradients where weights train). Checkpointing re-runs
    the forward of the OPT blocks and of the Q-Former layers it wraps (both GradientCheckpointingLayers;
    peftcalc.checkpointing)."""
    spec = plan.spec
    vspec, qspec, _ = blip2_parts(spec)
    b, seq = t.batch_size, tokens_per_sequence
    queries, vision_tokens = blip2_image_tokens(spec), blip2_vision_tokens(spec)
    trainable = _trainable_modules(plan)
    trains = [g.name for g in plan.groups if g.trainable]
    qformer_grad = any(n == QUERY_TOKENS or n.startswith(QFORMER + ".") for n in trains)
    below_text = qformer_grad or any(n.startswith(LANGUAGE_PROJECTION + ".") for n in trains)
    matmuls = [m for m in build_layout(spec).modules if m.kind in LINEAR_KINDS]
    matmuls.append(Module("lm_head", "linear", (spec.vocab_size, spec.hidden_size), False, None, "head"))
    wrapped_text, wrapped_qformer = checkpointed_layers(spec, t, "text"), checkpointed_layers(spec, t, "qformer")
    fwd = bwd = recompute = 0.0
    for m in matmuls:
        cross_kv = m.path.endswith((".crossattention.attention.key", ".crossattention.attention.value"))
        if m.role == "vision" or cross_kv:
            tokens = b * vision_tokens
        elif m.role == "projector":
            tokens = b * queries
        else:
            tokens = b * seq
        f = 2.0 * m.in_features * m.out_features * tokens
        fwd += f
        grad_w = m.path in trainable
        if m.role == "vision":
            grad_in = False
        elif m.path.startswith(QFORMER + "."):
            grad_in = qformer_grad and not cross_kv
        elif m.path == LANGUAGE_PROJECTION:
            grad_in = qformer_grad
        else:
            grad_in = below_text
        bwd += f * (grad_in + grad_w)
        if _blip2_wrapped(m, wrapped_text, wrapped_qformer) and (grad_in or grad_w):
            recompute += f
    fwd += 4.0 * b * vision_tokens ** 2 * vspec.q_dim * vspec.num_layers
    cross = dict(spec.blip2)["qformer_cross_attention_frequency"]
    qformer_layer_attn = [4.0 * b * queries * qspec.q_dim * (queries + (vision_tokens if i % cross == 0 else 0))
                          for i in range(qspec.num_layers)]
    text_layer_attn = [4.0 * b * seq * seq * spec.q_dim] * spec.num_layers
    fwd += sum(qformer_layer_attn) + sum(text_layer_attn)
    for attn, grad, wrapped in ((qformer_layer_attn, qformer_grad, wrapped_qformer),
                                (text_layer_attn, below_text, wrapped_text)):
        if grad:
            bwd += 2 * sum(attn)
            recompute += sum(a for a, w in zip(attn, wrapped) if w)
    return StepFlops(fwd, bwd, recompute)


def _blip2_wrapped(m: Module, wrapped_text: tuple, wrapped_qformer: tuple) -> bool:
    """Whether checkpointing wraps the layer holding matmul `m`: an OPT block (m.layer) or a Q-Former
    layer (``qformer.encoder.layer.<i>.``)."""
    if m.layer is not None:
        return bool(wrapped_text) and wrapped_text[m.layer]
    prefix = f"{QFORMER}.encoder.layer."
    if wrapped_qformer and m.path.startswith(prefix):
        return wrapped_qformer[int(m.path[len(prefix):].split(".", 1)[0])]
    return False
def _vision_tower_flops(plan: Plan, t: TrainingSettings) -> StepFlops:
    """What a VLM's vision tower adds to the forward matmuls step_flops counts from the layout: the
    adapters' two matmuls each (forward; backward for the weight and, except the lowest adapter, whose input
    needs none, for the input), and the input-gradient backward (its matmuls and attention, as above) of
    every vision layer between the lowest trainable one and the layer the projector reads. In the lowest
    trainable layer that backward runs through the whole layer when its own weights train
    (--vision-layers), through fc1 and fc2 behind a Houlsby attention adapter, and nowhere for an
    adapter at the layer's end (Pfeiffer, or the block adapter). Under gradient checkpointing the
    tower's input needs a gradient (enable_input_require_grads: sim.llava._vision_input_grad_saves), so
    every layer the projector reads runs backward and each it wraps (peftcalc.checkpointing) is recomputed
    once."""
    v = plan.spec.vision
    vplan = vision_plan(plan)
    lowest = -1 if t.grad_checkpointing else vplan.lowest_trainable_layer
    if lowest is None:
        return StepFlops(0.0, 0.0, 0.0)
    tokens = t.batch_size * v.vision_seq_len
    h, inter = v.hidden_size, v.intermediate_size
    layer = 2.0 * (4 * h * h + 2 * h * inter) * tokens + 4.0 * t.batch_size * v.vision_seq_len ** 2 * v.q_dim
    used = vision_layers_used(plan.spec)
    fwd = bwd = 0.0
    kind, bottleneck = vplan.settings.adapter_kind, vplan.settings.bottleneck
    adapters = [g for g in vplan.groups if g.origin == "adapter" and g.name.rsplit(".", 2)[-2] in ("down", "down_proj")
                and g.name.endswith(".weight")]
    for j, _ in enumerate(adapters):
        f = 2.0 * h * bottleneck * tokens  # one of the two matmuls
        fwd += 2 * f
        bwd += 4 * f if (j or t.grad_checkpointing) else 3 * f
    full = used - 1 - lowest  # the layers above the lowest trainable one
    if lowest >= 0 and any(g.trainable and g.origin == "base" and g.layer == lowest for g in vplan.groups):
        full += 1
    elif lowest >= 0 and adapters and kind == "houlsby":
        bwd += 2.0 * 2 * h * inter * tokens
    bwd += full * layer

    wrapped = checkpointed_layers(plan.spec, t, "vision")
    return StepFlops(fwd, bwd, sum(wrapped[:used]) * layer)


def moe_matmuls(layout, plan: Plan, trainable_modules: set) -> list[Module]:
    """A mixture-of-experts model's router and fused experts as matmuls (kind "param" in the layout): the router an
    (E x hidden) Linear on every token (named as its module, without '.weight'), each experts parameter (E, out, in)
    one expert's (out x in) matmul per (token, expert) pair (step_flops counts tokens x top_k for them). A trained
    parameter, or one LoRA merges into (peft target_parameters: its gradient is computed whole), joins
    `trainable_modules`."""
    out = []
    lora = set(plan.targets) if plan.settings.method in ("lora", "qlora") else set()
    trained = {g.name for g in plan.groups if g.trainable and g.origin == "base"}
    for m in layout.modules:
        if m.role == "router":
            path = m.path[: -len(".weight")]
            out.append(Module(path, "linear", m.shape, False, m.layer, "router"))
            if m.path in trained:
                trainable_modules.add(path)
        elif m.role == "experts":
            out.append(Module(m.path, "linear", m.shape[1:], False, m.layer, "experts"))
            if m.path in trained or m.path in lora:
                trainable_modules.add(m.path)
    return out


def dora_weight_flops(in_features: int, out_features: int, rank: int) -> float:
    """FLOPs of DoRA's extra matmuls per forward of one adapted Linear, whatever the batch: peft
    tuners/lora/dora.py DoraLinearLayer.get_lora_weight runs ``lora_B(lora_A(torch.eye(in)))`` (in x in x r,
    then in x r x out multiply-adds) for the weight norm ||W + s B A||_c (Liu et al. 2024, DoRA, section 4.3:
    the norm is detached, so no backward); the norm itself is element-wise, and the base result is reused
    (peft passes base_result when lora_dropout is 0)."""
    return 2.0 * in_features * rank * (in_features + out_features)


def dequant_bytes(plan: Plan, t: TrainingSettings) -> int:
    """Bytes one micro-batch's NF4 dequantizations move (QLoRA): bitsandbytes MatMul4Bit
    (autograd/_functions.py) dequantizes each Linear4bit's weight in its forward
    (``F.dequantize_4bit(B, quant_state).to(A.dtype)``) and again in its backward when its input needs a
    gradient (grad_A = grad_output @ the dequantized weight); a checkpointed block's recompute runs the
    forward again; peft's DoRA dequantizes the weight once more per forward for its norm
    (dora.py: dequantize_module_weight). Each reads the packed weight and its quantization state
    (model_states.nf4_bytes) and writes the weight in the compute dtype: a memory-bound kernel, timed at the
    GPU's bandwidth (hardware.step_seconds)."""
    if plan.settings.method != "qlora" or plan.spec.is_blip2:
        return 0
    spec = plan.spec
    quantized = quantized_paths(plan)
    wrapped = checkpointed_layers(spec, t, "text")
    input_grad_from = _lowest_gradient_layer(plan)
    dora_modules = set(plan.targets) if plan.settings.dora else set()
    written = DTYPE_BYTES[t.compute_dtype]
    total = 0
    for m in build_layout(spec).modules:
        if m.path not in quantized:
            continue
        n = m.in_features * m.out_features
        layer = m.layer if m.layer is not None else spec.num_layers
        flows = input_grad_from is not None and layer > input_grad_from
        recomputed = bool(wrapped) and m.layer is not None and wrapped[m.layer] and flows
        forwards = 1 + recomputed
        uses = forwards + flows + (forwards if m.path in dora_modules else 0)
        total += uses * (nf4_bytes(n, plan.settings.double_quant) + n * written)
    return total


def step_seconds(plan: Plan, t: TrainingSettings, gpu: GPU, mfu: float, tokens_per_sequence: int) -> float:
    """Seconds of one micro-batch: its matmul FLOPs (step_flops) at `mfu` of the GPU's peak, plus QLoRA's NF4
    dequantizations (dequant_bytes) at the GPU's memory bandwidth (a memory-bound kernel: a lower bound on
    its time)."""
    flops = step_flops(plan, t, tokens_per_sequence).total
    dequant = dequant_bytes(plan, t) / (gpu.memory_gbs * 1e9) if gpu.memory_gbs else 0.0
    return flops / (peak_tflops(gpu, t) * 1e12 * mfu) + dequant


def _trainable_modules(plan: Plan) -> set[str]:
    out = set()
    for g in plan.groups:
        if g.trainable and g.origin == "base" and g.name.endswith(".weight"):
            out.add(g.name[: -len(".weight")])
        elif g.trainable and g.origin == "head_copy" and plan.spec.is_vlm and g.name.endswith(".weight#modules_to_save"):
            out.add(g.name[: -len(".weight#modules_to_save")])  # the projector, trained through its copy
    return out


def _lowest_gradient_layer(plan: Plan) -> int | None:
    """The lowest block that runs backward (-1: the embeddings train, so every block does)."""
    if plan.embedding_trains or plan.settings.method in ("prompt", "prefix"):
        return -1
    if plan.lowest_trainable_layer is not None:
        return plan.lowest_trainable_layer
    if plan.trainable:
        return plan.spec.num_layers  # only the head (or final norm) trains
    return None


def max_batch_size(intercept: float, slope: float, capacity: int, limit: int = 1 << 16) -> int:
    """Largest batch b with intercept + slope * b <= capacity (memory is linear in the batch size at
    every event of the step; the peak is the largest of those lines)."""
    if intercept + slope > capacity:
        return 0
    if slope <= 0:
        return limit
    return int(min(limit, (capacity - intercept) // slope))
