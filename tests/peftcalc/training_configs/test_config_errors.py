"""Bad config files: missing, unreadable, not YAML/JSON, of no recognised tool, values of the wrong type, keys
that contradict each other, a peft_type peftcalc does not model: one line, exit code 2, naming the key."""

import sys

import pytest

from peftcalc.errors import InputError
from peftcalc.training_configs import from_files

BAD = {
    "missing": (None, "cannot read config file"),
    "folder": (None, "cannot read config file"),
    "not_yaml.yaml": ("base_model: [1, 2\nmicro_batch_size: 1\n", "not YAML"),
    "not_json.json": ('{"per_device_train_batch_size": 4,}', "not JSON"),
    "list.yaml": ("- 1\n- 2\n", "expected a mapping"),
    "binary.yaml": (b"\xff\xfe\x00\x01", "not UTF-8"),
    "unknown.yaml": ("foo: 1\nbar: 2\n", "no recognised tool's keys"),
    "wrong_type.yaml": ("base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: two\n", "'micro_batch_size'"),
    "wrong_type_bool.yaml": ("model_name_or_path: meta-llama/Llama-3.2-1B\nuse_peft: 3\n", "'use_peft'"),
    "lora_4bit.yaml": ("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nload_in_4bit: true\n", "'load_in_4bit'"),
    "qlora_no_4bit.yaml": ("base_model: meta-llama/Llama-3.2-1B\nadapter: qlora\n", "'adapter: qlora'"),
    "bf16_fp16.yaml": ("model_name_or_path: meta-llama/Llama-3.2-1B\nbf16: true\nfp16: true\n", "'bf16' and 'fp16'"),
    "bf16_fp16_axolotl.yaml": ("base_model: meta-llama/Llama-3.2-1B\nbf16: true\nfp16: true\n", "'bf16' and 'fp16'"),
    "adapter_type.yaml": ("base_model: meta-llama/Llama-3.2-1B\nadapter: llama-adapter\n", "'adapter'"),
    "unknown_model.yaml": ("base_model: someone/NotAModel-7B\n", "key 'base_model'"),
    "no_model.json": ('{"per_device_train_batch_size": 4}', "names no model"),
    "lf_type.yaml": ("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: lorax\n", "'finetuning_type'"),
    "peft.json": ('{"peft_type": "LORA", "r": 8}', "--adapter-config"),
}


@pytest.fixture
def bad_files(tmp_path):
    paths = {}
    for name, (content, _) in BAD.items():
        path = tmp_path / name
        if name == "folder":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        paths[name] = path
    return paths


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_one_input_error(bad_files, name):
    with pytest.raises(InputError) as info:
        from_files(bad_files[name])
    message = str(info.value)
    assert "\n" not in message and BAD[name][1] in message, message


@pytest.mark.parametrize("text,message", [
    ('{"peft_type": "LOHA", "r": 8}', "peft_type LOHA"),
    ('{"peft_type": "ADALORA", "target_r": 8}', "peft_type ADALORA"),
    ('{"r": 8}', "no key 'peft_type'"),
    ('{"peft_type": "LORA", "r": "eight"}', "'r'"),
])
def test_bad_adapter_config(tmp_path, text, message):
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        from_files(None, path, given={"model": "llama-3.2-1b"})
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["missing", "lora_4bit.yaml", "bf16_fp16.yaml", "unknown.yaml", "not_yaml.yaml"])
def test_cli_bad_config_exit_2(bad_files, capsys, name):
    from peftcalc.cli import main

    argv = sys.argv
    sys.argv = ["peftcalc", "estimate", "--config", str(bad_files[name])]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD[name][1] in lines[0], err


def test_cli_adapter_config_unsupported_type(tmp_path, capsys):
    from peftcalc.cli import main

    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "VERA", "r": 256}')
    argv = sys.argv
    sys.argv = ["peftcalc", "estimate", "llama-3.2-1b", "--adapter-config", str(path)]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "peft_type VERA" in err
