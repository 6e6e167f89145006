"""Real data under 2 ranks (gloo, CPU): LLaVA-format files, packed rows, 2 DataLoader workers per rank and
unusable samples; a run stopped mid-epoch and resumed equals the uninterrupted one, and both equal one process."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import data_config  # noqa: E402
from ranks import run_ranks  # noqa: E402
from test_parallel_run import RTOL, losses  # noqa: E402

from conftest import ROOT  # noqa: E402


def write_data(d: Path, n: int = 48) -> set[str]:
    """``n`` chats of very different lengths, most with a PNG of its own size; every 5th names a missing
    image (skipped when read). Returns the ids of the unusable samples."""
    from PIL import Image

    d.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for k, (w, h) in enumerate([(40, 24), (24, 40), (33, 33)]):
        Image.new("RGB", (w, h), colours[k]).save(d / f"img{k}.png")
    bad, lines = set(), []
    for i in range(n):
        answer = " ".join(["word"] * (1 + (i * 7) % 19))
        rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                {"from": "gpt", "value": answer}]}
        if i % 5 == 4:
            rec["image"], _ = "gone.png", bad.add(f"s{i}")
        elif i % 2 == 0:
            rec["image"] = f"img{i % 3}.png"
        lines.append(json.dumps(rec))
    (d / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return bad


def test_real_data_packed_with_workers_resumes_exactly_under_two_ranks(tmp_path):
    from mimo_spec.train.loop import train

    bad = write_data(tmp_path / "data")
    scenarios = "data:ddp:full,data:ddp:stop,data:ddp:resume,data:fsdp:full"
    r = run_ranks(2, ROOT / "tests" / "parallel_worker.py", tmp_path, scenarios, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    train(data_config("single", tmp_path), tmp_path / "single")

    full, split, single = (losses(tmp_path / n) for n in ("data_ddp_full", "data_ddp_split", "single"))
    assert len(full) == 4 and split == full  # stopped after step 2 and resumed with workers: bit for bit
    assert full == pytest.approx(single, rel=RTOL)  # 2 ranks, each loading its rows: one process's losses
    assert losses(tmp_path / "data_fsdp_full") == pytest.approx(single, rel=RTOL)
    for run in ("data_ddp_full", "data_ddp_split", "single"):
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        logged = [json.loads(line) for line in (tmp_path / run / "bad_samples.jsonl").read_text().splitlines()]
        assert logged and {e["id"] for e in logged} <= bad, run  # the skipped samples, once each, by id ...
        assert all("gone.png" in e["reason"] and e["file"].endswith("chats.jsonl") for e in logged), logged[0]
        assert metrics["bad_samples"] == len(logged) and metrics["packing"] is True
        assert 0.0 <= metrics["padding_fraction"] < 0.5
    # ... and the same ones whatever the layout (each rank reads only its rows; the log gathers them)
    ids = {run: sorted(json.loads(line)["id"] for line in (tmp_path / run / "bad_samples.jsonl").read_text().splitlines())
           for run in ("data_ddp_full", "single")}
    assert ids["data_ddp_full"] == ids["single"]
