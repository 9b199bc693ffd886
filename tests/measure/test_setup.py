"""measure.setup on a tiny model: the model built for a device and prepared for training (gradient
checkpointing included), its batch and its loss."""

import torch

from measure.setup import build_for_device, forward_loss, make_batch, precision_policy, prepare_for_training
from peftcalc.settings import TrainingSettings


def test_checkpointing_keeps_gradients_flowing_into_adapters_over_a_frozen_embedding(tiny):
    run = tiny("tiny-llama", method="lora")
    training = TrainingSettings(batch_size=2, seq_len=16, precision="fp32", grad_checkpointing=True, device="cpu")
    policy = precision_policy(training, "cpu")
    model = build_for_device(run.spec, run.method, training, "cpu", policy)
    prepare_for_training(model, run.spec, training)
    assert model.get_base_model().is_gradient_checkpointing
    forward_loss(model, run.spec, make_batch(run.spec, training, "cpu", torch.float32)).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's is not
    assert all(p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)
