"""The one reader of input files (sim/ingest/files.py): every malformed or hostile file is one ScenarioError line
naming the key path and the file, never a traceback, a hang or an unbounded read (issue #19, item 1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.errors import ScenarioError
from sim.ingest.files import MAX_INPUT_BYTES, MAX_NESTING_DEPTH, MAX_VALUES, load_yaml_mapping

ROOT = Path(__file__).resolve().parents[1]


def refusal(path: Path) -> str:
    with pytest.raises(ScenarioError) as info:
        load_yaml_mapping(path, "scenario")
    message = str(info.value)
    assert "\n" not in message and message.startswith("scenario: ")
    return message


def test_a_plain_mapping_reads(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("model: qwen-7b\ntraining:\n  seq_len: 512\n")
    assert load_yaml_mapping(tmp_path / "a.yaml", "scenario") == {"model": "qwen-7b", "training": {"seq_len": 512}}


def test_a_device_a_pipe_and_a_directory_are_not_read(tmp_path: Path) -> None:
    assert "is not a regular file" in refusal(Path("/dev/zero"))  # would read forever
    os.mkfifo(tmp_path / "pipe.yaml")
    assert "is not a regular file" in refusal(tmp_path / "pipe.yaml")  # would block on open
    assert "is not a regular file" in refusal(tmp_path)


def test_a_file_over_the_cap_is_refused_with_its_size(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:  # sparse: the cap is checked before reading
        handle.truncate(MAX_INPUT_BYTES + 1)
    assert f"is {MAX_INPUT_BYTES + 1:,} bytes, more than the {MAX_INPUT_BYTES:,}" in refusal(big)


def test_bytes_that_are_not_utf8_name_their_offset(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("model: qwen\ncomment: caf\xe9\n".encode("latin-1"))
    # "model: qwen\n" is 12 bytes, "comment: caf" 12 more: the é (0xe9) is byte 24
    assert refusal(tmp_path / "latin1.yaml").endswith("is not UTF-8 text: byte 24 is 0xe9")


def test_a_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"train_batch_size": "auto"}).encode())
    assert load_yaml_mapping(tmp_path / "ds.json", "deepspeed") == {"train_batch_size": "auto"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"a": ' * 5000 + "1" + "}" * 5000)  # JSON is YAML too: both parsers meet it
    assert f"nests deeper than {MAX_NESTING_DEPTH} levels" in refusal(path)


def test_nesting_at_the_cap_reads(tmp_path: Path) -> None:
    # 63 mappings around a scalar: 64 YAML nodes on the deepest path (the cap counts the scalar leaf too), 63 JSON
    # containers; both read
    depth = MAX_NESTING_DEPTH - 1
    (tmp_path / "ok.json").write_text('{"a": ' * depth + "1" + "}" * depth)
    (tmp_path / "ok.yaml").write_text('{"a": ' * depth + "1" + "}" * depth)
    assert load_yaml_mapping(tmp_path / "ok.json", "scenario")
    assert load_yaml_mapping(tmp_path / "ok.yaml", "scenario")


def test_a_yaml_key_written_twice_names_both_lines(tmp_path: Path) -> None:
    (tmp_path / "twice.yaml").write_text("model: qwen-7b\ntraining:\n  seq_len: 512\nmodel: qwen-14b\n")
    assert refusal(tmp_path / "twice.yaml").endswith(
        "has the key 'model' twice in one mapping (lines 1 and 4); keep one")


def test_the_same_key_in_two_mappings_is_fine_and_merges_may_override(tmp_path: Path) -> None:
    text = "a: {seq_len: 1}\nb: {seq_len: 2}\nbase: &base {r: 8, lora_alpha: 16}\nlora:\n  <<: *base\n  r: 16\n"
    (tmp_path / "ok.yaml").write_text(text)
    assert load_yaml_mapping(tmp_path / "ok.yaml", "scenario")["lora"] == {"r": 16, "lora_alpha": 16}


def test_a_json_key_written_twice_names_both_lines(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 3},\n'
                                      '  "train_batch_size": 16\n}\n')
    assert refusal(tmp_path / "ds.json").endswith(
        "has the key 'train_batch_size' twice in one object (lines 2 and 4); keep one")


def test_json_infinity_is_not_a_number(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text('{"gradient_clipping": Infinity}')
    assert refusal(tmp_path / "ds.json").endswith("holds Infinity, which is not a JSON number")


def test_billion_laughs_is_refused_before_anything_walks_it(tmp_path: Path) -> None:
    # each level lists the previous one 9 times: 9**9 = 387,420,489 values once expanded, 10 lines on disk
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    assert f"more than {MAX_VALUES:,} values once its YAML aliases are expanded" in refusal(tmp_path / "laughs.yaml")


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").write_text("a: &loop [1, *loop]\n")
    assert "YAML aliases are expanded" in refusal(tmp_path / "loop.yaml")


def test_a_long_path_is_cut_in_the_message(tmp_path: Path) -> None:
    message = refusal(tmp_path / ("x" * 5000 + ".yaml"))
    assert len(message) < 400 and "characters)" in message


def test_the_command_line_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text("model: qwen-7b\nhardware: {device: a100-sxm4-80gb}\nmodel: qwen-14b\n")
    out = subprocess.run([sys.executable, "-m", "sim", "run", str(scenario)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "twice in one mapping (lines 1 and 3)" in out.stderr
