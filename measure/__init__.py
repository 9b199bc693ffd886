"""The measurement harness: real training steps (torch, transformers, peft) whose memory is recorded
beside the calculator's prediction. The package exports nothing itself; import from its modules.

Modules, each importing only those listed before it (no cycles, function-level imports included):

    tracer    live-storage tracing (StorageTracer) and the tensors of each category
    adapters  bottleneck adapters (Houlsby, Pfeiffer, the block adapter)
    build     the real model a spec and a method describe (transformers + peft)
    fake      the same model made of fake tensors
    setup     a run's settings check, precision policy, model on its device, optimizer, batch, loss
    loop      the training steps, metered phase by phase (TracerMeter, CudaMeter)
    record    a row's settings, key, prediction, environment, JSON line and text
    run       measure_one: one run from settings to row
    matrix    TOML matrices expanded into runs; run_matrix appends a row per run
"""

__all__: list[str] = []
