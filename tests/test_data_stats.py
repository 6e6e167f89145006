"""Dataset scans: ``action=validate`` checks the data, ``action=data`` reports its statistics
(``mimo_spec.data.stats``), on a real LLaVA JSONL with real PNG / WAV files, some of them bad."""

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest

from mimo_spec.errors import DataError

PIL = pytest.importorskip("PIL.Image")

MODEL = ["modality=[vision_clip,audio_whisper]"]
BATCH = 3
SEQ = 160


def _turns(user, answer):
    return [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]


def _write_data(root: Path) -> tuple[Path, dict]:
    """13 samples: 8 usable, 4 bad (a missing image, a truncated PNG, a bad conversation, a missing WAV), 1 too
    long."""
    PIL.new("RGB", (20, 30), (200, 10, 10)).save(root / "red.png")
    PIL.new("RGBA", (31, 17), (10, 200, 10, 128)).save(root / "green.png")
    PIL.new("RGB", (64, 64), (10, 10, 200)).save(root / "whole.png")
    whole = (root / "whole.png").read_bytes()
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])  # a truncated PNG: exists, does not decode
    with wave.open(str(root / "tone.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(4000) / 5) * 3000).astype("<i2").tobytes())
    records = [
        {"id": "0", "image": "red.png", "conversations": _turns("<image>\nWhat colour?", "Red.")},
        {"id": "1", "audio": "tone.wav", "conversations": _turns("<audio>\nWhat is it?", "A tone.")},
        {"id": "2", "images": ["green.png"], "audio": "tone.wav",
         "conversations": _turns("<image>\n<audio>\nBoth?", "A green square and a tone.")},
        {"id": "3", "conversations": _turns("Count to five.", "1 2 3 4 5")},
        {"id": "4", "image": "nowhere.png", "conversations": _turns("<image>\nWhat?", "Gone.")},
        {"id": "5", "image": "cut.png", "conversations": _turns("<image>\nWhat?", "Broken.")},
        {"id": "6", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "7", "conversations": _turns("Say a lot.", "word " * 60)},
        {"id": "8", "conversations": _turns("Hi.", "Hello there.")},
        {"id": "9", "image": "red.png", "conversations": _turns("<image>\nAnd this?", "Red again, quite red.")},
        {"id": "10", "conversations": _turns("Repeat: cat dog.", "cat dog")},
        {"id": "11", "conversations": _turns("What comes after 41?", "42")},
        {"id": "12", "audio": "silent.wav", "conversations": _turns("<audio>\nHear?", "Nothing.")},
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = {"bad": {"4": "line 5", "5": "line 6", "6": "line 7", "12": "line 13"}, "dropped": {"7": "line 8"},
                "usable": ["0", "1", "2", "3", "8", "9", "10", "11"], "images": 3, "audio": 2}
    return path, expected


def _data_args(path: Path, *extra: str) -> list[str]:
    return [*MODEL, "data=llava_json", f"data.path={path}", "data.eval_fraction=0", f"data.max_seq_len={SEQ}",
            f"train.batch_size={BATCH}", *extra]


def _dataset(overrides: list[str]):
    """The training dataset of a config, built in this process (the reference the CLI's numbers are checked
    against)."""
    from mimo_spec.config import compose_config
    from mimo_spec.data import build_dataset
    from mimo_spec.data.tokenizer import build_tokenizer
    from mimo_spec.run_config import RunConfig, build_meta_model

    cfg = compose_config(overrides)
    model = build_meta_model(cfg)
    run = RunConfig.from_config(cfg, spec=model.spec)
    tokenizer = build_tokenizer(run.data, model)
    dataset = build_dataset(run.data, model, tokenizer, "train")
    dataset.run, dataset.model, dataset.tokenizer = run, model, tokenizer  # for the Python API's calls
    return dataset


def _first_fit_padding(lengths_in_order: list[int], rows: int, seq: int, lookahead: int) -> float:
    """Packed padding by the documented rule (mimo_spec/data/packing.py), written out here: each next
    sample goes into the first row with room; one that fits nowhere waits and opens the next batch; a batch
    closes when every row is full or ``lookahead`` samples wait. Positions repeat the order (next epoch) until
    every sample was read once."""
    m = len(lengths_in_order)
    position, waiting, batches, tokens = 0, [], 0, 0
    while position < m:
        room = [seq] * rows
        candidates, waiting = waiting, []
        while True:
            if candidates:
                n = candidates.pop(0)
            elif len(waiting) >= lookahead:
                break
            else:
                n = lengths_in_order[position % m]
                position += 1
            row = next((r for r in range(rows) if room[r] >= n), None)
            if row is None:
                waiting.append(n)
                continue
            room[row] -= n
            tokens += n
            if all(r == 0 for r in room):
                break
        batches += 1
    return 1 - tokens / (batches * rows * seq)


def _run_dir(cwd: Path) -> Path:
    dirs = [p.parent for p in cwd.glob("outputs/*/*/data_stats.json")]
    assert len(dirs) == 1, list(cwd.rglob("*"))
    return dirs[0]


def test_validate_scans_the_data_and_stops_past_max_bad_fraction(cli, tmp_path):
    path, expected = _write_data(tmp_path)
    r = cli("action=validate", *_data_args(path, "++data.max_bad_fraction=0.1"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "4 of 13 samples scanned (30.8%) cannot be used, more than data.max_bad_fraction=0.1" in r.stderr
    for sid, line in expected["bad"].items():  # every bad sample named with its line and id
        assert f"train.jsonl: {line} (id '{sid}')" in r.stderr, (sid, r.stderr)
    for named in ("nowhere.png", "silent.wav", "cut.png", "conversations[0]"):
        assert named in r.stderr, named
    assert "line 8" not in r.stderr  # the too-long sample is dropped, not bad
    assert "config is valid" not in r.stdout

    r = cli("action=validate", *_data_args(path, "++data.max_bad_fraction=0.5"))
    assert r.returncode == 0, r.stderr
    assert "config is valid" in r.stdout
    assert "data train: 13 samples: 8 usable, 4 bad, 1 dropped (length), 9 decoded" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 5, r.stderr
    assert any("bad (file)" in w and "line 5" in w and "missing file: nowhere.png" in w for w in warnings)
    assert any("bad (file)" in w and "line 13" in w and "missing file: silent.wav" in w for w in warnings)
    assert any("bad (decode)" in w and "line 6" in w for w in warnings)
    assert any("bad (read)" in w and "line 7" in w for w in warnings)
    assert any("dropped (length)" in w and "line 8" in w and f"the limit is {SEQ}" in w for w in warnings)


def test_data_action_reports_what_an_independent_count_finds(cli, tmp_path):
    path, expected = _write_data(tmp_path)
    r = cli("action=data", *_data_args(path, "data_scan.decode_samples=100"))
    assert r.returncode == 0, r.stderr
    stats = json.loads((_run_dir(cli.cwd) / "data_stats.json").read_text())
    train = stats["train"]
    assert (train["samples"], train["scanned"], train["usable"], train["bad"], train["dropped"]) == (13, 13, 8, 4, 1)
    assert (train["missing_files"], train["undecodable"], train["decoded"]) == (2, 1, 9)
    assert stats["eval"]["samples"] == 0
    listed = {(p["id"], p["kind"], p["check"]) for p in train["problems"]}
    assert listed == {("4", "bad", "file"), ("5", "bad", "decode"), ("6", "bad", "read"), ("7", "dropped", "length"),
                      ("12", "bad", "file")}

    dataset = _dataset(_data_args(path))
    ids = [dataset.source.record(i).id for i in range(len(dataset))]
    usable = [ids.index(s) for s in expected["usable"]]
    lengths = {i: dataset.token_length(i) for i in usable}
    x = np.array(sorted(lengths.values()))
    assert train["token_length"] == {"min": int(x.min()), "median": float(np.median(x)),
                                     "p95": float(np.percentile(x, 95)), "max": int(x.max()),
                                     "mean": float(x.mean()), "total": int(x.sum())}
    assert train["items"]["images"] == {"total": expected["images"], "mean": expected["images"] / 8, "max": 1,
                                        "samples": 3}
    assert train["items"]["audio"]["total"] == expected["audio"]
    # the histogram: equal integer bins from 0 covering the limit, each sample counted once
    edges, counts = train["histogram"]["edges"], train["histogram"]["counts"]
    width = edges[1]
    assert edges == [k * width for k in range(len(edges))] and SEQ < edges[-1] <= SEQ + len(counts)
    assert counts == [sum(1 for n in lengths.values() if lo <= n < lo + width) for lo in edges[:-1]]
    for lo, c in zip(edges[:-1], counts):
        assert any(line.strip().startswith(f"{lo}-{lo + width - 1}") and line.rstrip().endswith(f" {c}")
                   for line in r.stdout.splitlines()), (lo, c, r.stdout)
    # padding: the training order (seed 0), batches of BATCH rows padded to their longest; packed by first fit
    order = dataset.order(0)
    in_order = [lengths[order[p]] for p in range(len(dataset)) if order[p] in lengths]
    batches = [in_order[k:k + BATCH] for k in range(0, len(in_order), BATCH)]
    unpacked = 1 - sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)
    packed = _first_fit_padding(in_order, BATCH, SEQ, lookahead=max(8, BATCH))
    padding = train["padding"]
    assert (padding["batch_size"], padding["seq_len"]) == (BATCH, SEQ)
    assert math.isclose(padding["unpacked"], unpacked) and math.isclose(padding["packed"], packed)
    assert f"padding: {unpacked:.1%} with one sample per row" in r.stdout and f"{packed:.1%} packed" in r.stdout
    assert "train: 13 samples: 8 usable, 4 bad, 1 dropped (length), 9 decoded" in r.stdout
    assert "images: 3 items, 0.38 per sample (max 1), in 3 samples" in r.stdout
    png = _run_dir(cli.cwd) / "token_lengths.png"
    if _has_matplotlib():
        with PIL.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    else:
        assert not png.exists() and "matplotlib is not installed" in r.stdout


    # the Python API gives the same numbers; on_bad_sample: error refuses any bad sample
    from mimo_spec.data.stats import check_bad_samples, scan_dataset

    scanned = scan_dataset(dataset, decode_samples=100, seed=0)
    assert scanned.to_dict(BATCH, SEQ) == train
    check_bad_samples([scanned], "skip", 4 / 13)  # 4 of 13: not more than that
    with pytest.raises(DataError, match="4 of 13 samples scanned cannot be used, and on_bad_sample is error"):
        check_bad_samples([scanned], "error", 1.0)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_nothing_usable_is_a_data_error(tmp_path):
    from mimo_spec.data.stats import run_data_action, validate_run_data

    (tmp_path / "all_bad.jsonl").write_text("".join(
        json.dumps({"id": str(i), "image": f"gone{i}.png", "conversations": _turns("<image>\nWhat?", "x")}) + "\n"
        for i in range(3)))
    d = _dataset(_data_args(tmp_path / "all_bad.jsonl", "++data.max_bad_fraction=1.0"))
    for check in (lambda: validate_run_data(d.run, d.model, d.tokenizer),
                  lambda: run_data_action(d.run, d.model, d.tokenizer, None, tmp_path / "run")):
        with pytest.raises(DataError, match="none of the 3 train samples scanned can be used") as e:
            check()
        assert "gone0.png" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_synthetic_data_for_both_actions(cli):
    args = ["data.num_samples=40", "data.eval_samples=5", f"train.batch_size={BATCH}"]
    r = cli("action=validate", *args)
    assert r.returncode == 0, r.stderr
    assert "config is valid" in r.stdout and "data train: 40 samples (synthetic): 40 usable" in r.stdout
    assert "warning" not in r.stderr
    r = cli("action=data", *args)
    assert r.returncode == 0, r.stderr
    stats = json.loads((_run_dir(cli.cwd) / "data_stats.json").read_text())
    dataset = _dataset(args)
    samples = [dataset[i] for i in range(40)]
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    train = stats["train"]
    assert (train["samples"], train["scanned"], train["usable"], train["bad"]) == (40, 40, 40, 0)
    assert train["token_length"]["total"] == sum(lengths) and train["token_length"]["max"] == max(lengths)
    assert train["items"]["images"]["total"] == sum(s["num_items"]["images"] for s in samples)
    assert stats["eval"]["samples"] == 5 and stats["training"]["packing"] is False
    assert "token lengths (40 usable samples)" in r.stdout


def test_scan_config_errors_name_the_key(cli):
    r = cli("action=validate", "data_scan.max_samples=0")
    assert r.returncode == 2 and "data_scan.max_samples" in r.stderr and "Traceback" not in r.stderr
