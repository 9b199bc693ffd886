"""Where the methods sit inside a block: which of its weights, norms and biases train and which Linears
carry LoRA, IA3 or an adapter (LayerTraining, from a plan), and BlockSites, what a family's block calls
to run a Linear with its method's ops around it, an adapter after a projection, or one after the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from peftcalc.families import build_layout
from peftcalc.layout import Layout
from peftcalc.methods.adapter import ADAPTER_ATTRIBUTE, BLOCK_ADAPTER_DROPOUT, adapter_block, block_adapter, resolve_bottleneck
from peftcalc.methods.ia3 import ia3_input, ia3_output
from peftcalc.methods.lora import lora
from peftcalc.ops.attention import layer_windows
from peftcalc.ops.linear import linear
from peftcalc.ops.recorder import Recorder, SymTensor
from peftcalc.plan import Plan
from peftcalc.spec import ModelSpec

__all__ = [
    "BlockSites",
    "HeadSites",
    "LayerTraining",
    "biased_paths",
    "block_biases",
    "distinct_layer_trainings",
    "head_linear",
    "layer_trainings",
    "param_trains",
    "quantized_paths",
    "site_linear",
    "trainable_names",
    "trained_norm_params",
]


@dataclass(frozen=True)
class LayerTraining:
    """Per-module facts of one block: which weights train, where LoRA/IA3/adapters sit."""

    trainable: frozenset  # module paths (relative names like "q_proj") whose weight trains
    norm_trainable: frozenset
    lora: frozenset
    ia3_out: frozenset
    ia3_ff: frozenset
    adapters: frozenset  # "attn_out", "mlp_out"; "block": after the block (a VLM's vision tower)
    bias_trainable: frozenset = frozenset()  # modules whose bias trains (BitFit): output needs grad
    norm_bias_only: frozenset = frozenset()  # norms of which only the bias trains (BitFit)
    window: int = 0  # the block's attention window in tokens (ModelSpec.layer_windows; 0: full attention)
    params: frozenset = frozenset()  # bare parameters (a router's weight, fused experts) that train, by name
    rope: bool = True  # the block's attention applies RoPE (ModelSpec.rope_layers: SmolLM3's NoPE layers do not)


# the roles of the bare parameters a block's own ops read (a router's weight and bias, fused experts and their
# biases, gpt-oss's attention sinks)
BARE_PARAMETER_ROLES = ("router", "router_bias", "experts", "experts_bias", "sinks")


@lru_cache(maxsize=1024)
def layer_trainings(plan: Plan, layout: Layout) -> list[LayerTraining]:
    """What trains inside each block, from the plan's parameter groups (one pass over them)."""
    n = plan.spec.num_layers
    sets = [dict(trainable=set(), norms=set(), lora=set(), ia3_out=set(), ia3_ff=set(), adapters=set(),
                 biases=set(), norm_weights=set(), norm_biases=set(), params=set()) for _ in range(n)]
    roles = {m.path: m.role for m in layout.modules if m.layer is not None}
    for g in plan.groups:
        if g.layer is None or not g.trainable:
            continue
        prefix = f"{layout.block_prefix}.{g.layer}."
        rel = g.name[len(prefix):]
        s = sets[g.layer]
        if g.origin == "base":
            module = rel.rsplit(".", 1)[0]
            if roles.get(g.name) in BARE_PARAMETER_ROLES:  # a bare parameter the block's own ops use
                s["params"].add(rel)
            elif roles.get(prefix + module) == "norm":  # LayerNorm saves its input for either parameter
                s["norms"].add(module)
                s["norm_weights" if rel.endswith(".weight") else "norm_biases"].add(module)
            elif rel.endswith(".weight"):  # a Linear saves its input for the weight's gradient only
                s["trainable"].add(module)
            else:
                s["biases"].add(module)
        elif g.origin in ("lora", "dora"):
            s["lora"].add(rel.split(".lora_", 1)[0])
        elif g.origin == "ia3":
            (s["ia3_ff"] if g.shape[0] == 1 else s["ia3_out"]).add(rel.rsplit(".", 1)[0])
        elif g.origin == "adapter":
            if rel.startswith(ADAPTER_ATTRIBUTE + "."):  # the block adapter on the block's output
                s["adapters"].add("block")
            else:
                s["adapters"].add(roles.get(prefix + rel.split("." + ADAPTER_ATTRIBUTE, 1)[0], ""))
    return [LayerTraining(frozenset(s["trainable"]), frozenset(s["norms"]), frozenset(s["lora"]),
                          frozenset(s["ia3_out"]), frozenset(s["ia3_ff"]), frozenset(s["adapters"]),
                          frozenset(s["biases"]), frozenset(s["norm_biases"] - s["norm_weights"]), window,
                          frozenset(s["params"]), rope)
            for s, window, rope in zip(sets, layer_windows(plan.spec), plan.spec.rope_layers or (True,) * n)]


@lru_cache(maxsize=1024)
def distinct_layer_trainings(plan: Plan, layout: Layout) -> tuple[tuple[LayerTraining, ...], tuple[int, ...]]:
    """The distinct LayerTrainings of the blocks (first-seen order) and each block's index among them:
    run_blocks looks a block's simulation up by that index instead of hashing its LayerTraining."""
    distinct: dict = {}
    index = tuple(distinct.setdefault(training, len(distinct)) for training in layer_trainings(plan, layout))
    return tuple(distinct), index


@lru_cache(maxsize=256)
def block_biases(layout: Layout) -> frozenset:
    """Relative names (as in block 0) of the block's modules that carry a bias."""
    prefix = f"{layout.block_prefix}.0."
    return frozenset(m.path[len(prefix):] for m in layout.blocks(0) if m.bias)


def site_linear(rec: Recorder, x: SymTensor, in_f: int, out_f: int, trainable: bool, tag: str,
                lora_rank: int = 0, dora: bool = False, ia3: str = "", quantized: bool = False,
                bias: bool = False, bias_trains: bool = False, grad_pending: bool = False) -> SymTensor:
    """A Linear with its method's ops around the base layer (ops.linear.linear): peft IA3 on the
    feed-forward input scales x before peft calls the base layer (tuners/ia3/layer.py Linear.forward; the
    scaled input, peft's ``interm``, goes when the layer returns), LoRA/DoRA adds its delta to the base
    result (tuners/lora/layer.py Linear.forward, methods.lora.lora), IA3 on keys/values scales the output
    (methods.ia3.ia3_output)."""
    xm = ia3_input(rec, x, in_f, tag) if ia3 == "ff" else x
    out = linear(rec, xm, in_f, out_f, trainable, tag, quantized=quantized, bias=bias, bias_trains=bias_trains,
                 grad_pending=grad_pending)
    if xm is not x:
        rec.free(xm)
    if lora_rank:
        out = lora(rec, x, out, in_f, out_f, lora_rank, dora, bias, tag, quantized)
    if ia3 == "out":
        out = ia3_output(rec, out, out_f, tag)
    return out


@dataclass(frozen=True)
class BlockSites:
    """What a family's block function calls where a method may sit (peftcalc.families.record.Family.block):
    its Linears (with LoRA, DoRA, IA3, QLoRA's NF4 base), the adapters after its output projections and after
    the block, and whether its norms train. `spec` is the block's model (a part's, inside LLaVA or BLIP-2)."""

    spec: ModelSpec
    plan: Plan
    training: LayerTraining

    def linear(self, rec: Recorder, x: SymTensor, name: str, in_f: int, out_f: int) -> SymTensor:
        """The block's Linear `name` (NF4 under QLoRA: methods.lora.quantizable quantizes every block Linear)."""
        s, training = self.plan.settings, self.training
        ia3 = "ff" if name in training.ia3_ff else ("out" if name in training.ia3_out else "")
        return site_linear(rec, x, in_f, out_f, name in training.trainable, name,
                           lora_rank=s.rank if name in training.lora else 0, dora=s.dora and name in training.lora, ia3=ia3,
                           quantized=s.method == "qlora", bias=name in block_biases(build_layout(self.plan.spec)),
                           bias_trains=name in training.bias_trainable)

    @property
    def window(self) -> int:
        """The block's attention window in tokens (0: full causal attention; ops.attention.attention)."""
        return self.training.window

    @property
    def rope(self) -> bool:
        """Whether the block's attention applies RoPE (LayerTraining.rope)."""
        return self.training.rope
    def param_lora(self, name: str) -> int:
        """The LoRA rank on the block's bare parameter `name` (fused experts through peft's target_parameters;
        0: none)."""
        return self.plan.settings.rank if name in self.training.lora else 0

    def lora_scaling(self) -> float:
        """LoRA's alpha / r (the harness's lora_alpha is 2 r when alpha is not set)."""
        s = self.plan.settings
        return (s.alpha if s.alpha is not None else 2 * s.rank) / s.rank

    def param_trains(self, name: str) -> bool:
        """Whether the block's bare parameter `name` (a router's weight, fused experts) trains."""
        return name in self.training.params

    def norm_trains(self, norm: str) -> bool:
        """Whether the block's norm `norm` has a parameter that trains."""
        return norm in self.training.norm_trainable

    def norm_params(self, norm: str) -> int:
        """How many of the block's LayerNorm's parameters (weight, bias) get a gradient."""
        return 1 if norm in self.training.norm_bias_only else 2

    def adapt(self, rec: Recorder, out: SymTensor, role: str, tag: str) -> SymTensor:
        """An output projection's output through its bottleneck adapter, where the method put one (a forward
        hook, run before the projection's call returns: its input is still referenced meanwhile, and its own
        output is dropped once the adapter has made its replacement)."""
        if role not in self.training.adapters:
            return out
        adapted = adapter_block(rec, out, self.spec.hidden_size, resolve_bottleneck(self.spec, self.plan.settings), tag)
        rec.free(out)
        return adapted

    def after_block(self, rec: Recorder, out: SymTensor) -> SymTensor:
        """The block's output through the adapter a vision-language model's vision tower puts after each
        block (a forward hook of the layer), where the method put one."""
        if "block" not in self.training.adapters:
            return out
        adapted = block_adapter(rec, out, self.spec.hidden_size, resolve_bottleneck(self.spec, self.plan.settings),
                                BLOCK_ADAPTER_DROPOUT)
        rec.free(out)
        return adapted


@lru_cache(maxsize=1024)
def trainable_names(plan: Plan) -> frozenset:
    """Names of the trainable parameters outside the blocks (a modules_to_save copy counts as its
    original)."""
    return frozenset(g.name.split("#", 1)[0] for g in plan.groups if g.trainable and g.layer is None)


def trained_norm_params(plan: Plan, path: str) -> int:
    """How many of the weight and bias of the LayerNorm at `path` (outside the blocks) train (2 when
    neither does: layer_norm then makes no parameter gradient)."""
    names = trainable_names(plan)
    return ((f"{path}.weight" in names) + (f"{path}.bias" in names)) or 2


def param_trains(plan: Plan, path: str, weight_only: bool = False) -> bool:
    names = trainable_names(plan)
    if weight_only:
        return f"{path}.weight" in names or path in names
    return any(n == path or n.startswith(path + ".") for n in names)


def head_linear(rec: Recorder, plan: Plan, x: SymTensor, path: str, in_f: int, out_f: int, tag: str,
                 trains: bool | None = None) -> SymTensor:
    """A head Linear: trainable (a modules_to_save copy, a trainable head), or a LoRA/DoRA target
    (all-linear takes the MLM transform's dense, BERT's pooler and ViT's classifier; DoRA subtracts the
    bias of one that has it, see dora_output)."""
    s = plan.settings
    lora = s.method in ("lora", "qlora") and path in plan.targets
    w = param_trains(plan, path, True) if trains is None else trains
    return site_linear(rec, x, in_f, out_f, w, tag, lora_rank=s.rank if lora else 0, dora=s.dora and lora,
                  quantized=path in quantized_paths(plan), bias=path in biased_paths(build_layout(plan.spec)),
                  bias_trains=f"{path}.bias" in trainable_names(plan))


@lru_cache(maxsize=256)
def biased_paths(layout: Layout) -> frozenset:
    """Paths of the model's modules that carry a bias."""
    return frozenset(m.path for m in layout.modules if m.bias)


@lru_cache(maxsize=1024)
def quantized_paths(plan: Plan) -> frozenset:
    """Module paths whose weight is NF4 (QLoRA: bitsandbytes Linear4bit, methods.lora.quantizable)."""
    return frozenset(g.name.rsplit(".", 1)[0] for g in plan.groups if g.quantized)


@dataclass(frozen=True)
class HeadSites:
    """What a family's embeddings and head code calls where a method may sit outside the blocks
    (Family.embeddings, Family.mlm_head, Family.seq_cls_head): which parameters train, and a head Linear
    with its LoRA/DoRA (head_linear)."""

    plan: Plan

    @property
    def embedding_trains(self) -> bool:
        """Whether the input embedding trains (a head tied to it then waits for its gradient)."""
        return self.plan.embedding_trains

    def trains(self, path: str, weight_only: bool = False) -> bool:
        """Whether a parameter of the module at `path` (its weight, with `weight_only`) trains."""
        return param_trains(self.plan, path, weight_only)

    def norm_params(self, path: str) -> int:
        """How many of the LayerNorm at `path`'s weight and bias get a gradient (trained_norm_params)."""
        return trained_norm_params(self.plan, path)

    def linear(self, rec: Recorder, x: SymTensor, path: str, in_f: int, out_f: int, tag: str) -> SymTensor:
        """The head Linear at `path` (head_linear)."""
        return head_linear(rec, self.plan, x, path, in_f, out_f, tag)
