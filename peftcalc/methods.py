"""Step 2 of the model: which parameters train, and which ones a method adds.

Each method is a plain function from a :class:`Layout` and :class:`MethodSettings` to a list of
:class:`ParamGroup` rows. The peft methods mirror what ``peft.get_peft_model`` creates (peft 0.21:
``tuners/lora/layer.py``, ``tuners/ia3/layer.py``, ``tuners/prefix_tuning/model.py``,
``tuners/prompt_tuning/model.py``, ``peft_model.PeftModelForSequenceClassification``); the others
(full, frozen, freeze, bitfit, adapter) are ``requires_grad`` masks or the bottleneck module
described in :func:`adapter_numel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

from peftcalc.errors import CombinationError, InputError
from peftcalc.layout import (
    LANGUAGE_MODEL,
    LANGUAGE_PROJECTION,
    LINEAR_KINDS,
    PROJECTOR,
    QFORMER,
    QUERY_TOKENS,
    Layout,
    Module,
    build_layout,
    param_names,
)
from peftcalc.spec import ModelSpec

METHODS = ("full", "frozen", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit", "ia3")
# What a vision-language model (llava) supports; projector and projector-llm exist only there.
VLM_METHODS = ("projector", "projector-llm", "lora", "adapter")
VLM_ONLY_METHODS = ("projector", "projector-llm")
ALL_METHODS = METHODS + VLM_ONLY_METHODS
# BLIP-2 (Blip2ForConditionalGeneration): the Q-Former stage
BLIP2_METHODS = ("qformer",)
KNOWN_METHODS = ALL_METHODS + BLIP2_METHODS


def methods_for(spec: ModelSpec) -> tuple[str, ...]:
    """The methods a model takes: METHODS, VLM_METHODS for a LLaVA model, BLIP2_METHODS for BLIP-2."""
    if spec.model_type == "blip-2":
        return BLIP2_METHODS
    return VLM_METHODS if spec.is_vlm else METHODS
PEFT_METHODS = ("lora", "qlora", "prefix", "prompt", "ia3")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
# A vision-language model's vision tower also takes seed 001's adapter after each encoder block.
VLM_ADAPTER_KINDS = ("block",) + ADAPTER_KINDS
# Seed 001 (Example 4, BottleneckAdapter as AdaptedVisionEncoder uses it): bottleneck_dim=256, dropout=0.1.
BLOCK_ADAPTER_BOTTLENECK = 256
BLOCK_ADAPTER_DROPOUT = 0.1
# The attribute the harness (measure.adapters) puts an adapter under, part of its parameter names.
ADAPTER_ATTRIBUTE = "adapter_bottleneck"

METHOD_HELP = {
    "full": "every parameter trains",
    "frozen": "backbone frozen, only the task head trains (linear probe)",
    "freeze": "bottom blocks frozen; the top --trainable-layers blocks, final norm and head train",
    "lora": "peft LoRA adapters (A: r x in, B: out x r) on the target modules; base frozen",
    "qlora": "LoRA on a 4-bit NF4 base (bitsandbytes), double quantization by default",
    "adapter": "bottleneck adapters (Houlsby: after attention and FFN; Pfeiffer: after FFN). On a VLM (LLaVA): "
               "adapters in the frozen vision tower's blocks the projector reads (default: seed 001's, "
               "LayerNorm(x + up(gelu(down(x)))) after each block, bottleneck 256), the projector trains, the "
               "language model is frozen",
    "prefix": "peft prefix tuning: trainable keys/values for every layer",
    "prompt": "peft prompt tuning: trainable virtual token embeddings",
    "bitfit": "only bias terms train",
    "ia3": "peft IA3: learned scaling vectors on keys, values and the FFN",
    "projector": "VLM (LLaVA stage 1): only the multi-modal projector trains",
    "projector-llm": "VLM (LLaVA stage 2): the projector and the whole language model train; vision tower frozen",
    "qformer": "BLIP-2: the Q-Former, its query tokens and the language projection train; vision tower and LLM frozen",
}

# peft 0.21 utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING. peft has no
# entry for vit (transformers 5 names) or clip_vision_model; there peftcalc uses q_proj,v_proj,
# the same choice as for the text families, and passes it to peft explicitly.
LORA_DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "vit": ("q_proj", "v_proj"),
    "clip_vision_model": ("q_proj", "v_proj"),
    "llava": ("q_proj", "v_proj"),  # the language model's (llama); targets never reach the vision tower
}
# peft 0.21 TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING;
# vit and clip_vision_model (absent from peft) take the llama choice: keys, values, FFN output.
IA3_DEFAULT_TARGETS = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "vit": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "clip_vision_model": (("k_proj", "v_proj", "fc2"), ("fc2",)),
}
# peft's PeftModelForSequenceClassification adds these to modules_to_save.
SEQ_CLS_HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class MethodSettings:
    """A fine-tuning method and its knobs (defaults are peft's defaults where peft has one)."""

    method: str = "lora"
    rank: int = 8  # peft LoraConfig.r default
    alpha: int | None = None  # peft default lora_alpha=8; does not change memory
    targets: tuple[str, ...] | str | None = None  # None: peft's default for the family
    dora: bool = False
    double_quant: bool = True
    bottleneck: int | None = None  # default hidden_size // 16 (reduction factor 16); VLM block adapter: 256
    adapter_kind: str | None = None  # None: houlsby; for --method adapter on a VLM, block (resolve_adapter_kind)
    num_virtual_tokens: int = 20
    trainable_layers: int | None = None  # freeze: default the top quarter of the blocks
    vision_layers: int = 0  # VLM: unfreeze this many vision-tower layers, the top ones the projector reads
    # QLoRA: peft.prepare_model_for_kbit_training was called on the 4-bit base (see prepare_kbit_default)
    prepare_kbit: bool = False


def prepare_kbit_default(method: str) -> bool:
    """Whether `method` runs peft's prepare_model_for_kbit_training when the user does not say: on for
    QLoRA, as the usual recipe does (peft's QLoRA guide and TRL's SFTTrainer call it on every k-bit
    model before get_peft_model), off for everything else (it applies to quantized bases only). It
    upcasts the non-quantized parameters (norms, embeddings, lm_head) to fp32 (peft utils/other.py);
    its use_gradient_checkpointing is --grad-checkpointing here."""
    return method == "qlora"


@dataclass(frozen=True)
class ParamGroup:
    """One parameter tensor of the trained model (base or added)."""

    name: str
    numel: int
    trainable: bool
    origin: str  # base | lora | dora | ia3 | adapter | prefix | prompt | head_copy
    layer: int | None = None
    quantized: bool = False  # stored as NF4 (QLoRA base linears)
    shape: tuple = ()  # the tensor's shape, as the real parameter has it


@dataclass(frozen=True, eq=False)
class Plan:
    """What a method makes of a model: every parameter, and facts the memory model needs.
    Compared and hashed by identity: make_plan caches one Plan per (spec, settings)."""

    spec: ModelSpec
    settings: MethodSettings
    groups: tuple[ParamGroup, ...]
    targets: tuple[str, ...] = ()  # module paths that got a LoRA/IA3 layer
    lowest_trainable_layer: int | None = None  # None: nothing inside the blocks trains
    embedding_trains: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def total(self) -> int:
        return sum(g.numel for g in self.groups)

    @property
    def trainable(self) -> int:
        return sum(g.numel for g in self.groups if g.trainable)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def numel_by(self, trainable: bool | None = None, origin: str | None = None, quantized: bool | None = None) -> int:
        return sum(
            g.numel
            for g in self.groups
            if (trainable is None or g.trainable == trainable)
            and (origin is None or g.origin == origin)
            and (quantized is None or g.quantized == quantized)
        )


def peft_task_type(spec: ModelSpec) -> str | None:
    """The peft task type users set for this architecture: CAUSAL_LM, SEQ_CLS, or none."""
    return {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}.get(spec.task)


def module_matches(path: str, keys) -> bool:
    """peft's target matching for a list of names: an exact name or a dotted suffix
    (peft tuners_utils.check_target_module_exists)."""
    return any(path == key or path.endswith("." + key) for key in keys)


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def param_shape(module: Module, name: str) -> tuple:
    """Shape of one of `module`'s parameters (`name` as param_names gives it)."""
    if name.endswith(".bias") and module.kind != "param":
        return (module.bias_numel,)
    return module.shape


def _base_groups(layout: Layout, trainable_fn) -> list[ParamGroup]:
    groups = []
    for m in layout.modules:
        for name, numel in param_names(m):
            groups.append(ParamGroup(name, numel, bool(trainable_fn(m, name)), "base", m.layer,
                                     shape=param_shape(m, name)))
    return groups


def _head_copy(layout: Layout, spec: ModelSpec) -> list[ParamGroup]:
    """peft SEQ_CLS: the head (classifier/score) is wrapped in ModulesToSaveWrapper, whose trainable
    copy adds its parameters once more (peft utils/other.py ModulesToSaveWrapper)."""
    if peft_task_type(spec) != "SEQ_CLS":
        return []
    copies = []
    for m in layout.modules:
        if _under(m.path, SEQ_CLS_HEAD_NAMES):
            for name, numel in param_names(m):
                copies.append(ParamGroup(f"{name}#modules_to_save", numel, True, "head_copy",
                                         shape=param_shape(m, name)))
    return copies


def _head_trainable_fn(layout: Layout, extra_prefixes=()):
    prefixes = tuple(layout.head_paths) + tuple(extra_prefixes)
    if layout.head_tied_to_embedding:
        prefixes += (layout.embedding_path,)
    return lambda m, name: _under(m.path, prefixes)


def plan_full(spec, layout, s):
    return _base_groups(layout, lambda m, name: True)


def plan_frozen(spec, layout, s):
    if not layout.head_paths:
        raise CombinationError(
            f"method 'frozen' trains the task head, and {spec.architecture} has none; "
            "use a config whose architectures name a head (ForCausalLM, ForSequenceClassification, ...)"
        )
    return _base_groups(layout, _head_trainable_fn(layout))


def default_trainable_layers(spec: ModelSpec) -> int:
    """Train the top quarter (the layer-freezing seed: freeze the bottom 50-75%)."""
    return max(1, spec.num_layers // 4)


def plan_freeze(spec, layout, s):
    k = s.trainable_layers if s.trainable_layers is not None else default_trainable_layers(spec)
    first = spec.num_layers - k
    above_blocks = [m.path for m in layout.modules if m.layer is None and m.role in ("head", "pooler", "norm")
                    and m.path != _embedding_norm(layout)]
    head = _head_trainable_fn(layout, above_blocks)
    return _base_groups(layout, lambda m, name: (m.layer is not None and m.layer >= first) or head(m, name))


def _embedding_norm(layout: Layout) -> str:
    """The LayerNorm inside the embeddings (BERT/RoBERTa) or before the blocks (CLIP) stays frozen."""
    for m in layout.modules:
        if m.role == "norm" and m.layer is None and ("embeddings" in m.path or m.path == "pre_layrnorm"):
            return m.path
    return ""


def plan_bitfit(spec, layout, s):
    head = _seq_cls_head_fn(spec, layout)
    groups = _base_groups(layout, lambda m, name: name.endswith(".bias") or head(m, name) or
                          (m.kind == "param" and m.path.endswith(".bias")))
    if not any(g.trainable for g in groups):
        raise CombinationError(f"method 'bitfit' needs bias terms, and {spec.name} has none")
    return groups


def _seq_cls_head_fn(spec, layout):
    """Methods that are not peft's still train a fresh classification head, as peft's SEQ_CLS does."""
    if spec.task == "seq_cls":
        return lambda m, name: _under(m.path, layout.head_paths)
    return lambda m, name: False


def resolve_adapter_kind(spec: ModelSpec, s: MethodSettings) -> str:
    """The adapter kind a setting means: the one asked for; else seed 001's post-block adapter for
    --method adapter on a vision-language model, and houlsby otherwise (the kind of every other method's
    settings too, where it is unused: measure.run records it so)."""
    if s.adapter_kind is not None:
        return s.adapter_kind
    return "block" if spec.is_vlm and s.method == "adapter" else "houlsby"


def adapter_hidden(spec: ModelSpec) -> int:
    """Width of the hidden states an adapter transforms: a VLM's adapters sit in its vision tower."""
    return spec.vision.hidden_size if spec.is_vlm else spec.hidden_size


def resolve_bottleneck(spec: ModelSpec, s: MethodSettings) -> int:
    """--bottleneck, else seed 001's 256 for its block adapter, else reduction factor 16 (Houlsby et al.
    2019, section 3.6, and Pfeiffer et al. 2021 use hidden/16 among their sizes)."""
    if s.bottleneck is not None:
        return s.bottleneck
    if resolve_adapter_kind(spec, s) == "block":
        return BLOCK_ADAPTER_BOTTLENECK
    return max(1, adapter_hidden(spec) // 16)


def adapter_numel(hidden: int, bottleneck: int) -> int:
    """One bottleneck adapter: down (hidden -> b, with bias) and up (b -> hidden, with bias).
    Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1: 2md + d + m."""
    return 2 * hidden * bottleneck + bottleneck + hidden


def adapter_sites(spec: ModelSpec, layout: Layout, kind: str) -> list[Module]:
    """Where adapters go: after the attention output projection and after the FFN output projection
    (Houlsby), or after the FFN output projection only (Pfeiffer et al. 2021, AdapterFusion, section 3)."""
    roles = ("attn_out", "mlp_out") if kind == "houlsby" else ("mlp_out",)
    return [m for m in layout.modules if m.role in roles]


def adapter_shapes(kind: str, hidden: int, bottleneck: int) -> list[tuple[str, tuple]]:
    """The parameters of one adapter, as measure.adapters builds it: Houlsby/Pfeiffer down (b x h) and up
    (h x b) with biases; seed 001's block adapter down_proj and up_proj with biases and a LayerNorm (weight,
    bias) over the hidden size."""
    h, b = hidden, bottleneck
    if kind == "block":
        return [("down_proj.weight", (b, h)), ("down_proj.bias", (b,)), ("up_proj.weight", (h, b)),
                ("up_proj.bias", (h,)), ("layer_norm.weight", (h,)), ("layer_norm.bias", (h,))]
    return [("down.weight", (b, h)), ("down.bias", (b,)), ("up.weight", (h, b)), ("up.bias", (h,))]


def vision_adapter_sites(spec: ModelSpec, kind: str) -> list[str]:
    """Where --method adapter puts its adapters in a VLM's vision tower: in each encoder layer the projector
    reads (hidden_states[vision_feature_layer]: layers 0-22 of LLaVA-1.5's 24; the layers above never get a
    gradient, so an adapter there would train nothing). Seed 001's block adapter transforms the layer's
    output (AdaptedVisionEncoder: "Add adapters after each transformer block"), so the path is the layer
    itself; Houlsby/Pfeiffer adapters sit after the layer's out_proj and fc2 / after fc2."""
    modules = {"block": ("",), "houlsby": (".self_attn.out_proj", ".mlp.fc2"), "pfeiffer": (".mlp.fc2",)}[kind]
    return [f"{VISION_LAYERS}{i}{m}" for i in range(vision_layers_used(spec)) for m in modules]


def plan_adapter(spec, layout, s):
    kind = resolve_adapter_kind(spec, s)
    kinds = VLM_ADAPTER_KINDS if spec.is_vlm else ADAPTER_KINDS
    if kind not in kinds:
        if kind in VLM_ADAPTER_KINDS:
            raise InputError(f"adapter kind '{kind}' (seed 001's adapter after each vision block) applies to a "
                             f"vision-language model's vision tower; {spec.name} is not one")
        raise InputError(f"unknown adapter kind '{kind}'; choose from {', '.join(kinds)}")
    b = resolve_bottleneck(spec, s)
    h = adapter_hidden(spec)
    if b < 1 or b > h:
        where = "the vision tower's hidden size" if spec.is_vlm else "the hidden size"
        default = ""
        if s.bottleneck is None:
            default = " (seed 001's default for the block adapter)" if kind == "block" else " (hidden/16)"
        raise InputError(f"--bottleneck must be between 1 and {where} {h}, got {b}{default}")
    if spec.is_vlm:  # the vision tower and the language model frozen, the projector trains
        groups = _base_groups(layout, lambda m, name: _under(m.path, (PROJECTOR,)))
        sites = [(path, None) for path in vision_adapter_sites(spec, kind)]
    else:
        groups = _base_groups(layout, _seq_cls_head_fn(spec, layout))
        sites = [(m.path, m.layer) for m in adapter_sites(spec, layout, kind)]
    for path, layer in sites:
        for name, shape in adapter_shapes(kind, h, b):
            groups.append(ParamGroup(f"{path}.{ADAPTER_ATTRIBUTE}.{name}", _prod(shape), True, "adapter", layer,
                                     shape=shape))
    return groups


def _prod(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resolve_targets(spec: ModelSpec, layout: Layout, s: MethodSettings) -> tuple[str, ...]:
    """The module paths peft would wrap (tuners_utils.BaseTuner.inject_adapter)."""
    if s.method == "ia3":
        keys = s.targets if s.targets is not None else IA3_DEFAULT_TARGETS[spec.model_type][0]
    else:
        keys = s.targets if s.targets is not None else LORA_DEFAULT_TARGETS[spec.model_type]
    if keys == "all-linear":
        paths = _all_linear(spec, layout)
    else:
        paths = tuple(m.path for m in layout.modules if m.kind != "param" and module_matches(m.path, keys))
    if spec.is_vlm:  # LoRA on a VLM wraps the language model only (measure.build.vlm_lora_config)
        paths = tuple(p for p in paths if _under(p, (LANGUAGE_MODEL,)))
    if peft_task_type(spec) == "SEQ_CLS":  # modules_to_save (the head) is copied whole, never wrapped
        paths = tuple(p for p in paths if not _under(p, SEQ_CLS_HEAD_NAMES))
    if not paths:
        raise CombinationError(f"target modules {', '.join(keys)} match no module of {spec.name}")
    return paths


def _all_linear(spec: ModelSpec, layout: Layout) -> tuple[str, ...]:
    """peft tuners_utils._maybe_include_all_linear_layers: every Linear/Conv1D except the output
    embedding (causal/masked LM) or, for SEQ_CLS, the head module named classifier/score itself."""
    exclude = set()
    if layout.output_embedding_path:
        exclude.add(layout.output_embedding_path)
    elif peft_task_type(spec) == "SEQ_CLS":
        exclude.update(SEQ_CLS_HEAD_NAMES)
    return tuple(m.path for m in layout.modules if m.kind in LINEAR_KINDS and m.path not in exclude)


def _modules_by_path(layout: Layout) -> dict[str, Module]:
    return {m.path: m for m in layout.modules}


def lora_numel(module: Module, rank: int, dora: bool) -> tuple[int, int]:
    """LoRA A and B (plus DoRA's magnitude) for one module, as peft's LoraLayer.update_layer makes them:
    Linear/Conv1D: A r x in, B out x r, magnitude out; Embedding: A r x num, B dim x r
    (Hu et al. 2021, LoRA, section 4.1; Liu et al. 2024, DoRA, section 4.1)."""
    if module.kind in LINEAR_KINDS:
        ab = rank * (module.in_features + module.out_features)
        return ab, (module.out_features if dora else 0)
    if module.kind == "embedding":
        num, dim = module.shape
        return rank * (num + dim), (dim if dora else 0)
    raise InputError(f"LoRA cannot wrap module '{module.path}' ({module.kind}); target Linear or Embedding modules")


def lora_shapes(module: Module, rank: int) -> list[tuple[str, tuple]]:
    """peft's LoRA tensors for one module: lora_A.weight (r, in) and lora_B.weight (out, r) for
    Linear/Conv1D; lora_embedding_A (r, num) and lora_embedding_B (dim, r) for Embedding."""
    if module.kind in LINEAR_KINDS:
        return [("lora_A.weight", (rank, module.in_features)), ("lora_B.weight", (module.out_features, rank))]
    num, dim = module.shape
    return [("lora_embedding_A", (rank, num)), ("lora_embedding_B", (dim, rank))]


def plan_lora(spec, layout, s):
    if s.rank < 1:
        raise InputError(f"--rank must be a positive integer, got {s.rank}")
    mods = _modules_by_path(layout)
    targets = resolve_targets(spec, layout, s)
    quantize = s.method == "qlora"
    vision = _vision_trains_fn(spec, s)  # a VLM's unfrozen vision layers train as they are (requires_grad)
    groups = [
        replace(g, quantized=quantize and g.name.endswith(".weight") and _quantizable(mods, g.name, layout))
        for g in _base_groups(layout, vision)
    ]
    for path in targets:
        m = mods[path]
        limit = min(m.in_features, m.out_features) if m.kind in LINEAR_KINDS else min(m.shape)
        if s.rank > limit:
            raise CombinationError(f"--rank {s.rank} is larger than module '{path}' ({m.in_features} -> {m.out_features})"
                             if m.kind in LINEAR_KINDS else f"--rank {s.rank} is larger than module '{path}'")
        for name, shape in lora_shapes(m, s.rank):
            groups.append(ParamGroup(f"{path}.{name}", _prod(shape), True, "lora", m.layer, shape=shape))
        _, magnitude = lora_numel(m, s.rank, s.dora)
        if magnitude:
            groups.append(ParamGroup(f"{path}.lora_magnitude_vector", magnitude, True, "dora", m.layer,
                                     shape=(magnitude,)))
    return groups + _head_copy(layout, spec) + _projector_copy(layout, spec), targets


def _projector_copy(layout: Layout, spec: ModelSpec) -> list[ParamGroup]:
    """LoRA on a VLM trains the projector whole through peft's modules_to_save=["multi_modal_projector"]:
    the original stays (frozen) and ModulesToSaveWrapper adds a trainable copy (peft utils/other.py)."""
    if not spec.is_vlm:
        return []
    return [ParamGroup(f"{name}#modules_to_save", numel, True, "head_copy", shape=param_shape(m, name))
            for m in layout.modules if _under(m.path, (PROJECTOR,)) for name, numel in param_names(m)]


VISION_LAYERS = "model.vision_tower.encoder.layers."


def vision_layers_used(spec: ModelSpec) -> int:
    """How many vision-tower layers feed the hidden state the projector reads: hidden_states[i] is the
    output of layer i - 1 (index 0: the embeddings), so vision_feature_layer -2 of 24 layers uses 23."""
    layer = spec.vision_feature_layer
    return layer if layer >= 0 else spec.vision.num_layers + 1 + layer


def vision_layer_of(path: str) -> int | None:
    """The vision-tower layer a VLM parameter or module path belongs to (None: not in a vision layer)."""
    if not path.startswith(VISION_LAYERS):
        return None
    return int(path[len(VISION_LAYERS):].split(".", 1)[0])


def unfrozen_vision_layers(spec: ModelSpec, s: MethodSettings) -> range:
    """--unfreeze-vision-layers N: the top N of the layers the projector reads (the layers above the
    feature layer never get a gradient, so unfreezing them would train nothing)."""
    used = vision_layers_used(spec) if spec.is_vlm else 0
    return range(used - s.vision_layers, used) if s.vision_layers else range(0)


def _vision_trains_fn(spec: ModelSpec, s: MethodSettings):
    layers = unfrozen_vision_layers(spec, s)
    return lambda m, name: vision_layer_of(m.path) in layers


def plan_projector(spec, layout, s):
    """LLaVA stage 1 (Liu et al. 2023, Visual Instruction Tuning, section 4.2 "pre-training for feature
    alignment"): vision tower and language model frozen, the projector trains."""
    vision = _vision_trains_fn(spec, s)
    return _base_groups(layout, lambda m, name: _under(m.path, (PROJECTOR,)) or vision(m, name))


def plan_projector_llm(spec, layout, s):
    """LLaVA stage 2 ("fine-tuning end-to-end"): the vision tower stays frozen; the projector and the
    whole language model (embeddings, blocks, final norm, lm_head) train."""
    vision = _vision_trains_fn(spec, s)
    return _base_groups(layout, lambda m, name: _under(m.path, (PROJECTOR, LANGUAGE_MODEL, "lm_head")) or vision(m, name))


def plan_qformer(spec, layout, s):
    """BLIP-2 (Li et al. 2023, section 3: "a lightweight Querying Transformer" between a frozen image encoder
    and a frozen LLM): the Q-Former, the learned query tokens and the language projection train."""
    trains = (QFORMER, LANGUAGE_PROJECTION)
    return _base_groups(layout, lambda m, name: m.path == QUERY_TOKENS or _under(m.path, trains))


def _quantizable(mods: dict[str, Module], param: str, layout: Layout) -> bool:
    """transformers (integrations/bitsandbytes.py replace_with_bnb_linear) turns every nn.Linear and
    GPT-2 Conv1D into a Linear4bit except what quantizers/base.py get_keys_to_not_convert keeps in full
    precision: tied weights, the output embeddings, and the model's last parameter's name less a
    '.weight' suffix - the task head (lm_head, score) when its weight is the last parameter; a head with a
    bias ends in '.bias', which names no module, so ViT's and BERT's classifiers are quantized. The rest
    of a head is quantized too, e.g. BERT's MLM transform dense and RoBERTa's lm_head.dense (traced:
    uint8 weights)."""
    m = mods[param.rsplit(".", 1)[0]]
    if m.kind not in LINEAR_KINDS:
        return False
    last = layout.modules[-1]
    return not (m.path == last.path and not last.bias)


def plan_ia3(spec, layout, s):
    mods = _modules_by_path(layout)
    targets = resolve_targets(spec, layout, s)
    ff_keys = IA3_DEFAULT_TARGETS[spec.model_type][1] if s.targets is None else ()
    groups = _base_groups(layout, lambda m, name: False)
    for path in targets:
        m = mods[path]
        if m.kind not in LINEAR_KINDS:
            raise InputError(f"IA3 cannot wrap module '{path}' ({m.kind}); target Linear modules")
        # peft tuners/ia3/layer.py IA3Layer.update_layer: (out, 1) or, for feedforward, (1, in)
        feedforward = module_matches(path, ff_keys)
        shape = (1, m.in_features) if feedforward else (m.out_features, 1)
        groups.append(ParamGroup(f"{path}.ia3_l", _prod(shape), True, "ia3", m.layer, shape=shape))
    return groups + _head_copy(layout, spec), targets


def prompt_token_dim(spec: ModelSpec, method: str) -> int:
    """peft utils/other.py _prepare_prompt_learning_config: token_dim = hidden size; for prefix tuning
    on configs with num_key_value_heads (GQA, peft#1901) it is num_key_value_heads * head_dim."""
    if method == "prefix" and spec.model_type in ("llama", "mistral", "qwen2"):
        return spec.kv_dim
    return spec.hidden_size


def plan_prompt_learning(spec, layout, s):
    if spec.task not in ("causal_lm", "seq_cls"):
        raise CombinationError(
            f"method '{s.method}' needs a causal LM or sequence classifier (peft injects virtual tokens "
            f"only there); {spec.name} is {spec.architecture}"
        )
    if s.num_virtual_tokens < 1:
        raise InputError(f"--num-virtual-tokens must be a positive integer, got {s.num_virtual_tokens}")
    groups = _base_groups(layout, lambda m, name: False)
    dim = prompt_token_dim(spec, s.method)
    if s.method == "prefix":  # PrefixEncoder: Embedding(num_virtual_tokens, num_layers * 2 * token_dim)
        shape = (s.num_virtual_tokens, spec.num_layers * 2 * dim)
    else:  # PromptEmbedding: Embedding(num_virtual_tokens, token_dim)
        shape = (s.num_virtual_tokens, dim)
    groups.append(ParamGroup("prompt_embeddings", _prod(shape), True, s.method, shape=shape))
    return groups + _head_copy(layout, spec)


PLANNERS = {
    "full": plan_full,
    "frozen": plan_frozen,
    "freeze": plan_freeze,
    "bitfit": plan_bitfit,
    "adapter": plan_adapter,
    "lora": plan_lora,
    "qlora": plan_lora,
    "ia3": plan_ia3,
    "prefix": plan_prompt_learning,
    "prompt": plan_prompt_learning,
    "projector": plan_projector,
    "projector-llm": plan_projector_llm,
    "qformer": plan_qformer,
}


LEARNED_POSITION_TYPES = ("gpt2", "bert", "roberta", "opt", "blip-2")


def position_limit(spec: ModelSpec) -> int:
    """Longest sequence a model with learned positions takes (0: no limit; rotary models have none).
    RoBERTa's positions start after padding_idx (transformers create_position_ids_from_input_ids),
    losing two."""
    if spec.is_vision or not spec.max_positions or spec.model_type not in LEARNED_POSITION_TYPES:
        return 0
    return spec.max_positions - 2 if spec.model_type == "roberta" else spec.max_positions


def _tokens_beside_text(spec: ModelSpec, s: MethodSettings) -> tuple[int, int]:
    """Positions taken beside the text: prefix/prompt tuning's virtual tokens, BLIP-2's query tokens
    (OPT sees them first)."""
    extra = s.num_virtual_tokens if s.method in ("prefix", "prompt") else 0
    queries = dict(spec.blip2)["num_query_tokens"] if spec.model_type == "blip-2" else 0
    return extra, queries


def max_seq_len(spec: ModelSpec, s: MethodSettings) -> int:
    """The longest --seq-len the model's learned positions take with method settings `s` (0: no limit)."""
    limit = position_limit(spec)
    return limit - sum(_tokens_beside_text(spec, s)) if limit else 0


def check_combination(spec: ModelSpec, s: MethodSettings, seq_len: int, grad_checkpointing: bool) -> None:
    """Method and training settings the real stack cannot run together (InputError, one line):
    - a sequence (plus prefix/prompt virtual tokens, or BLIP-2's query tokens, which take positions
      too) longer than a model with learned positions has (GPT-2 1024, BERT 512, RoBERTa 514 - 2, OPT
      2048);
    - prefix tuning with gradient checkpointing: peft hands the prefix to the model as a transformers
      Cache, and the checkpoint's recompute of each layer updates it again, so keys and the attention
      mask disagree (peft#869, peft PR #2191; traced here with transformers 5.23 / peft 0.21.2: on cpu
      "The size of tensor a (32) must match the size of tensor b (52)" for tiny-llama 2 x 32)."""
    extra, queries = _tokens_beside_text(spec, s)
    longest = max_seq_len(spec, s)
    if longest and seq_len > longest:
        more = f" + {extra} virtual tokens" if extra else f" + {queries} query tokens" if queries else ""
        raise CombinationError(f"--seq-len {seq_len}{more} exceeds {spec.name}'s {position_limit(spec)} positions")
    if s.method == "prefix" and grad_checkpointing:
        raise CombinationError("prefix tuning cannot run with gradient checkpointing: the recompute updates peft's "
                         "prefix cache a second time (peft#869); drop --grad-checkpointing or use --method prompt")


def check_settings(spec: ModelSpec, s: MethodSettings) -> None:
    if s.method not in KNOWN_METHODS:
        raise InputError(f"unknown method '{s.method}'; choose from {', '.join(KNOWN_METHODS)}")
    if (spec.model_type == "blip-2") != (s.method in BLIP2_METHODS):
        if spec.model_type == "blip-2":
            raise CombinationError(f"method '{s.method}' is not supported for the BLIP-2 model {spec.name}; "
                             f"choose from {', '.join(BLIP2_METHODS)}")
        raise CombinationError(f"method '{s.method}' trains a BLIP-2 Q-Former, and {spec.name} ({spec.architecture}) "
                         "has none")
    if spec.is_vlm and s.method not in VLM_METHODS:
        raise CombinationError(f"method '{s.method}' is not supported for the vision-language model {spec.name}; "
                         f"choose from {', '.join(VLM_METHODS)}")
    if s.vision_layers:
        if not spec.is_vlm:
            raise InputError(f"--unfreeze-vision-layers applies to vision-language models; {spec.name} is not one")
        if not 0 < s.vision_layers <= vision_layers_used(spec):
            raise InputError(f"--unfreeze-vision-layers must be between 0 and the {vision_layers_used(spec)} vision "
                             f"layers the projector reads, got {s.vision_layers}")
    if not spec.is_vlm and s.method in VLM_ONLY_METHODS:
        raise CombinationError(f"method '{s.method}' trains a vision-language model's projector, and {spec.name} "
                         f"({spec.architecture}) has none")
    if s.prepare_kbit and s.method != "qlora":
        raise InputError(f"--prepare-kbit applies to qlora (peft.prepare_model_for_kbit_training prepares a "
                         f"quantized base); method '{s.method}' has none")
    if s.method == "freeze":
        k = s.trainable_layers if s.trainable_layers is not None else default_trainable_layers(spec)
        if not 1 <= k <= spec.num_layers:
            raise InputError(f"--trainable-layers must be between 1 and the depth {spec.num_layers}, got {k}")


@lru_cache(maxsize=4096)
def make_plan(spec: ModelSpec, settings: MethodSettings) -> Plan:
    """Apply a method to a model: every parameter with its trainable flag and origin."""
    check_settings(spec, settings)
    layout = build_layout(spec)
    result = PLANNERS[settings.method](spec, layout, settings)
    targets: tuple[str, ...] = ()
    if isinstance(result, tuple):
        result, targets = result
    groups = tuple(result)
    trainable_layers = [g.layer for g in groups if g.trainable and g.layer is not None]
    embedding_trains = any(
        g.trainable and g.origin == "base" and g.name.startswith(layout.embedding_path + ".") for g in groups
    )
    if spec.is_vlm:  # the projected image features are scattered into the language model's input
        # embeddings (LlavaModel.forward, masked_scatter): a trainable projector makes that input need a
        # gradient, as a trainable embedding does
        embedding_trains = embedding_trains or any(g.trainable and g.name.startswith(PROJECTOR + ".") for g in groups)
    return Plan(
        spec=spec,
        settings=settings,
        groups=groups,
        targets=targets,
        lowest_trainable_layer=min(trainable_layers) if trainable_layers else None,
        embedding_trains=embedding_trains,
    )


def normalize_targets(targets) -> tuple[str, ...] | str | None:
    """`--targets q_proj,v_proj` or `all-linear` into what MethodSettings holds."""
    if targets is None or targets == "":
        return None
    if isinstance(targets, str):
        if targets.strip().lower() == "all-linear":
            return "all-linear"
        targets = [t for t in (x.strip() for x in targets.split(",")) if t]
    return tuple(targets)
