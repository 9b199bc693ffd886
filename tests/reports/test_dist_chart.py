"""reports.dist_chart: per-GPU memory vs GPUs per strategy, against traced peaks of rank 0 (reports/data/dist.jsonl)
and DDP's bucket bytes by hand."""

from reports.dist_chart import dist_chart

# measure/matrices/dist.toml's tiny-llama: 147,776 parameters
TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}


def test_dist_chart_points_and_files(tmp_path):
    r = dist_chart(dict(TINY), tmp_path / "dist", method="full", gpu_counts=(1, 3, 8), strategies=("ddp", "fsdp", "zero9"),
                   precision="fp32", optimizer="adamw", batch_size=2, seq_len=32, device="cpu")
    df = r["table"].set_index(["strategy", "gpus"])
    # FSDP2 rank 0, traced on the fake process group: 2,069,980 bytes at 3 ranks, 1,688,700 at 8
    assert df.loc[("fsdp", 3), "peak_bytes"] == 2069980 and df.loc[("fsdp", 8), "peak_bytes"] == 1688700
    # DDP: the one-GPU step plus one fp32 bucket slot per trainable parameter, whatever N
    assert df.loc[("ddp", 3), "peak_bytes"] - df.loc[("ddp", 1), "peak_bytes"] == 147_776 * 4
    assert df.loc[("ddp", 8), "peak_bytes"] == df.loc[("ddp", 3), "peak_bytes"]
    assert "zero9" in r["skipped"] and sorted(p.rsplit(".", 1)[1] for p in r["files"]) == ["png", "svg"]
