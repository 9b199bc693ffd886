"""Proof against real processes (issue 15): rank 0 of a 2-4 rank job on CPU with gloo and real tensors, traced
the way measure.dist traces the fake process group, to compare with `peftcalc measure ... --device fake`.

    PYTHONPATH=. torchrun --nproc_per_node 2 tools/torchrun_dist.py fsdp   # or ddp, zero2, zero3
    PYTHONPATH=. python -m peftcalc.cli measure tiny.json -m full --precision fp32 --optimizer adamw \
        -b 2 -s 32 --gpus 2 --sharding fsdp --device fake --steps 2

prints rank 0's steady-state peak, its phase and step 1's peak as one JSON line (tiny-llama of
measure/matrices/dist.toml, full fine-tuning, fp32, AdamW, batch 2 x 32, two steps). zero2 / zero3: DeepSpeed's
engine (measure.zero: its defaults, the client torch AdamW) on the gloo group with DS_ACCELERATOR=cpu.

FSDP2's other settings follow as key=value (TrainingSettings' names, and method=lora): ``fsdp optimizer=adamw-fused``,
``fsdp precision=mixed-bf16`` (MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): gloo all-gathers
bf16 and reduce-scatters fp32 on the CPU), ``hsdp gpus_per_node=2`` on 4 ranks (a (2, 2) replicate x shard mesh).

Rank 0 on gloo (torch 2.13 CPU) against the fake-group trace of the same row (measure.dist), steady-state peak and
step 1's peak in bytes:

    fsdp (2 ranks)                              gloo 2,353,700 / 1,763,284   fake 2,353,692 / 1,762,504
    fsdp optimizer=adamw-fused (2)              gloo 2,353,700 / 1,762,512   fake 2,353,692 / 1,762,504
    fsdp precision=mixed-bf16 (2)               gloo 1,859,748 / 1,314,076   fake 1,859,740 / 1,314,068
    fsdp precision=mixed-bf16 method=lora (2)   gloo 1,186,416 / 1,170,000   fake 1,186,408 / 1,169,992
    hsdp gpus_per_node=2 (4)                    gloo 2,353,708 / 1,762,520   fake 2,353,692 / 1,762,504

The real ranks hold 8 bytes more per process group they communicate over (one FSDP2 group; HSDP's shard and
replicate groups: 16), and step 1 of single-tensor AdamW 780 more (not traced to its source); the fake traces
equal peftcalc's prediction to the byte.
"""
import contextlib, os, sys, json, tomllib, torch, torch.distributed as dist
sharding = sys.argv[1]
extra = dict(arg.split("=", 1) for arg in sys.argv[2:])
method = extra.pop("method", "full")
extra = {k: int(v) if v.isdigit() else v for k, v in extra.items()}
os.environ.setdefault("DS_ACCELERATOR", "cpu")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from measure.build import build_model
from measure.dist import DistTracer, own_propagation_mode, shard_fsdp2
from measure.loop import TracerMeter, run_steps
from measure.setup import precision_policy, prepare_for_training, make_batch, make_optimizer
from measure.tracer import StorageTracer, model_state_tensors
from peftcalc.config import load_spec
from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings
models = tomllib.load(open("measure/matrices/dist.toml", "rb"))["models"]
spec = load_spec(dict(models["tiny-llama"]))
t = TrainingSettings(**{"batch_size": 2, "seq_len": 32, "precision": "fp32", "optimizer": "adamw", "device": "cpu",
                        "gpus": world, "sharding": sharding, **extra})
policy = precision_policy(t, "cpu")
torch.manual_seed(0)
model = build_model(spec, MethodSettings(method=method), dtype=policy.dtype, device="cpu")
prepare_for_training(model, spec, t)
from measure.zero import ZeroTracer, deepspeed_config, zero_train_step
fsdp2 = sharding in ("fsdp", "hsdp")
tracer = DistTracer() if fsdp2 else ZeroTracer() if sharding.startswith("zero") else StorageTracer()
meter = TracerMeter(tracer)
# DTensor's global-shape fake arguments hidden, as on the fake group
with own_propagation_mode() if fsdp2 else contextlib.nullcontext(), tracer:
    tracer.mark(model_state_tensors(model), "parameters")
    if fsdp2:
        shard_fsdp2(model, t)  # measure.dist.device_mesh on the default (gloo) group
        tracer.mark(model_state_tensors(model), "parameters")
        runner = model
    elif sharding.startswith("zero"):
        import deepspeed
        opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad])
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(t))
        batch = make_batch(spec, t, "cpu", torch.float32)
        meter.register(model, batch)
        rows = [{"step": i + 1, **zero_train_step(engine, spec, batch, meter)} for i in range(2)]
    else:
        runner = torch.nn.parallel.DistributedDataParallel(model)
    if not sharding.startswith("zero"):
        batch = make_batch(spec, t, "cpu", policy.dtype if policy.autocast is None else torch.float32)
        meter.register(model, batch)
        opt = make_optimizer(t.optimizer, [p for p in model.parameters() if p.requires_grad])
        rows = run_steps(runner, spec, batch, opt, policy, "cpu", meter, 2)
if rank == 0:
    print(json.dumps({"sharding": sharding, "world": world, **extra, "method": method, "peak": rows[-1]["peak_bytes"], "phase": rows[-1]["peak_phase"], "step1": rows[0]["peak_bytes"]}))
dist.destroy_process_group()
