"""measure.record: the settings a row records and the key they give."""

from measure.matrix import load_matrix
from measure.record import row_key, settings_record
from peftcalc.methods import MethodSettings
from peftcalc.settings import TrainingSettings
from peftcalc.config import load_spec


def test_settings_record_resolves_the_default_adapter_kind():
    """MethodSettings.adapter_kind defaults to None; rows record the kind it means, so the keys of rows
    written when the default was "houlsby" stay what they were (a committed tiny-llama row's key), and a
    VLM's --method adapter records the block adapter."""
    config = {**load_matrix("ci")["models"]["tiny-llama"], "_name_or_path": "tiny-llama"}
    t = TrainingSettings(batch_size=2, seq_len=32, precision="fp32", optimizer="adamw", device="cpu")  # as that row
    record = settings_record(load_spec(config), MethodSettings("full"), t, "cpu", 2)
    assert record["method"]["adapter_kind"] == "houlsby"
    assert row_key(record) == "d89527078fe0cf18"  # the first row of reports/data/ci.jsonl
    vlm = settings_record(load_spec("llava-1.5-7b"), MethodSettings("adapter"), t, "fake", 2)
    assert vlm["method"]["adapter_kind"] == "block"
