"""Seed 001's "Memory Breakdown Example (7B VLM)" (shared/seeds/001_a3d99a82dbe70d50.txt, lines
850-868), recomputed row by row from what the calculator knows today.

The seed's model is its own ``SimpleVLM`` (seed 001 lines 577-600): CLIP ViT-L/14-336 vision tower
(``openai/clip-vit-large-patch14-336``), Llama-2-7B (``meta-llama/Llama-2-7b-hf``) and a 2-layer MLP
projector 1024 -> 4096 -> 4096 (the LLaVA-style count of seed 001 lines 132-136). Training stage 1:
both backbones frozen, the projector trains with Adam.

What is computed here: the parameter counts (the vision tower and the LLM from the registry
specs, exactly as transformers builds them; the projector by formula, with its biases), weights,
gradients and Adam states in the seed's two precisions, and the saved activations *of the parts*:
the LLM's (calculator, with gradients flowing to its input embeddings, as they must to reach the
projector) plus the projector's own (formula). What waits for the vision-language issue: a LLaVA
spec (one model: tower + projector + LLM, image tokens through the LLM) that the calculator
predicts and the harness measures as one model. Until then the activation rows are proxies.
"""

from __future__ import annotations

from dataclasses import replace

from peftcalc.activations import activation_profile
from peftcalc.api import plan_for
from peftcalc.settings import TrainingSettings
from peftcalc.spec import load_spec

SEED_001 = "shared/seeds/001_a3d99a82dbe70d50.txt"
VISION = "clip-vit-l-14-336-vision"  # seed 001 line 583-584
VISION_224 = "clip-vit-l-14-vision"
LLM = "llama-2-7b"  # seed 001 line 586-587
VISION_DIM, LLM_DIM = 1024, 4096  # seed 001 lines 133-135
BATCH = 4  # the seed's "Activations (batch=4)"
IMAGE_TOKENS = 576  # (336 / 14)^2 patches, LLaVA-1.5 (the CLS token dropped)
TEXT_TOKENS = 64  # a short caption (stage-1 projector pre-training); an assumption, the seed names no length
LONG_SEQ = 2048  # LLaVA-1.5's training context
STATUS = ("Partial: the full VLM recomputation (a LLaVA spec: vision tower + projector + LLM predicted and measured "
          "as one model) waits for the vision-language issue. Parameter, weight, gradient and optimizer rows are "
          "exact counts of the parts; activation rows are proxies built from the parts.")

# (component, seed params, seed FP16 bytes, seed FP32 bytes, seed line); bytes in the seed's
# decimal units (608 MB = 608e6).
SEED_ROWS = [
    ("vision encoder", 304e6, 608e6, 1.2e9, 854),
    ("language model", 7e9, 14e9, 28e9, 855),
    ("projector", 21e6, 42e6, 84e6, 856),
    ("weights total", 7.3e9, 14.6e9, 29.3e9, 857),
    ("gradients (trainable)", 21e6, 42e6, 84e6, 858),
    ("optimizer states (Adam)", 42e6, 84e6, 168e6, 859),
    ("activations (batch=4)", None, 6e9, 6e9, 860),
    ("total GPU memory", None, 21e9, 36e9, 861),
    ("full FT: gradients", 7.3e9, 14.6e9, None, 864),
    ("full FT: optimizer states", 14.6e9, 29.2e9, None, 865),
    ("full FT: total", None, 64e9, None, 866),
]
SEED_SAVINGS_PCT = (67.0, 868)  # "21 GB vs. 64 GB = 67% reduction"


def projector_params(vision_dim: int = VISION_DIM, llm_dim: int = LLM_DIM, bias: bool = True) -> int:
    """2-layer MLP vision_dim -> llm_dim -> llm_dim (nn.Linear, GELU, nn.Linear): the seed's formula
    (1024 x 4096) + (4096 x 4096) plus the two bias vectors nn.Linear adds."""
    return vision_dim * llm_dim + llm_dim * llm_dim + (2 * llm_dim if bias else 0)


def projector_saved_bytes(batch: int, tokens: int, dtype_bytes: int) -> int:
    """What autograd saves in the projector: fc1's input (for its weight gradient), fc1's output
    (GELU's input) and GELU's output (fc2's input): batch x tokens x (1024 + 4096 + 4096)."""
    return batch * tokens * (VISION_DIM + 2 * LLM_DIM) * dtype_bytes


def llm_activations(precision: str, seq_len: int, method: str = "prompt") -> tuple[int, int]:
    """(saved activations, logits/loss buffers) of Llama-2-7B at batch 4 when gradients must reach its
    input embeddings. Proxy: peft prompt tuning with one virtual token (a trainable input, a frozen
    LLM: exactly the projector-only case for the LLM), over seq_len - 1 tokens plus that one; method
    'full' for the all-unfrozen case."""
    plan = plan_for(LLM, method, num_virtual_tokens=1) if method == "prompt" else plan_for(LLM, method)
    seq = seq_len - 1 if method == "prompt" else seq_len
    t = TrainingSettings(batch_size=BATCH, seq_len=seq, precision=precision)
    act = activation_profile(plan, t)
    return act.pre + sum(act.per_layer) + act.post, act.loss_backward_peak


def vision_activations(precision: str) -> int:
    """Saved activations of the CLIP tower when it trains (full fine-tuning), batch 4."""
    plan = plan_for(VISION, "full")
    act = activation_profile(plan, TrainingSettings(batch_size=BATCH, seq_len=1, precision=precision))
    return act.pre + sum(act.per_layer) + act.post


def vlm_frame(text_tokens: int = TEXT_TOKENS):
    """The seed's table next to the recomputed numbers: params, FP16 and FP32 bytes (decimal GB,
    the seed's unit), the difference, how each row was computed, and the seed line."""
    import pandas as pd

    from peftcalc.methods import MethodSettings, make_plan

    vision = make_plan(load_spec(VISION), MethodSettings("full")).total
    vision_224 = make_plan(load_spec(VISION_224), MethodSettings("full")).total
    llm = make_plan(load_spec(LLM), MethodSettings("full")).total
    proj = projector_params()
    weights = vision + llm + proj
    seq = IMAGE_TOKENS + text_tokens
    rec = {}
    for prec, nbytes in (("fp16", 2), ("fp32", 4)):
        act_llm, logits = llm_activations(prec, seq)
        act = act_llm + projector_saved_bytes(BATCH, IMAGE_TOKENS, nbytes)
        act_llm_full, logits_full = llm_activations(prec, seq, "full")
        act_full = act_llm_full + projector_saved_bytes(BATCH, IMAGE_TOKENS, nbytes) + vision_activations(prec)
        long_llm, long_logits = llm_activations(prec, LONG_SEQ)
        rec[prec] = {
            "vision encoder": vision * nbytes, "language model": llm * nbytes, "projector": proj * nbytes,
            "weights total": weights * nbytes, "gradients (trainable)": proj * nbytes,
            "optimizer states (Adam)": 2 * proj * nbytes,
            "activations (batch=4)": act,
            "logits / loss buffers (not in the seed)": logits,
            "total GPU memory": weights * nbytes + 3 * proj * nbytes + act + logits,
            "full FT: gradients": weights * nbytes, "full FT: optimizer states": 2 * weights * nbytes,
            "full FT: total": 4 * weights * nbytes + act_full + logits_full,
            f"activations (batch=4, seq {LONG_SEQ})": long_llm + projector_saved_bytes(BATCH, IMAGE_TOKENS, nbytes)
                                                        + long_logits,
        }
    params = {"vision encoder": vision, "language model": llm, "projector": proj, "weights total": weights,
              "gradients (trainable)": proj, "optimizer states (Adam)": 2 * proj,
              "full FT: gradients": weights, "full FT: optimizer states": 2 * weights}
    how = {
        "vision encoder": f"registry {VISION} (CLIPVisionModel, as transformers builds it); the 224-px tower "
                          f"{VISION_224} has {vision_224:,}",
        "language model": f"registry {LLM} (LlamaForCausalLM, untied head)",
        "projector": "formula (1024 x 4096 + 4096) + (4096 x 4096 + 4096): the seed's count plus biases",
        "weights total": "sum of the three",
        "gradients (trainable)": "projector, one gradient per parameter",
        "optimizer states (Adam)": "projector, exp_avg + exp_avg_sq in the parameter dtype (torch AdamW)",
        "activations (batch=4)": f"PROXY: Llama-2-7B saved activations with gradients to its inputs (calculator, "
                                 f"prompt-tuning stand-in), batch 4 x {seq} tokens ({IMAGE_TOKENS} image + "
                                 f"{text_tokens} text, assumed), + projector's saved tensors; frozen CLIP saves nothing",
        "logits / loss buffers (not in the seed)": f"calculator: logits and the fp32 loss upcast, batch 4 x {seq} x 32000",
        "total GPU memory": "weights + gradients + Adam + activations + logits (the seed's sum, plus logits)",
        "full FT: gradients": f"all {weights / 1e9:.3f}B parameters",
        "full FT: optimizer states": f"all {weights / 1e9:.3f}B parameters x 2",
        "full FT: total": "weights + gradients + Adam + full-FT activations (LLM and CLIP, calculator) + logits",
        f"activations (batch=4, seq {LONG_SEQ})": f"PROXY as above at {LONG_SEQ} tokens (LLaVA-1.5 context), with logits",
    }
    seed = {name: (p, f16, f32, line) for name, p, f16, f32, line in SEED_ROWS}
    rows = []
    for name in list(rec["fp16"]):
        sp, s16, s32, line = seed.get(name, (None, None, None, None))
        r16, r32 = rec["fp16"][name], rec["fp32"][name]
        p = params.get(name)
        rows.append({
            "component": name,
            "seed_params": sp, "params": p, "params_diff_pct": _diff(p, sp),
            "seed_fp16_bytes": s16, "fp16_bytes": r16, "fp16_diff_pct": _diff(r16, s16),
            "seed_fp32_bytes": s32, "fp32_bytes": r32, "fp32_diff_pct": _diff(r32, s32),
            "how": how[name], "seed_line": f"{SEED_001}:{line}" if line else "",
        })
    df = pd.DataFrame(rows)
    t16 = rec["fp16"]["total GPU memory"]
    f16 = rec["fp16"]["full FT: total"]
    df.attrs.update(status=STATUS, savings_pct=100 * (1 - t16 / f16), seed_savings_pct=SEED_SAVINGS_PCT[0],
                    seed_savings_line=f"{SEED_001}:{SEED_SAVINGS_PCT[1]}", seq=seq)
    return df


def _diff(ours, seed):
    if ours is None or seed is None:
        return None
    return 100.0 * (ours - seed) / seed


def vlm_markdown(df) -> str:
    """The table in markdown, with the status line first."""
    lines = [f"> {df.attrs['status']}", "",
             "| component | seed params | params | diff | seed FP16 | FP16 | diff | seed FP32 | FP32 | diff | how |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in df.to_dict("records"):
        lines.append("| " + " | ".join([
            r["component"], _count(r["seed_params"]), _count(r["params"]), _pct(r["params_diff_pct"]),
            _gb(r["seed_fp16_bytes"]), _gb(r["fp16_bytes"]), _pct(r["fp16_diff_pct"]),
            _gb(r["seed_fp32_bytes"]), _gb(r["fp32_bytes"]), _pct(r["fp32_diff_pct"]),
            r["how"] + (f" (seed line {r['seed_line'].rsplit(':', 1)[1]})" if r["seed_line"] else ""),
        ]) + " |")
    lines += ["", f"Memory saving of projector-only over full fine-tuning (FP16): {df.attrs['savings_pct']:.0f}% "
              f"recomputed vs {df.attrs['seed_savings_pct']:.0f}% claimed ({df.attrs['seed_savings_line']}). "
              "Bytes in decimal GB (10^9), the seed's unit."]
    return "\n".join(lines)


def _count(n) -> str:
    if n is None or n != n:
        return "-"
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gb(n) -> str:
    if n is None or n != n:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _pct(p) -> str:
    if p is None or p != p:
        return ""
    return f"{p:+.1f}%"
