"""MemoryCallback in real transformers.Trainer and TRL SFTTrainer runs on CPU with a tiny Llama (the ci
matrix's tiny-llama): the estimate it makes from the Trainer's own model and arguments equals the run's
recorded peak (the harness's tracer) to the byte, component by component; its row is one `peftcalc report`
reads and recomputes; an out-of-memory error still reports. SFTTrainer runs TRL's fused LM head on its
collator's batch: loss "trl" (peftcalc.sim.trl_head), also to the byte."""

import json
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from peftcalc.integrations.transformers import MemoryCallback  # noqa: E402

# measure/matrices/ci.toml [models.tiny-llama]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512)
B, S = 2, 64


def tiny_model(lora: bool):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, task_type="CAUSAL_LM"))
    return model


def batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, TINY["vocab_size"], (S,), generator=g).tolist()} for _ in range(n)]


def collate(rows, attention_mask=False):
    """The harness's batch (measure.setup.make_batch): labels are the input ids (one tensor)."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    batch = {"input_ids": ids, "labels": ids}
    if attention_mask:
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


ARGS = dict(per_device_train_batch_size=B, max_steps=3, use_cpu=True, optim="adamw_torch", report_to="none",
            logging_steps=100, save_strategy="no", dataloader_num_workers=0)


def run_trainer(tmp_path, lora, lines):
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **ARGS)
    cb = MemoryCallback(out=str(tmp_path / "rows.jsonl"), echo=lines.append)
    transformers.Trainer(model=tiny_model(lora), args=args, train_dataset=batches(), data_collator=collate,
                         callbacks=[cb]).train()
    return cb


@pytest.fixture(scope="module", params=[True, False], ids=["lora", "full"])
def trainer_run(request, tmp_path_factory):
    """One Trainer run per method: (callback, what it printed, the folder of its row)."""
    tmp_path = tmp_path_factory.mktemp("run")
    lines = []
    return run_trainer(tmp_path, request.param, lines), lines, tmp_path


def test_trainer_peak_equals_prediction(trainer_run):
    cb, lines, tmp_path = trainer_run
    lora = cb.estimate.method.method == "lora"
    e = cb.estimate
    assert e.training.trainer_loop and e.method.rank == 8 if lora else e.method.method == "full"
    assert (e.training.batch_size, e.training.seq_len, e.training.precision, e.training.device) == (B, S, "fp32", "cpu")
    assert e.params.trainable == sum(p.numel() for p in cb._model.parameters() if p.requires_grad)
    last, first = cb.steps[-1], cb.steps[0]
    assert last["peak_bytes"] == e.memory.peak_bytes  # to the byte
    assert first["peak_bytes"] == e.memory.step1_peak_bytes
    assert last["peak_phase"] == e.memory.peak_phase.split(":")[0]
    parts = dict(e.memory.components)
    cats = last["categories_at_peak"]
    assert cats["parameters"] == parts["weights_frozen"] + parts["weights_trainable"] + parts.get("buffers", 0)
    assert cats["activations"] == parts["activations"] and cats["inputs"] == parts["inputs"]
    assert cats["optimizer_state"] == parts["optimizer_states"]
    text = "\n".join(lines)
    print(text)  # the comparison the callback prints (the closing note)
    assert "predicted vs measured" in text and "+0.00%" in text
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[-1])
    assert row["measured"]["peak_bytes"] == row["predicted"]["peak_bytes"] == e.memory.peak_bytes
    assert row["settings"]["training"]["trainer_loop"] is True


def test_report_reads_the_row(trainer_run):
    """The row is harness-format: reports.rows recomputes its prediction (the model's config is inline) and
    finds no error."""
    pytest.importorskip("pandas")
    from reports.rows import load_rows

    tmp_path = trainer_run[2]
    df = load_rows([str(tmp_path / "rows.jsonl")])
    assert len(df) == 1
    r = df.iloc[0]
    assert r["predicted_from"] == "current" and r["error"] == 0 and r["measured_peak_bytes"] > 0


def test_out_of_memory_reports(tmp_path):
    """An out-of-memory error inside a step: the uncaught-exception hook prints the comparison and writes the
    row with outcome oom (the steps measured before it)."""
    lines = []
    model = tiny_model(True)
    calls = {"n": 0}

    def fail_third(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cb = MemoryCallback(out=str(tmp_path / "rows.jsonl"), echo=lines.append)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **ARGS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=batches(), data_collator=collate,
                                   callbacks=[cb])
    model.register_forward_pre_hook(fail_third, with_kwargs=True)
    previous = sys.excepthook
    try:
        with pytest.raises(torch.OutOfMemoryError) as info:
            trainer.train()
        sys.excepthook(info.type, info.value, None)
    except TypeError:  # the default hook cannot print a None traceback; ours ran first
        pass
    finally:
        sys.excepthook = previous
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[-1])
    assert row["outcome"] == "oom" and "out of memory" in row["error"]
    assert len(row["measured"]["steps"]) == 2 and row["measured"]["peak_bytes"] == cb.estimate.memory.peak_bytes


def run_sft(tmp_path, lines, model, peft_config=None, **config):
    """A TRL SFTTrainer run with its own collator (trl/trainer/sft_trainer.py DataCollatorForLanguageModeling:
    input_ids, labels, attention_mask) on pre-tokenized rows of S tokens; returns the callback."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                               pad_token="t1", eos_token="t2")
    cb = MemoryCallback(out=str(tmp_path / "rows.jsonl"), echo=lines.append)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_length=S, bf16=False, **{**ARGS, **config})
    trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(batches()), processing_class=tok,
                   peft_config=peft_config, callbacks=[cb]).train()
    return cb


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_trainer(tmp_path, lora):
    """TRL's SFTTrainer: the estimate from its model and SFTConfig (max_length is the sequence length, loss "trl":
    its fused LM head, trl/kernels/chunked_logprob.py, and its collator's three int64 tensors) equals the run's
    recorded peak to the byte, step 1 too, component by component."""
    from peft import LoraConfig

    lines = []
    peft_config = LoraConfig(r=8, task_type="CAUSAL_LM") if lora else None
    cb = run_sft(tmp_path, lines, tiny_model(False), peft_config, gradient_checkpointing=False)
    e = cb.estimate
    assert (e.method.method, e.training.seq_len, e.training.precision) == ("lora" if lora else "full", S, "fp32")
    assert e.training.loss == "trl" and e.training.trainer_loop
    text = "\n".join(lines)
    print(text)  # the comparison the callback prints (the closing note)
    assert "not modelled" not in text and "+0.00%" in text
    last, first = cb.steps[-1], cb.steps[0]
    assert last["peak_bytes"] == e.memory.peak_bytes  # to the byte
    assert first["peak_bytes"] == e.memory.step1_peak_bytes
    parts, cats = dict(e.memory.components), last["categories_at_peak"]
    assert cats["parameters"] == parts["weights_frozen"] + parts["weights_trainable"] + parts.get("buffers", 0)
    assert cats["gradients"] == parts["gradients"] and cats["optimizer_state"] == parts["optimizer_states"]
    assert cats["activations"] == parts["activations"]
    assert cats["inputs"] == parts["inputs"] == 3 * B * S * 8  # input_ids, labels, attention_mask
    assert cats["other"] == parts["logits_loss"] + parts["temporaries"]


@pytest.mark.gpu
def test_trainer_on_cuda(tmp_path):
    """On a GPU the callback reads torch.cuda.max_memory_allocated / max_memory_reserved of the model's device,
    reset per phase: the row's source is the allocator, reserved >= allocated, and the measured peak holds at
    least the weights and optimizer state the estimate counts (the allocator rounds blocks up to 512 bytes and
    adds cuBLAS workspaces, so no byte equality here)."""
    model = tiny_model(True).to("cuda")
    lines = []
    cb = MemoryCallback(out=str(tmp_path / "rows.jsonl"), echo=lines.append)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **{**ARGS, "use_cpu": False})
    transformers.Trainer(model=model, args=args, train_dataset=batches(), data_collator=collate,
                         callbacks=[cb]).train()
    e = cb.estimate
    assert e.training.device == "cuda" and len(cb.steps) == ARGS["max_steps"]
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[-1])
    m = row["measured"]
    assert m["source"] == "cuda_allocator" and m["reserved_peak_bytes"] >= m["peak_bytes"]
    parts = dict(e.memory.components)
    assert m["peak_bytes"] >= parts["weights_frozen"] + parts["weights_trainable"] + parts["optimizer_states"]
    assert abs(m["peak_bytes"] - e.memory.peak_bytes) <= 0.25 * e.memory.peak_bytes
    print("\n".join(lines))


def test_trainer_keeps_embeddings_at_32_bits_under_an_8bit_optimizer(tmp_path):
    """optim adamw_bnb_8bit: transformers Trainer.create_optimizer registers ``{"optim_bits": 32}`` for every
    nn.Embedding's weight (bitsandbytes GlobalOptimManager.register_module_override), so full fine-tuning's
    token embedding (512 x 64 = 32,768 elements) gets fp32 state1 and state2, 2 x 32,768 x 4 = 262,144 B, where
    bitsandbytes alone makes uint8 states and one fp32 absmax per 256 values, 2 x (32,768 + 4 x 128) = 66,560 B
    (peftcalc.model_states.trainer_embeddings_at_32_bits): 195,584 B more than the harness's own loop has. The
    run's optimizer state and peak equal the estimate's to the byte."""
    pytest.importorskip("bitsandbytes")
    from peftcalc.api import estimate

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **dict(ARGS, optim="adamw_bnb_8bit"))
    cb = MemoryCallback(out=str(tmp_path / "rows.jsonl"), echo=lambda line: None)
    model = tiny_model(False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=batches(), data_collator=collate,
                                   callbacks=[cb])
    trainer.train()
    e = cb.estimate
    assert e.training.trainer_loop and e.training.optimizer == "adamw-8bit"
    state = trainer.optimizer.state[model.model.embed_tokens.weight]
    assert (state["state1"].dtype, state["state1"].nbytes + state["state2"].nbytes) == (torch.float32, 262_144)
    last = cb.steps[-1]
    parts = dict(e.memory.components)
    assert last["categories_at_peak"]["optimizer_state"] == parts["optimizer_states"]
    assert last["peak_bytes"] == e.memory.peak_bytes
    own_loop = estimate(model=cb.spec, method="full", batch_size=B, seq_len=S, precision="fp32", device="cpu",
                        optimizer="adamw-8bit")
    assert parts["optimizer_states"] - dict(own_loop.memory.components)["optimizer_states"] == 262_144 - 66_560
