"""The model's states: weights (NF4-quantized, in their storage dtype), buffers, gradients and optimizer
states, by the dtypes the precision policy and the method give each parameter group, and the optimizer
step's temporaries (peftcalc.memory puts them on the step's timeline).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from math import ceil

from peftcalc.families import build_layout, family
from peftcalc.plan import Plan
from peftcalc.settings import (DTYPE_BYTES, EIGHT_BIT_OPTIMIZERS, ONE_STATE_OPTIMIZERS, PAGED_OPTIMIZERS,
                               TrainingSettings)
from peftcalc.methods.sites import quantized_paths
from peftcalc.sim.profile import engine_cast, stream_dtypes
from peftcalc.families import kept_in_fp32

__all__ = ["BNB_QUANTIZATION_MAPS", "ModelStates", "buffer_bytes", "cls_token_gradient_storage", "gradient_free",
           "group_dtype", "model_states", "PAGED_MIN_NUMEL", "clip_grad_norm_bytes", "nf4_bytes", "optimizer_temporaries",
           "paged_state_bytes", "quantization_maps", "scalar_state_bytes", "tied_embedding_addends"]

# bitsandbytes Optimizer8bit.__init__ (optim_bits=8) -> fill_qmap: create_dynamic_map(signed=True) and
# (signed=False), 256 fp32 values each, shared by every 8-bit state (state['qmap1'], state['qmap2']).
BNB_QUANTIZATION_MAPS = 2 * 256 * 4
BNB_QUANTIZATION_MAP = 256 * 4  # one of them



def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one NF4-quantized weight (bitsandbytes functional.quantize_4bit, blocksize 64):
    two 4-bit codes per byte, one absmax per 64 values: fp32 (0.5 bit/param), or with double
    quantization an 8-bit absmax plus one fp32 second-level scale per 256 blocks
    (Dettmers et al. 2023, QLoRA, section 3: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter).
    Each QuantState also holds its code table (16 fp32 NF4 levels) and, double-quantized, the
    nested state's 256-entry fp32 code and fp32 offset (bitsandbytes functional.QuantState)."""
    blocks = ceil(numel / 64)
    codes = ceil(numel / 2)
    nf4_code = 16 * 4
    if not double_quant:
        return codes + 4 * blocks + nf4_code
    return codes + blocks + 4 * ceil(blocks / 256) + 4 + nf4_code + 256 * 4


def buffer_bytes(spec, weight_dtype: str = "float32") -> int:
    """The model's registered buffers (what ``model.buffers()`` holds besides the parameters):
    LlamaRotaryEmbedding (also Mistral, Qwen2) registers ``inv_freq`` and ``original_inv_freq``,
    head_dim / 2 fp32 values each, kept fp32 whatever the model's dtype (transformers 5.x
    modeling_rope_utils computes them with ``.float()``); BertEmbeddings / RobertaEmbeddings register
    ``position_ids`` and ``token_type_ids``, (1, max_position_embeddings) int64 each;
    CLIPVisionEmbeddings registers ``position_ids``, (1, patches + 1) int64. GPT-2 and ViT register
    none. A LLaVA model has its vision tower's and its language model's. Buffers that take the model's
    dtype (Family.dtype_buffers: Gemma's embed_scale) count in `weight_dtype`, the dtype it is loaded in."""
    if spec.is_vlm:
        return buffer_bytes(spec.vision, weight_dtype) + buffer_bytes(spec.text, weight_dtype)
    hook, in_dtype = family(spec).buffer_bytes, family(spec).dtype_buffers
    return (hook(spec) if hook else 0) + in_dtype * DTYPE_BYTES[weight_dtype]


@lru_cache(maxsize=1024)
def gradient_free(plan: Plan) -> frozenset:
    """Names of trainable parameters the step's loss never reaches: they get no .grad and so no
    optimizer state (torch's and transformers' optimizers skip a parameter whose grad is None). A bare
    encoder is trained on last_hidden_state (measure.setup forward_loss), which neither the pooler
    (BertModel/ViTModel `pooler.dense`) nor CLIP's post_layernorm (CLIPVisionTransformer applies it to
    the pooled token only) feeds."""
    spec = plan.spec
    if spec.task != "base":
        return frozenset()
    layout = build_layout(spec)
    unused = [m.path for m in layout.modules if m.role == "pooler"]
    if family(spec).final_norm == "pooled" and layout.final_norm_path:
        unused.append(layout.final_norm_path)
    return frozenset(g.name for g in plan.groups if g.trainable and any(g.name.startswith(p + ".") for p in unused))


def group_dtype(plan: Plan, origin: str, ctx_weight: str, name: str = "", cast: bool = False) -> str:
    """Storage dtype of a parameter by origin: base weights in the policy's weight dtype, except those
    from_pretrained keeps in fp32 (families.kept_in_fp32: BLIP-2's Q-Former and query tokens under fp16);
    peft's adapters (LoRA, DoRA, IA3) in fp32 (peft autocast_adapter_dtype=True upcasts bf16/fp16
    adapters; Plan.adapter_dtype: bf16 where FSDP2's MixedPrecisionPolicy all-gathers them so); the prompt
    encoders in fp32 (created as nn.Embedding and never cast); bottleneck adapters and the modules_to_save
    copy in the base dtype. `cast`: every parameter in `ctx_weight`, the dtype a DeepSpeed engine cast the model
    to (peftcalc.sim.profile.engine_cast)."""
    if cast:
        return ctx_weight
    if origin in ("lora", "dora", "ia3", "prefix", "prompt"):
        return plan.adapter_dtype
    if origin == "base" and kept_in_fp32(plan.spec, name, ctx_weight):
        return "float32"
    return ctx_weight


@dataclass(frozen=True)
class ModelStates:
    weights_frozen: int
    weights_trainable: int
    gradients: int
    optimizer_states: int
    optimizer_temporaries: int
    largest_trainable_tensor: int
    optimizer_maps: int = 0  # tensors the optimizer makes at construction (bitsandbytes' quantization maps)
    maps_in_state: bool = False  # whether optimizer.state references them (an 8-bit state exists)
    grad_tensors: tuple = ()  # (dtype, how many parameters have a .grad of it), in dtype order
    paged_states: int = 0  # optimizer state in CUDA unified memory (paged_state_bytes), not in the others
    optimizer_spare_maps: int = 0  # quantization maps held by the optimizer alone, never by a state (quantization_maps)


def _adafactor_state_numel(shape: tuple) -> int:
    """transformers Adafactor._init: exp_avg_sq_row of shape[:-1] and exp_avg_sq_col of
    shape[:-2] + shape[-1:] for tensors of two or more dimensions, exp_avg_sq like a vector."""
    if len(shape) < 2:
        return shape[0]
    lead = 1
    for d in shape[:-2]:
        lead *= d
    return lead * shape[-2] + lead * shape[-1]


def scalar_state_bytes(t: TrainingSettings) -> int:
    """0-dim state tensors per parameter: AdamW's 'step' (float32; kept on the CPU unless capturable
    or fused, so it reaches only CPU memory), Adafactor's 'RMS' (on the parameter's device: 4 bytes,
    a 512-byte block in CUDA's caching allocator)."""
    if t.optimizer == "adamw":
        return 4 if t.device == "cpu" else 0
    if t.optimizer == "adamw-fused":  # torch/optim/adam.py _init_group: a fused optimizer's 'step' is a float32
        # tensor on the parameter's device (``device=p.device`` when fused or capturable)
        return 4 if t.device == "cpu" else 512
    if t.optimizer == "adafactor":
        return 4 if t.device == "cpu" else 512
    return 0


def _optimizer_state_bytes(numel: int, dtype: str, optimizer: str) -> int:
    """Per-tensor optimizer state.
    adamw: exp_avg and exp_avg_sq like the parameter (torch/optim/adamw.py _init_group; the 'step'
      counter is a CPU tensor unless capturable/fused, so it never reaches CUDA memory).
    sgd (momentum): one momentum_buffer like the parameter (torch/optim/sgd.py).
    adamw-8bit, paged-adamw-8bit: bitsandbytes Optimizer2State: uint8 state1/state2 plus one fp32 absmax
      per 256 values each, for tensors of at least 4096 elements; smaller tensors keep fp32 states.
    paged-adamw-32bit: fp32 state1/state2 (bitsandbytes PagedAdamW32bit, optim_bits=32).
    lion-8bit, paged-lion-8bit, lion-32bit, paged-lion-32bit: bitsandbytes Lion (optim/lion.py, an
      Optimizer1State): state1 (the exp_avg) only, as Optimizer1State.init_state makes it: uint8 plus one
      fp32 absmax per 256 values at optim_bits 8 from min_8bit_size (4096) elements, fp32 otherwise
      (get_state_buffer's dtype=torch.float32, whatever the parameter's dtype).
    adamw-fused: as adamw (the 'step' counter on the parameter's device: scalar_state_bytes).
    The paged optimizers' large states are in CUDA unified memory (paged_state_bytes): model_states
    counts them apart.
    adafactor (transformers.optimization.Adafactor, beta1=None): a factored second moment
      (row and column vectors) for matrices, a full one for vectors, in fp32 (handled in
      model_states, which knows the shapes)."""
    b = DTYPE_BYTES[dtype]
    if optimizer in ("adamw", "adamw-fused"):
        return 2 * numel * b
    if optimizer == "sgd":
        return numel * b
    if optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        if numel < 4096:
            return 2 * numel * 4
        return 2 * (numel + 4 * ceil(numel / 256))
    if optimizer == "paged-adamw-32bit":
        return 2 * numel * 4
    if optimizer in ("lion-8bit", "paged-lion-8bit"):
        return numel * 4 if numel < 4096 else numel + 4 * ceil(numel / 256)
    if optimizer in ("lion-32bit", "paged-lion-32bit"):
        return numel * 4
    raise ValueError(optimizer)


# bitsandbytes optim/optimizer.py Optimizer8bit.get_state_buffer: a paged optimizer's state1/state2 of a
# parameter with at least 1e5 elements are F.get_paged buffers (cudaMallocManaged), the rest zeros_like
PAGED_MIN_NUMEL = 100_000


def paged_state_bytes(numel: int, optimizer: str) -> int:
    """What of a parameter's optimizer state a bitsandbytes paged optimizer keeps in CUDA unified memory,
    outside PyTorch's caching allocator (absent from max_memory_allocated, present in nvidia-smi while
    resident, evicted to host memory under pressure): state1 and state2 (state1 alone for the Lions; uint8
    for the 8-bit ones at min_8bit_size 4096 elements and more, fp32 otherwise) of a parameter of PAGED_MIN_NUMEL elements or
    more; the 8-bit states' absmax1/absmax2 (torch.zeros) stay in the allocator."""
    if numel < PAGED_MIN_NUMEL or optimizer not in PAGED_OPTIMIZERS:
        return 0
    states = 1 if optimizer in ONE_STATE_OPTIMIZERS else 2  # Lion: state1 only (Optimizer1State)
    return states * numel * (1 if optimizer in EIGHT_BIT_OPTIMIZERS else 4)


def model_states(plan: Plan, t: TrainingSettings) -> ModelStates:
    """Weights, gradients and optimizer state of every parameter, and the optimizer step's temporaries."""
    return _model_states(plan, replace(t, batch_size=1, seq_len=1, grad_checkpointing=False, attention="sdpa",
                                       checkpoint_every=1, checkpoint_reentrant=False, grad_accum=1,
                                       keep_outputs=False, loss="hf", loss_chunks=8, offload_activations=False,
                                       max_grad_norm=None))


@lru_cache(maxsize=4096)
def _model_states(plan: Plan, t: TrainingSettings) -> ModelStates:
    weight_dtype = stream_dtypes(plan, t)[0]
    frozen = trainable = grads = states = 0
    group_bytes: dict[str, int] = {}
    group_count: dict[str, int] = {}
    paged = 0  # optimizer state in CUDA unified memory (paged optimizers)
    largest = 0
    adamw_cpu_temp = prev = 0  # torch's single-tensor AdamW: see optimizer_temporaries
    adafactor_temp = 0  # transformers Adafactor.step, one parameter at a time: the fp32 update twice
    # (grad**2 + eps, then the factored approximation; later update and -update), plus the fp32
    # copies of a bf16/fp16 gradient and parameter; for a factored (2-d or more) tensor
    # _approx_sq_grad's row factor (row / row.mean()).rsqrt_() and column factor col.rsqrt() too
    eight_bit_state = False  # a tensor's bitsandbytes 8-bit state references the quantization maps
    quantized_modules = quantized_paths(plan)
    at_32_bits = trainer_embeddings_at_32_bits(plan, t)
    for g in plan.groups:
        dtype = group_dtype(plan, g.origin, weight_dtype, g.name, engine_cast(t))
        if g.name.rsplit(".", 1)[0] in quantized_modules:
            # the bias of a Linear4bit ends up in bnb_4bit_compute_dtype whatever it was loaded or upcast
            # to: Linear4bit.forward runs ``bias.data = bias.data.to(x.dtype)`` after casting x to the
            # compute dtype (bitsandbytes nn/modules.py), so a bias prepare_model_for_kbit_training made
            # fp32 is bf16 again after the first forward
            dtype = t.compute_dtype
        if g.quantized:
            nbytes = nf4_bytes(g.numel, plan.settings.double_quant)
        else:
            nbytes = g.numel * DTYPE_BYTES[dtype]
        if not g.trainable:
            frozen += nbytes
            continue
        trainable += nbytes
        if g.name in gradient_free(plan):
            continue
        grads += nbytes
        shape = g.shape
        states += scalar_state_bytes(t)
        if t.optimizer == "adafactor":  # states follow the fp32 upcast gradient
            states += _adafactor_state_numel(shape or (g.numel,)) * 4
        else:
            state_bytes, paged_part = _state_and_paged_bytes(g.numel, dtype, t.optimizer, g.name in at_32_bits)
            paged += paged_part
            states += state_bytes - paged_part
        group_bytes[dtype] = group_bytes.get(dtype, 0) + nbytes
        group_count[dtype] = group_count.get(dtype, 0) + 1
        largest = max(largest, nbytes)
        adamw_cpu_temp, prev = max(adamw_cpu_temp, 2 * nbytes + prev), nbytes
        factors = _adafactor_state_numel(shape) * 4 if shape and len(shape) >= 2 else 0
        adafactor_temp = max(adafactor_temp, g.numel * 4 * (2 if dtype == "float32" else 4) + factors)
        eight_bit_state = eight_bit_state or (g.numel >= 4096 and g.name not in at_32_bits)
    temps = adafactor_temp if t.optimizer == "adafactor" else optimizer_temporaries(t, group_bytes, adamw_cpu_temp)
    maps, spare = quantization_maps(t)
    return ModelStates(frozen, trainable, grads, states, temps, largest, maps,
                       eight_bit_state and t.optimizer in EIGHT_BIT_OPTIMIZERS, tuple(sorted(group_count.items())),
                       paged, spare)


def trainer_embeddings_at_32_bits(plan: Plan, t: TrainingSettings) -> frozenset:
    """The parameters whose bitsandbytes states the HF Trainer keeps at 32 bits under an 8-bit optimizer:
    transformers trainer.py Trainer.create_optimizer, when ``"bitsandbytes" in str(optimizer_cls)`` and
    ``optim_bits == 8`` (trainer_optimizer.py: every ``*8bit`` bitsandbytes optim), runs
    ``manager.register_module_override(module, "weight", {"optim_bits": 32})`` for every ``nn.Embedding`` of the
    model; bitsandbytes Optimizer8bit.step -> check_overrides applies it (by the parameter's id) at the first
    step, and init_state then makes fp32 states. The embeddings: the layout's embedding modules' weights (the
    token, position and token-type tables) and peft's prompt or prefix encoder's table (PromptEmbedding.embedding,
    PrefixEncoder.embedding: nn.Embedding). Only under TrainingSettings.trainer_loop; empty otherwise."""
    if not t.trainer_loop or t.optimizer not in EIGHT_BIT_OPTIMIZERS:
        return frozenset()
    tables = {f"{m.path}.weight" for m in build_layout(plan.spec).modules if m.kind == "embedding"}
    return frozenset(g.name for g in plan.groups
                     if (g.origin == "base" and g.name in tables) or g.name == "prompt_embeddings")


def _state_and_paged_bytes(numel: int, dtype: str, optimizer: str, at_32_bits: bool) -> tuple[int, int]:
    """(a parameter's optimizer state bytes, what of them is paged): _optimizer_state_bytes and
    paged_state_bytes, or at optim_bits 32 (trainer_embeddings_at_32_bits) bitsandbytes' fp32 state1 (and
    state2 for Optimizer2State), paged from PAGED_MIN_NUMEL elements when the optimizer is paged
    (Optimizer8bit.get_state_buffer)."""
    if not at_32_bits:
        return _optimizer_state_bytes(numel, dtype, optimizer), paged_state_bytes(numel, optimizer)
    state = (1 if optimizer in ONE_STATE_OPTIMIZERS else 2) * numel * 4
    return state, state if optimizer in PAGED_OPTIMIZERS and numel >= PAGED_MIN_NUMEL else 0


def quantization_maps(t: TrainingSettings) -> tuple[int, int]:
    """(bytes of the quantization maps an 8-bit state references, bytes of those only the optimizer holds).
    bitsandbytes Optimizer8bit.__init__ (optim_bits=8) -> fill_qmap makes both maps (signed 'dynamic',
    unsigned 'udynamic') on the CPU. Optimizer2State.init_state moves both to the parameter's device and
    references them (qmap1, qmap2); Optimizer1State.init_state (Lion) moves and references 'dynamic' only:
    on the CPU 'udynamic' stays alive in name2qmap (held by the optimizer, no state's), on CUDA it stays in
    host memory."""
    if t.optimizer not in EIGHT_BIT_OPTIMIZERS:
        return 0, 0
    if t.optimizer not in ONE_STATE_OPTIMIZERS:
        return BNB_QUANTIZATION_MAPS, 0
    return BNB_QUANTIZATION_MAP, BNB_QUANTIZATION_MAP if t.device == "cpu" else 0


def clip_grad_norm_bytes(ms: ModelStates, device: str) -> tuple[int, int]:
    """(peak extra bytes inside torch.nn.utils.clip_grad_norm_, the total norm it returns), from the
    gradients' dtypes (torch/nn/utils/clip_grad.py, torch 2.x):
    _get_total_norm makes one 0-dim norm per gradient, in its dtype (torch._foreach_norm per (device,
      dtype) group, or linalg.vector_norm one by one where foreach is unsupported: the same tensors), then
      ``linalg.vector_norm(torch.stack(norms))``: the stack (one element per gradient, in the dtypes'
      promotion: fp32 if any is) and the total are alive with every norm;
    _clip_grads_with_norm_: ``clip_coef = max_norm / (total_norm + 1e-6)`` (Tensor.__rtruediv__:
      reciprocal, then a multiply: the sum, the reciprocal and the coefficient beside the total), clamp,
      and torch._foreach_mul_ in place.
    On CUDA every tensor is at least one 512-byte block of the caching allocator (the stack rounded up to
    512). The total norm is kept through optimizer.step() (transformers Trainer: grad_norm)."""
    counts = dict(ms.grad_tensors)
    n = sum(counts.values())
    if not n:
        return 0, 0
    promoted = DTYPE_BYTES["float32" if "float32" in counts else next(iter(counts))]

    def block(nbytes: int) -> int:
        return ceil(nbytes / 512) * 512 if device == "cuda" else nbytes

    norms = sum(count * block(DTYPE_BYTES[dtype]) for dtype, count in counts.items())
    total = block(promoted)
    return max(norms + block(n * promoted) + total, 4 * total), total


def optimizer_temporaries(t: TrainingSettings, group_bytes: dict, single_tensor: int) -> int:
    """Peak extra bytes inside optimizer.step().
    adamw on CUDA takes the foreach path (torch/optim/adamw.py _multi_tensor_adamw): torch._foreach_sqrt
      of all exp_avg_sq of one (device, dtype) group is allocated at once: the largest group's bytes.
    adamw on CPU (and fake) takes the single-tensor path (torch/optim/adam.py _single_tensor_adam), one
      parameter at a time in the parameters' order: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt)
      holds the sqrt and the quotient while `denom` still refers to the previous parameter's: the
      largest 2 x a parameter + its predecessor (`single_tensor`, from model_states).
    adamw-fused (torch/optim/adamw.py -> adam.py _fused_adam): torch._foreach_add_ on the steps and one
      torch._fused_adamw_ kernel per (device, dtype) group, both in place: no temporaries.
    sgd updates in place; adamw-8bit runs one fused kernel in place (adafactor: see model_states)."""
    if t.optimizer == "adamw":
        if t.device == "cuda":
            return max(group_bytes.values(), default=0)
        return single_tensor
    return 0


def cls_token_gradient_storage(plan: Plan, t: TrainingSettings) -> int:
    """What ViT's class token's .grad keeps alive beyond its own (1, 1, hidden) bytes at batch 1:
    transformers models/vit/modeling_vit.py ViTEmbeddings.forward concatenates
    ``self.cls_token.expand(batch_size, -1, -1)`` before the patches; CatBackward0 hands on a narrow (a
    view) of the embeddings' (batch, tokens, hidden) gradient, ExpandBackward0's sum_to is the identity
    when the batch is 1 (the sizes already match), and AccumulateGrad makes that view the .grad, so the
    whole storage lives until zero_grad (traced, fake tensors: tiny-vit-cls full fp32 b1 ckpt, the
    cls_token's gradient an aten.add (1, 17, 64) storage, 4,352 bytes for 256). At batch > 1 the sum
    makes a (1, 1, hidden) tensor of its own."""
    spec = plan.spec
    if not spec.is_vision or t.batch_size != 1:  # a class token parameter: ViT's (CLIP's is class_embedding)
        return 0
    group = next((g for g in plan.groups if g.name.endswith("embeddings.cls_token") and g.trainable
                  and g.name not in gradient_free(plan)), None)
    if group is None:
        return 0
    nbytes = DTYPE_BYTES[group_dtype(plan, group.origin, stream_dtypes(plan, t)[0], group.name, engine_cast(t))]
    return (spec.vision_seq_len - 1) * spec.hidden_size * nbytes


def tied_embedding_addends(plan: Plan, t: TrainingSettings) -> int:
    """A trainable tied embedding gets two gradients: the lm_head's, early in backward, held in its
    AccumulateGrad node's input buffer (GradientArrival.head_pending), and the lookup's dense gradient
    at the end (embedding_dense_backward), which InputBuffer::add (torch/csrc/autograd/input_buffer.cpp)
    sums out of place under the harness's TorchDispatchMode; AccumulateGrad makes the sum the .grad
    (one vocab x hidden among the gradients). The two addends, two vocab x hidden tensors, are
    temporaries alive with it for a moment."""
    if not (build_layout(plan.spec).head_tied_to_embedding and plan.embedding_trains):
        return 0
    weight_dtype = stream_dtypes(plan, t)[0]
    return 2 * plan.spec.vocab_size * plan.spec.hidden_size * DTYPE_BYTES[weight_dtype]
