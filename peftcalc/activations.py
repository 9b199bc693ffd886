"""Saved activations and the peaks of one training step's forward and backward, simulated op by op: the
entry point of the simulation (peftcalc.sim).

The forward pass of one block is written out as the sequence of torch ops that the transformers modeling
file runs (one file per family in peftcalc.families) and peft's layers add (peftcalc.methods: LoRA's
tuners/lora/layer.py Linear.forward, IA3's tuners/ia3/layer.py, ...), on the ops of peftcalc.ops. Each op
records the tensors autograd saves for backward under the rules of torch's
``tools/autograd/derivatives.yaml`` (an input is saved only when the gradient that needs it is required),
so a frozen Linear saves nothing, a LoRA layer saves its (cast) input, and nothing below the lowest
trainable parameter is saved at all. peftcalc.backward replays the recorded autograd nodes for each
block's backward, without checkpointing and with it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from peftcalc.checkpointing import checkpointed_layers
from peftcalc.plan import Plan
from peftcalc.settings import TrainingSettings
from peftcalc.sim.blip2 import blip2_profile
from peftcalc.sim.llava import llava_profile
from peftcalc.sim.model import model_profile
from peftcalc.sim.profile import ActivationProfile

__all__ = ["ActivationProfile", "activation_profile"]


@lru_cache(maxsize=4096)
def activation_profile(plan: Plan, t: TrainingSettings) -> ActivationProfile:
    """Simulate one forward pass and return what stays saved for backward, and the peaks of the step's
    forward and backward (ActivationProfile): LLaVA and BLIP-2 run their towers before the language model
    (sim.llava, sim.blip2); every other model is one stack of blocks (sim.model)."""
    spec = plan.spec
    if spec.is_vlm:
        profile = llava_profile(plan, t)
    elif spec.is_blip2:
        profile = blip2_profile(plan, t)
    else:
        profile = model_profile(plan, t, checkpointed_layers(spec, t))
    return trainer_loop_profile(profile) if t.trainer_loop else profile


def trainer_loop_profile(profile: ActivationProfile) -> ActivationProfile:
    """The profile under transformers Trainer.training_step: ``self.accelerator.backward(loss)`` runs
    ``loss = loss / self.gradient_accumulation_steps`` (accelerate/accelerator.py Accelerator.backward; even
    for 1 step) while training_step still holds its own loss, so one more scalar of the loss dtype (half of
    the loss and its ones_like gradient) is alive through backward. Traced in a real Trainer run by
    tests/peftcalc/integrations/test_memory_callback.py."""
    return replace(profile, loss_scalars=profile.loss_scalars + profile.loss_scalars // 2)
