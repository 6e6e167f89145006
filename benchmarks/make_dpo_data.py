"""Write a tiny LLaVA-format preference dataset (for trying ``train.objective: dpo`` and for the DPO tests).

    .venv/bin/python benchmarks/make_dpo_data.py /tmp/dpo --samples 64 [--webdataset 2] [--parquet]

writes into the folder:

- ``images/``: one PNG per colour (red, green, blue, yellow), 32 x 32 px, with some noise;
- ``pairs.jsonl``: ``--samples`` preference records ``{"id", "image", "conversations": [the prompt],
  "chosen": the right colour, "rejected": a wrong one}`` (one in four asks in two turns: an earlier question and
  answer, then the question);
- with ``--webdataset N``: ``shards/pairs-0000.tar`` ... the same records as N WebDataset tar shards
  (``key.json`` with ``chosen`` / ``rejected`` beside ``key.png``);
- with ``--parquet``: ``pairs.parquet`` (columns ``id``, ``question`` (the prompt as plain text), ``chosen``,
  ``rejected``, ``images``: the PNG bytes), read with ``data.conversations_column=question``.

The records depend only on ``--seed``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTIONS = ["What colour is the picture?", "Which colour do you see?", "Name the colour of the image."]


def _png(rgb, rng: np.random.Generator, size: int = 32) -> bytes:
    from PIL import Image

    pixels = np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(out: Path, samples: int = 64, seed: int = 0, webdataset: int = 0, parquet: bool = False) -> Path:
    """Write the dataset into ``out``; returns the JSONL file's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    pngs = {}
    for name, rgb in COLOURS.items():
        pngs[name] = _png(rgb, nrng)
        (out / "images" / f"{name}.png").write_bytes(pngs[name])
    records = []
    for i in range(samples):
        colour = rng.choice(list(COLOURS))
        wrong = rng.choice([c for c in COLOURS if c != colour])
        question = rng.choice(QUESTIONS)
        prompt = [{"from": "human", "value": f"<image>\n{question}"}]
        if i % 4 == 3:  # a two-turn prompt: an earlier exchange, then the question
            prompt = [{"from": "human", "value": "<image>\nIs there a picture?"}, {"from": "gpt", "value": "Yes."},
                      {"from": "human", "value": question}]
        records.append({"id": f"{i:05d}", "image": f"images/{colour}.png", "conversations": prompt,
                        "chosen": f"It is {colour}.", "rejected": f"It is {wrong}."})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if webdataset:
        (out / "shards").mkdir(exist_ok=True)
        per = -(-len(records) // webdataset)
        for s in range(webdataset):
            with tarfile.open(out / "shards" / f"pairs-{s:04d}.tar", "w") as tar:
                for r in records[s * per:(s + 1) * per]:
                    body = {k: v for k, v in r.items() if k != "image"}
                    for name, data in ((f"{r['id']}.json", json.dumps(body).encode()),
                                       (f"{r['id']}.png", pngs[r["image"][7:-4]])):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": [r["id"] for r in records],
                          "question": ["<image>\n" + r["conversations"][-1]["value"].replace("<image>\n", "")
                                       for r in records],
                          "chosen": [r["chosen"] for r in records], "rejected": [r["rejected"] for r in records],
                          "images": [[pngs[r["image"][7:-4]]] for r in records]})
        pq.write_table(table, out / "pairs.parquet", row_group_size=16)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--webdataset", type=int, default=0, help="also write the records as N tar shards")
    ap.add_argument("--parquet", action="store_true", help="also write pairs.parquet")
    args = ap.parse_args()
    path = make_dataset(args.out, args.samples, args.seed, args.webdataset, args.parquet)
    print(f"wrote {args.samples} preference pairs to {path}")


if __name__ == "__main__":
    main()
