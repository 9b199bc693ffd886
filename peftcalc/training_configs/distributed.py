"""DeepSpeed and FSDP keys (every tool passes them to the transformers Trainer): the sharding, FSDP2's
reshard_after_forward and the offload, as the multi-GPU issue's TrainingSettings fields name them (sharding
none|ddp|fsdp|hsdp|zero1|zero2|zero3, reshard_after_forward, offload none|optimizer|params). The number of
GPUs is the launcher's (torchrun, accelerate, deepspeed), not the config's: give --gpus.

DeepSpeed's JSON (deepspeed.ai/docs/config-json): zero_optimization.stage 0-3 (0: plain data parallelism),
offload_optimizer.device / offload_param.device "cpu" or "nvme"; bf16.enabled keeps fp32 master weights
(DeepSpeed's BF16_Optimizer: peftcalc's mixed-bf16). transformers TrainingArguments ``fsdp``
(training_args.py FSDPOption: full_shard, shard_grad_op, hybrid_shard, offload, auto_wrap) and
``fsdp_config`` (reshard_after_forward, offload_params / cpu_offload); axolotl's fsdp_config
(utils/schemas/fsdp.py: reshard_after_forward, offload_params).
"""

from __future__ import annotations

import json
from pathlib import Path

from peftcalc.errors import InputError
from peftcalc.training_configs.common import Derived

__all__ = ["read_deepspeed", "read_fsdp"]

ZERO_STAGES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}
OFFLOAD_DEVICES = ("cpu", "nvme")


def _deepspeed_config(value, d: Derived, key: str) -> dict | None:
    """The DeepSpeed config a key gives: a mapping, or a JSON file (relative to the working directory, else to
    the config file's folder); None (and a note) for a file that is not there."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise InputError(f"{d.path}: key '{key}' must be a DeepSpeed config file or mapping, got {value!r}")
    for path in (Path(value), Path(d.path).parent / value):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{d.path}: key '{key}': cannot read DeepSpeed config {path}: {exc}") from None
            if not isinstance(data, dict):
                raise InputError(f"{d.path}: key '{key}': DeepSpeed config {path} is not a JSON object")
            return data
    d.warn(f"{key}={value} (DeepSpeed config file not found here: its ZeRO stage is not read)")
    return None


def read_deepspeed(value, d: Derived, key: str = "deepspeed") -> None:
    """ZeRO stage -> sharding, offload_param / offload_optimizer -> offload."""
    cfg = _deepspeed_config(value, d, key)
    if cfg is None:
        return
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise InputError(f"{d.path}: key '{key}': zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    d.want("sharding", ZERO_STAGES[stage], key, f"DeepSpeed ZeRO stage {stage}")
    if (zero.get("offload_param") or {}).get("device") in OFFLOAD_DEVICES:
        d.want("offload", "params", key, "ZeRO-Offload of the parameters")
    elif (zero.get("offload_optimizer") or {}).get("device") in OFFLOAD_DEVICES:
        d.want("offload", "optimizer", key, "ZeRO-Offload of the optimizer")
    d.notes.append(f"{key}: ZeRO stage {stage}; the GPU count is the launcher's (give --gpus)")


def fsdp_options(fsdp_config: dict) -> dict:
    """fsdp_config with the ``fsdp_`` prefix taken off its keys, as transformers TrainingArguments.__post_init__
    does (accelerate's config file and older axolotl files spell them fsdp_offload_params, ...)."""
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in (fsdp_config or {}).items()}


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def read_fsdp(fsdp, fsdp_config: dict, d: Derived, key: str = "fsdp", version=None, default_version: int = 2) -> None:
    """FSDP options -> sharding fsdp / hsdp (ddp for NO_SHARD), reshard_after_forward, offload params.

    The version: `version` (axolotl's top-level fsdp_version), else fsdp_config's version / fsdp_version, else
    `default_version` (transformers 5.x TrainingArguments._fsdp_plugin_args: 2; axolotl: None, FSDP1). FSDP1
    (flat parameters) is estimated as FSDP2's fully_shard and named in the warning line. FSDP2's
    reshard_after_forward is a bool; FSDP1's is a sharding strategy (full_shard, shard_grad_op, hybrid_shard,
    no_shard), as is the legacy ``fsdp`` word list (TrainingArguments._apply_legacy_fsdp_to_config); offload:
    the ``offload`` word or cpu_offload / offload_params (CPUOffloadPolicy: parameters, gradients and the
    optimizer step on the host)."""
    cfg = fsdp_options(fsdp_config)
    words = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
    if fsdp is True:
        words = ["full_shard"]
    words = [str(w).lower() for w in words]
    chosen = version if version is not None else cfg.get("version", default_version)
    try:
        version = int(chosen)
    except (TypeError, ValueError):
        raise InputError(f"{d.path}: key 'fsdp_version' must be 1 or 2, got {chosen!r}") from None
    if version not in (1, 2):
        raise InputError(f"{d.path}: key 'fsdp_version' must be 1 or 2, got {version}")
    reshard = cfg.get("reshard_after_forward")
    strategy = " ".join(words + [str(cfg.get("sharding_strategy", "")).lower()]
                        + ([str(reshard).lower()] if isinstance(reshard, str) else []))
    if "no_shard" in strategy:
        d.want("sharding", "ddp", key, "DDP")
        d.notes.append(f"{key}: NO_SHARD (data parallel, as DDP); the GPU count is the launcher's (give --gpus)")
        return
    hybrid = "hybrid" in strategy
    d.want("sharding", "hsdp" if hybrid else "fsdp", key, "FSDP sharding")
    if not isinstance(reshard, bool):
        reshard = "shard_grad_op" not in strategy if reshard is None or isinstance(reshard, str) else _truthy(reshard)
    d.want("reshard_after_forward", reshard, key, "FSDP2 reshard_after_forward" if not reshard else "")
    if "offload" in words or any(_truthy(cfg.get(k)) for k in ("offload_params", "cpu_offload")):
        d.want("offload", "params", key, "FSDP2 CPU offload")
    if version == 1:
        d.warn(f"{key}: FSDP1 (fsdp_version 1: flat parameters; estimated as FSDP2's fully_shard)")
    d.notes.append(f"{key}: {'HSDP' if hybrid else 'FSDP'}{version}; the GPU count is the launcher's (give --gpus)")
