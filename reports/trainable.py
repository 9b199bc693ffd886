"""Trainable vs total parameters, method by method, for a real model, side by side with the
typical trainable fractions two public PEFT glossary pages give: the method table of the Inferensys
glossary entry "Trainable Parameters" and the frozen-backbone vs full fine-tuning comparison of its
entry "Frozen Backbone" (both by Prasad Kumkar; footnotes [1] and [2] of the table).

The claims are data (:data:`METHOD_TABLE_CLAIMS`, :data:`FROZEN_BACKBONE_CLAIMS`), each as the page
writes it and naming the table row or list item it is read from, so a reader can check the quote.
They are claims to check, not truths (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcalc.settings import DEFAULT_OPTIMIZER
from peftcalc import estimate
from peftcalc.errors import InputError
from peftcalc.methods import methods_for
from peftcalc.config import load_spec

# The two public sources: footnotes [1] and [2] of the table (columns "claim [1]" and "claim [2]").
METHOD_TABLE = 'Inferensys glossary "Trainable Parameters"'
FROZEN_BACKBONE = 'Inferensys glossary "Frozen Backbone"'
SOURCES = {
    METHOD_TABLE: ('[1] Inferensys glossary, "Trainable Parameters" (Prasad Kumkar): column "Typical % of Params '
                   'Trained" of its table "How PEFT Methods Define Trainable Parameters"'),
    FROZEN_BACKBONE: ('[2] Inferensys glossary, "Frozen Backbone" (Prasad Kumkar): row "Trainable Parameter Count" '
                      'of its table "Frozen Backbone (PEFT) vs. Full Fine-Tuning", and its "Parameter Efficiency" '
                      'list (adapters, LoRA)'),
}


@dataclass(frozen=True)
class Claim:
    """A claimed range of the trainable fraction, in percent (low may be 0 for '< x%')."""

    text: str  # as the source writes it
    low_pct: float
    high_pct: float
    cite: str  # the public source and the row or list item the range is read from

    def contains(self, pct: float) -> bool:
        return self.low_pct <= pct <= self.high_pct


def _row(name: str) -> str:
    return f'{METHOD_TABLE}, method table, row "{name}"'


# [1] "How PEFT Methods Define Trainable Parameters", column "Typical % of Params Trained".
METHOD_TABLE_CLAIMS = {
    "adapter": Claim("0.5% - 8%", 0.5, 8.0, _row("Adapter")),
    "lora": Claim("0.01% - 0.1%", 0.01, 0.1, _row("LoRA (Low-Rank Adaptation)")),
    "prefix": Claim("< 0.1%", 0.0, 0.1, _row("Prefix Tuning")),
    "prompt": Claim("< 0.01%", 0.0, 0.01, _row("Prompt Tuning")),
    "bitfit": Claim("0.09% - 0.1%", 0.09, 0.1, _row("BitFit")),
    "ia3": Claim("~0.01% - 0.1%", 0.01, 0.1, _row("(IA)³")),
    "qlora": Claim("0.01% - 0.1%", 0.01, 0.1, _row("QLoRA")),
}
# [1]'s "Visual / VL-Adapter" row: adapters in a vision encoder (ViT, CLIP).
METHOD_TABLE_VISUAL_ADAPTER = Claim("1% - 5%", 1.0, 5.0, _row("Visual / VL-Adapter"))
# [2] "Frozen Backbone (PEFT) vs. Full Fine-Tuning", row "Trainable Parameter Count", and the
# per-method figures of its "Parameter Efficiency" list.
FROZEN_BACKBONE_CLAIMS = {
    "full": Claim("100%", 100.0, 100.0, f'{FROZEN_BACKBONE}, comparison table, "Full Fine-Tuning" column'),
    "adapter": Claim("0.5-8%", 0.5, 8.0, f'{FROZEN_BACKBONE}, "Parameter Efficiency" list, adapters'),
    "lora": Claim("less than 1%", 0.0, 1.0, f'{FROZEN_BACKBONE}, "Parameter Efficiency" list, LoRA'),
    "qlora": Claim("less than 1%", 0.0, 1.0, f'{FROZEN_BACKBONE}, "Parameter Efficiency" list, LoRA'),
}
# any other frozen-backbone method: [2]'s "Frozen Backbone (PEFT)" column
FROZEN_BACKBONE_PEFT = Claim("< 1% to 5%", 0.0, 5.0,
                             f'{FROZEN_BACKBONE}, comparison table, "Frozen Backbone (PEFT)" column')

# The rows of the table: every method at its defaults (peft's where peft has one), plus the
# all-linear LoRA/QLoRA most people use.
VARIANTS = [
    ("full", {}),
    ("frozen", {}),
    ("freeze", {}),
    ("lora", {}),
    ("lora", {"rank": 16, "targets": "all-linear"}),
    ("qlora", {}),
    ("qlora", {"rank": 16, "targets": "all-linear"}),
    ("adapter", {}),
    ("prefix", {}),
    ("prompt", {}),
    ("bitfit", {}),
    ("ia3", {}),
]


def describe(method: str, kw: dict, spec) -> str:
    """The method's knobs in words, with the defaults made explicit."""
    from peftcalc.methods import IA3_DEFAULT_TARGETS, LORA_DEFAULT_TARGETS

    if method in ("lora", "qlora"):
        family = spec.text.model_type if spec.is_vlm else spec.model_type  # LLaVA: LoRA on the language model
        targets = kw.get("targets") or ",".join(LORA_DEFAULT_TARGETS[family])
        return (f"r={kw.get('rank', 8)}, {targets}" + (", NF4 base" if method == "qlora" else "")
                + (" + projector" if spec.is_vlm else ""))
    if method == "projector":
        return "projector only (vision tower and language model frozen)"
    if method == "projector-llm":
        return "projector + language model"
    if method == "qformer":
        return "Q-Former, query tokens, language projection"
    if method == "adapter":
        from peftcalc.methods import MethodSettings, resolve_adapter_kind, resolve_bottleneck

        s = MethodSettings("adapter", **{k: v for k, v in kw.items() if k in ("adapter_kind", "bottleneck")})
        return f"{resolve_adapter_kind(spec, s)}, bottleneck {resolve_bottleneck(spec, s)}"
    if method in ("prefix", "prompt"):
        return f"{kw.get('num_virtual_tokens', 20)} virtual tokens"
    if method == "freeze":
        k = kw.get("trainable_layers") or max(1, spec.num_layers // 4)
        return f"top {k} of {spec.num_layers} blocks + norm + head"
    if method == "ia3":
        return ",".join(IA3_DEFAULT_TARGETS[spec.model_type][0])
    if method == "frozen":
        return "task head only (linear probe)"
    if method == "bitfit":
        return "bias terms only"
    return "every parameter"


def claims_for(method: str, spec) -> tuple[Claim | None, Claim | None]:
    """([1] method-table claim, [2] frozen-backbone claim) for a method on this model."""
    c1 = METHOD_TABLE_CLAIMS.get(method)
    if method == "adapter" and spec.is_vision:
        c1 = METHOD_TABLE_VISUAL_ADAPTER
    c2 = FROZEN_BACKBONE_CLAIMS.get(method)
    if c2 is None and method not in ("full", "frozen", "freeze"):
        c2 = FROZEN_BACKBONE_PEFT
    return c1, c2


def _outside(claim: Claim | None, pct: float | None):
    if claim is None or pct is None:
        return None
    return not claim.contains(pct)


def _factor(claim: Claim | None, pct: float | None) -> str:
    """How far outside the claimed range: 'x3.2 above', 'x0.4 below' ('' when inside)."""
    if claim is None or pct is None or claim.contains(pct):
        return ""
    if pct > claim.high_pct:
        return f"{pct / claim.high_pct:.2g}x the upper end"
    if claim.low_pct > 0:
        return f"{pct / claim.low_pct:.2g}x the lower end"
    return ""


def trainable_frame(model, batch_size: int = 1, seq_len: int = 512, precision: str = "bf16",
                    optimizer: str = DEFAULT_OPTIMIZER, grad_checkpointing: bool = False, device: str = "cuda",
                    variants=VARIANTS):
    """One row per method variant: trainable, total, %, peak memory at the stated setting, the
    claimed ranges [1] and [2] and whether the real figure is outside them. A method the model cannot take (BitFit on a
    model without biases) gets a row saying why."""
    import pandas as pd

    spec = load_spec(model)
    if variants is VARIANTS and (spec.is_vlm or spec.model_type == "blip-2"):  # the stages they take
        variants = [(m, {}) for m in methods_for(spec)]
    rows = []
    for method, kw in variants:
        c1, c2 = claims_for(method, spec)
        base = {"model": spec.name, "method": method, "settings": describe(method, kw, spec)}
        try:
            e = estimate(spec, method=method, batch_size=batch_size, seq_len=seq_len, precision=precision,
                         optimizer=optimizer, grad_checkpointing=grad_checkpointing, device=device, **kw)
        except InputError as exc:
            rows.append({**base, "trainable": None, "total": None, "trainable_pct": None, "peak_bytes": None,
                         "peak_gib": None, "peak_phase": None,
                         "claim_method_table": c1.text if c1 else "", "outside_method_table": None,
                         "claim_frozen_backbone": c2.text if c2 else "", "outside_frozen_backbone": None,
                         "how_far": "", "cite_method_table": c1.cite if c1 else "",
                         "cite_frozen_backbone": c2.cite if c2 else "", "note": f"n/a: {exc}"})
            continue
        pct = e.params.percent
        rows.append({
            **base,
            "trainable": e.params.trainable,
            "total": e.params.total,
            "trainable_pct": pct,
            "peak_bytes": e.memory.peak_bytes,
            "peak_gib": e.memory.peak_bytes / 1024**3,
            "peak_phase": e.memory.peak_phase,
            "claim_method_table": c1.text if c1 else "",
            "outside_method_table": _outside(c1, pct),
            "claim_frozen_backbone": c2.text if c2 else "",
            "outside_frozen_backbone": _outside(c2, pct),
            "how_far": _factor(c1, pct) or _factor(c2, pct),
            "cite_method_table": c1.cite if c1 else "",
            "cite_frozen_backbone": c2.cite if c2 else "",
            "note": "",
        })
    df = pd.DataFrame(rows)
    for col in ("trainable", "total", "peak_bytes"):
        df[col] = df[col].astype("Int64")
    df.attrs["setting"] = (f"{spec.name}, batch {batch_size}, seq {seq_len}, {precision}, {optimizer}"
                           f"{', grad checkpointing' if grad_checkpointing else ''}, peak = {device} "
                           f"{'max_memory_allocated' if device == 'cuda' else 'trace'} of a steady-state step")
    return df


def _flag(outside) -> str:
    if outside is None:
        return ""
    return "OUTSIDE" if outside else "inside"


def trainable_markdown_rows(df) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the human table (markdown and the terminal table)."""
    header = ["method", "settings", "trainable", "total", "trainable %", "peak (GiB)", "claim [1]", "vs [1]",
              "claim [2]", "vs [2]", "how far"]
    cells = []
    for r in df.to_dict("records"):
        if r["note"]:
            cells.append([r["method"], r["settings"], "-", "-", "-", "-", r["claim_method_table"], "",
                          r["claim_frozen_backbone"], "",
                          r["note"]])
            continue
        cells.append([r["method"], r["settings"], f"{int(r['trainable']):,}", f"{int(r['total']):,}",
                      _pct(r["trainable_pct"]), f"{r['peak_gib']:.2f}", r["claim_method_table"] or "-",
                      _flag(r["outside_method_table"]), r["claim_frozen_backbone"] or "-",
                      _flag(r["outside_frozen_backbone"]), r["how_far"]])
    return header, cells


def _pct(p: float) -> str:
    if p >= 1:
        return f"{p:.2f}%"
    if p >= 0.01:
        return f"{p:.3f}%"
    return f"{p:.4f}%"


def citations(df) -> list[str]:
    """The footnotes [1] and [2] for the sources the table's claims come from (each claim's row or list
    item is in the frame's cite_method_table / cite_frozen_backbone columns)."""
    used = {c.split(",", 1)[0] for c in list(df["cite_method_table"]) + list(df["cite_frozen_backbone"]) if c}
    return [note for source, note in SOURCES.items() if source in used]
