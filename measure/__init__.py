"""The measurement harness: real training steps (torch, transformers, peft) whose memory is recorded
beside the calculator's prediction. The package exports nothing itself; import from its modules.

Modules, each importing only those listed before it (no cycles, function-level imports included):

    tracer    live-storage tracing (StorageTracer) and the tensors of each category
    adapters  bottleneck adapters (Houlsby, Pfeiffer, the block adapter)
    generic   specs and method masks of families peftcalc does not model (the traced route)
    build     the real model a spec and a method describe (transformers + peft)
    fake      the same model made of fake tensors
    setup     a run's settings check, precision policy, model on its device, optimizer, batch, loss
    loop      the training steps, metered phase by phase (TracerMeter, CudaMeter)
    record    a row's settings, key, prediction, environment, JSON line and text
    run       measure_one: one run from settings to row
    matrix    TOML matrices expanded into runs; run_matrix appends a row per run
    traced    traced_estimate: estimate()'s figures from a trace on fake tensors (peftcalc estimate --trace)
"""

import logging

__all__: list[str] = []

# bitsandbytes logs one warning when it is imported on a CPU with AVX512-BF16 and without the optional
# `kernels` package ("Failed to load CPU gemm_4bit_forward from kernels-community: ..."); the harness
# never runs that 4-bit CPU kernel, so that one message is dropped. Every other record of that logger
# (and of bitsandbytes) still shows.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_CPU_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_CPU_NOTICE)


if _not_the_cpu_kernel_notice not in logging.getLogger(_BNB_CPU_LOGGER).filters:
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_not_the_cpu_kernel_notice)
