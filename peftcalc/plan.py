"""What a method makes of a model: MethodSettings (the method and its knobs), ParamGroup (one parameter
tensor of the trained model) and Plan (all of them, with the facts the memory model needs).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.spec import ModelSpec

__all__ = [
    "MethodSettings",
    "ParamGroup",
    "Plan",
]


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
    # peft's adapter weights' dtype: float32 (peft autocast_adapter_dtype=True), or the param_dtype FSDP2's
    # MixedPrecisionPolicy all-gathers them in (peftcalc.sharding.fsdp.compute_plan)
    adapter_dtype: str = "float32"

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
