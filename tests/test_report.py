import json
import pytest
from nanochat_lib.fetch import atomic_write_json
from nanochat_lib.report import fmt_value, load_stages, record_stage, render_report, write_report


def test_record_and_render_sections_in_pipeline_order(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "c.png").write_bytes(b"png")
    record_stage(tmp_path, "sft", "SFT", {"val_loss": 1.5}, summary={"MMLU": 0.31, "ChatCORE": 0.02}, column="SFT")
    record_stage(tmp_path, "tokenizer", "Tokenizer", {"vocab_size": 65536, "train_time_s": 12.345},
                 markdown="| a | b |\n|---|---|\n| 1 | 2 |", plots=[tmp_path / "plots" / "c.png"])
    record_stage(tmp_path, "base", "Base", {"val_bpb": 0.9}, summary={"CORE (offline, 3 tasks)": 0.1}, column="BASE")
    assert [s["stage"] for s in load_stages(tmp_path)] == ["tokenizer", "base", "sft"]
    text = render_report(tmp_path)
    assert text.index("## Tokenizer") < text.index("## Base") < text.index("## SFT")
    assert "- vocab_size: 65,536" in text and "- train_time_s: 12.3450" in text
    assert "| 1 | 2 |" in text and "![c](plots/c.png)" in text
    assert "| CORE (offline, 3 tasks) | 0.1000 | - | - | - |" in text
    assert "| MMLU | - | - | 0.3100 | - |" in text and "| ChatCORE | - | - | 0.0200 | - |" in text
    assert "| GSM8K | - | - | - | - |" in text


def test_report_uses_run_state_for_wall_clock(tmp_path):
    atomic_write_json(tmp_path / "run.json", {"profile": "tiny", "overrides": {}, "started": "t",
                      "notebooks": {"00_core": {"status": "completed", "elapsed_s": 30},
                                    "01_tokenizer": {"status": "completed", "elapsed_s": 3630}}})
    text = write_report(tmp_path).read_text()
    assert "- profile: tiny" in text and "Total wall clock time: 1h01m" in text
    assert "| 01_tokenizer | completed | 1h00m |" in text


def test_record_stage_checks_inputs(tmp_path):
    with pytest.raises(ValueError, match="column="):
        record_stage(tmp_path, "x", "X", {}, summary={"MMLU": 0.2})
    with pytest.raises(FileNotFoundError, match="save it before"):
        record_stage(tmp_path, "x", "X", {}, plots=["plots/missing.png"])
    assert not (tmp_path / "metrics" / "x.json").exists()


def test_fmt_value():
    assert fmt_value(9999) == "9999" and fmt_value(10000) == "10,000" and fmt_value(0.5) == "0.5000"
    assert fmt_value(False) == "False" and fmt_value("abc") == "abc"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    atomic_write_json(tmp_path / "a.json", {"x": [3]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_fingerprints_are_recorded_replaced_and_listed(tmp_path):
    import hashlib
    from nanochat_lib.report import load_fingerprints, record_fingerprint
    a, b = (hashlib.sha256(x).hexdigest() for x in (b"a", b"b"))
    record_fingerprint(tmp_path, "chat/mid/val", a, "token ids of the mid val mixture")
    record_fingerprint(tmp_path, "corpus", b.upper(), "the parquet shards")
    record_fingerprint(tmp_path, "chat/mid/val", b, "recorded again")                 # the latest wins
    prints = load_fingerprints(tmp_path)
    assert list(prints) == ["chat/mid/val", "corpus"] and prints["chat/mid/val"]["sha256"] == b
    assert prints["corpus"]["sha256"] == b                                              # stored lowercase
    record_stage(tmp_path, "base", "Base", {"val_bpb": 0.9})
    assert [s["stage"] for s in load_stages(tmp_path)] == ["base"]                      # not taken for a stage
    text = render_report(tmp_path)
    assert text.index("## Data fingerprints") < text.index("## Summary")
    assert f"| chat/mid/val | `{b[:16]}` | recorded again |" in text and f"| corpus | `{b[:16]}` | the parquet shards |" in text
    assert "## Data fingerprints" not in render_report(tmp_path / "empty")
    for bad in ("abc", "g" * 64, a[:-1]):
        with pytest.raises(ValueError, match="64 hex digits"):
            record_fingerprint(tmp_path, "x", bad)


def test_summary_shows_intervals_beside_the_values(tmp_path):
    record_stage(tmp_path, "chat_eval_sft", "Chat evaluation: SFT model",
                 {"MMLU accuracy": 0.3, "MMLU 95% interval": "[0.18, 0.45]", "MMLU chance": 0.25, "ChatCORE": 0.01},
                 summary={"MMLU": 0.3, "ChatCORE": 0.01}, column="SFT")
    text = render_report(tmp_path)
    assert "| MMLU | - | - | 0.3000 [0.18, 0.45] | - |" in text
    assert "| ChatCORE | - | - | 0.0100 | - |" in text                     # no interval recorded: the bare value
    assert "In brackets: the 95% Wilson interval" in text and "- MMLU 95% interval: [0.18, 0.45]" in text
    # without intervals the note is left out
    record_stage(tmp_path, "chat_eval_sft", "Chat evaluation: SFT model", {"MMLU accuracy": 0.3},
                 summary={"MMLU": 0.3}, column="SFT")
    assert "In brackets" not in render_report(tmp_path)
