"""Write a realistic LLaVA-format dataset for the data benchmarks (and for trying the data path by hand).

    .venv/bin/python benchmarks/make_llava_data.py /tmp/llava --samples 2000 --audio-fraction 0.3 \\
        --webdataset 4 --parquet

writes into the folder:

- ``images/``: a pool of image files of many sizes (16 px to 1024 px, tall, wide and square) and kinds:
  RGB / L JPEGs (some with an EXIF orientation other than 1), RGB / RGBA / L / LA / P (palette, with and
  without transparency) / 16-bit grayscale PNGs, RGB / RGBA WebPs;
- ``audio/``: a pool of sound files of many lengths (0.1 s to 4 s) and formats: 16-bit, 24-bit, 32-bit,
  8-bit unsigned and float WAVs, mono and stereo, at 8 to 48 kHz, and FLAC;
- ``train.jsonl``: ``--samples`` LLaVA samples (``{"id", "image" | "images", "audio",
  "conversations"}``), each referencing files of the pools (relative paths: the JSONL's folder is the
  default ``data.image_folder``). 1 to 4 turns, answers from a word to ~100 words (most short,
  a long tail), ``--text-only`` of them without media, some with two images, ``--audio-fraction`` with audio;
- with ``--webdataset N``: ``shards/shard-0000.tar`` ... the same samples as N WebDataset tar shards
  (``key.json`` + ``key.jpg`` / ``key.0.png`` / ``key.1.jpg`` / ``key.wav``);
- with ``--parquet``: ``train.parquet`` (columns ``id``, ``conversations`` as JSON text, ``images`` and
  ``audios`` as lists of file bytes).

The samples depend only on ``--seed``; the pools are small (``--images``, ``--audios``) so a 200,000-sample
file is cheap to write (a few seconds, ~60 MB). ``make_dataset`` is what the benchmarks call.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np

WORDS = ("the a an red blue green small large wooden metal cat dog bird car tree house table window street "
         "person people child woman man sits stands walks near behind under over next to on in with and of "
         "picture image photo shows appears there is are two three several bright dark old new round square "
         "sky water grass road building sign light shadow left right top bottom corner middle background "
         "foreground looks holding wearing white black yellow orange brown field river mountain city night day "
         "sound voice music noise speaker says loud quiet short long beep tone").split()
QUESTIONS = ["What is in the picture?", "Describe the image.", "Describe the image in detail.",
             "What color is the object on the left?", "How many people are there?", "What is happening here?",
             "Is it day or night?", "What does the sign say?", "Summarize what you see.",
             "What is the main object and where is it?", "Write a short story about this scene.",
             "Explain the picture to a child.", "What could happen next?"]
AUDIO_QUESTIONS = ["What do you hear?", "Transcribe the audio.", "Describe the sound.", "Who is speaking?"]

IMAGE_SIZES = [(16, 16), (24, 40), (32, 32), (47, 31), (64, 48), (100, 100), (120, 200), (224, 224), (333, 500),
               (500, 333), (640, 480), (48, 640), (1024, 768)]
# (extension, PIL mode, save options)
IMAGE_KINDS = [("jpg", "RGB", {}), ("jpg", "RGB", {"exif_orientation": 6}), ("jpg", "RGB", {"exif_orientation": 3}),
               ("jpg", "L", {}), ("jpg", "RGB", {"exif_orientation": 8}), ("png", "RGB", {}), ("png", "RGBA", {}),
               ("png", "L", {}), ("png", "LA", {}), ("png", "P", {}), ("png", "P", {"transparency": 0}),
               ("png", "I;16", {}), ("webp", "RGB", {}), ("webp", "RGBA", {})]
# (extension, soundfile subtype, sample rate, channels)
AUDIO_KINDS = [("wav", "PCM_16", 16000, 1), ("wav", "PCM_16", 44100, 2), ("wav", "PCM_24", 48000, 1),
               ("wav", "FLOAT", 22050, 1), ("wav", "PCM_U8", 8000, 1), ("wav", "PCM_32", 32000, 2),
               ("wav", "DOUBLE", 16000, 1), ("flac", "PCM_16", 44100, 1), ("flac", "PCM_24", 16000, 2)]
AUDIO_SECONDS = [0.1, 0.3, 0.5, 0.64, 0.9, 1.5, 2.5, 4.0]


def _picture(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 picture: a gradient, a few rectangles and some noise (so JPEG sizes are realistic)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(w + h, 1))], -1)
    img = base.astype(np.int32)
    for _ in range(3):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        img[y0:y0 + max(1, h // 4), x0:x0 + max(1, w // 4)] = rng.integers(0, 256, 3)
    img += rng.integers(-12, 13, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, w: int, h: int, mode: str, opts: dict, rng: np.random.Generator) -> None:
    from PIL import Image

    rgb = Image.fromarray(_picture(w, h, rng), "RGB")
    if mode == "RGB":
        img = rgb
    elif mode in ("L", "LA", "RGBA"):
        img = rgb.convert("L" if mode != "RGBA" else "RGBA")
        if mode != "L":
            alpha = Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1)), "L")
            img = img.convert(mode)
            img.putalpha(alpha)
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "I;16":  # 16-bit grayscale: the full range, so an 8-bit reading would saturate
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    else:
        raise ValueError(mode)
    kw = {}
    if "exif_orientation" in opts:
        exif = Image.Exif()
        exif[0x0112] = opts["exif_orientation"]
        kw["exif"] = exif.tobytes()
    if "transparency" in opts:
        kw["transparency"] = opts["transparency"]
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:]]
    if fmt == "JPEG":
        kw["quality"] = 85
    img.save(path, fmt, **kw)


def write_audio(path: Path, subtype: str, rate: int, channels: int, seconds: float, rng: np.random.Generator) -> None:
    import soundfile as sf

    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    f0 = float(rng.choice([220.0, 440.0, 1000.0, 3000.0]))
    x = 0.4 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(n)
    data = np.stack([x, 0.7 * x], 1) if channels == 2 else x
    sf.write(str(path), data.astype(np.float64 if subtype == "DOUBLE" else np.float32), rate, subtype=subtype,
             format="FLAC" if path.suffix == ".flac" else "WAV")


def make_pools(out: Path, n_images: int, n_audios: int, seed: int) -> tuple[list[str], list[str]]:
    """The image and audio pool files (written once: files already there are kept)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    images, audios = [], []
    for k in range(n_images):
        w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
        ext, mode, opts = IMAGE_KINDS[(k * 5) % len(IMAGE_KINDS)]
        if ext == "jpg" and "exif_orientation" in opts:
            w, h = (h, w) if k % 2 else (w, h)
        name = f"images/img_{k:04d}_{w}x{h}_{mode.replace(';', '')}.{ext}"
        if not (out / name).exists():
            write_image(out / name, w, h, mode, opts, rng)
        images.append(name)
    for k in range(n_audios):
        ext, subtype, rate, ch = AUDIO_KINDS[k % len(AUDIO_KINDS)]
        sec = AUDIO_SECONDS[(k * 3) % len(AUDIO_SECONDS)]
        name = f"audio/snd_{k:04d}_{subtype.lower()}_{rate}_{ch}ch_{sec}s.{ext}"
        if not (out / name).exists():
            write_audio(out / name, subtype, rate, ch, sec, rng)
        audios.append(name)
    return images, audios


def _answer(rng: random.Random, long_share: float) -> str:
    """1 to 110 words: mostly short, some medium, a long tail."""
    u = rng.random()
    if u < 1 - long_share - 0.3:
        n = rng.randint(1, 12)
    elif u < 1 - long_share:
        n = rng.randint(15, 50)
    else:
        n = rng.randint(50, 110)
    text = " ".join(rng.choice(WORDS) for _ in range(n))
    return text[0].upper() + text[1:] + "."


def make_sample(k: int, rng: random.Random, images: list[str], audios: list[str], *, audio_fraction: float,
                text_only: float, long_share: float) -> dict:
    u = rng.random()
    imgs = [] if u < text_only or not images else rng.sample(images, 2 if u > 0.9 else 1)
    auds = [rng.choice(audios)] if audios and rng.random() < audio_fraction else []
    turns = rng.choice([1, 1, 1, 2, 2, 3, 4])
    conv = []
    for t in range(turns):
        q = rng.choice(AUDIO_QUESTIONS if auds and t == 0 and not imgs else QUESTIONS)
        if t == 0:
            q = "".join("<image>\n" for _ in imgs) + "".join("<audio>\n" for _ in auds) + q
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _answer(rng, long_share)}]
    rec: dict = {"id": f"s{k:07d}"}
    if len(imgs) == 1:
        rec["image"] = imgs[0]
    elif imgs:
        rec["images"] = imgs
    if auds:
        rec["audio"] = auds[0]
    rec["conversations"] = conv
    return rec


def make_dataset(out, samples: int, *, n_images: int = 48, n_audios: int = 24, audio_fraction: float = 0.0,
                 text_only: float = 0.1, long_share: float = 0.1, seed: int = 0, name: str = "train.jsonl",
                 webdataset: int = 0, parquet: bool = False, row_group: int = 1000) -> dict:
    """Write the dataset (see the module doc); returns its paths: ``jsonl``, ``folder``, and ``shards`` (a brace
    pattern) / ``parquet`` when written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, audios = make_pools(out, n_images, n_audios if audio_fraction > 0 else 0, seed)
    rng = random.Random(seed)
    recs = [make_sample(k, rng, images, audios, audio_fraction=audio_fraction, text_only=text_only,
                        long_share=long_share) for k in range(samples)]
    with open(out / name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    paths = {"jsonl": str(out / name), "folder": str(out)}
    if webdataset:
        paths["shards"] = write_shards(out, recs, webdataset)
    if parquet:
        paths["parquet"] = write_parquet(out, recs, row_group)
    return paths


def _members(out: Path, rec: dict) -> tuple[dict, list[tuple[str, bytes]]]:
    """The json of a sample without its file paths, and its media as (extension, bytes) members."""
    imgs = rec.get("images") or ([rec["image"]] if "image" in rec else [])
    auds = [rec["audio"]] if "audio" in rec else []
    members = []
    for kind, files in (("img", imgs), ("aud", auds)):
        for j, f in enumerate(files):
            ext = f.rsplit(".", 1)[1]
            members.append((ext if len(files) == 1 else f"{j}.{ext}", (out / f).read_bytes()))
    meta = {k: v for k, v in rec.items() if k not in ("image", "images", "audio")}
    return meta, members


def write_shards(out: Path, recs: list[dict], shards: int) -> str:
    """The samples as ``shards`` WebDataset tar shards; returns their brace pattern."""
    (out / "shards").mkdir(exist_ok=True)
    per = -(-len(recs) // shards)
    for s in range(shards):
        with tarfile.open(out / "shards" / f"shard-{s:04d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in recs[s * per:(s + 1) * per]:
                meta, members = _members(out, rec)
                key = rec["id"]
                for ext, data in [("json", json.dumps(meta).encode())] + members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
    return str(out / "shards" / f"shard-{{0000..{shards - 1:04d}}}.tar")


def write_parquet(out: Path, recs: list[dict], row_group: int = 1000) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, convs, images, audios = [], [], [], []
    for rec in recs:
        imgs = rec.get("images") or ([rec["image"]] if "image" in rec else [])
        ids.append(rec["id"])
        convs.append(json.dumps(rec["conversations"]))
        images.append([(out / f).read_bytes() for f in imgs])
        audios.append([(out / rec["audio"]).read_bytes()] if "audio" in rec else [])
    table = pa.table({"id": ids, "conversations": convs, "images": pa.array(images, pa.list_(pa.binary())),
                      "audios": pa.array(audios, pa.list_(pa.binary()))})
    pq.write_table(table, out / "train.parquet", row_group_size=row_group)
    return str(out / "train.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--images", type=int, default=48, help="image pool size")
    ap.add_argument("--audios", type=int, default=24, help="audio pool size")
    ap.add_argument("--audio-fraction", type=float, default=0.0, help="share of samples with an audio file")
    ap.add_argument("--text-only", type=float, default=0.1, help="share of samples without media")
    ap.add_argument("--long-share", type=float, default=0.1, help="share of answers of 50-110 words")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--webdataset", type=int, default=0, metavar="N", help="also write N tar shards")
    ap.add_argument("--parquet", action="store_true", help="also write train.parquet")
    ap.add_argument("--row-group", type=int, default=1000, help="Parquet rows a row group")
    args = ap.parse_args()
    paths = make_dataset(args.out, args.samples, n_images=args.images, n_audios=args.audios,
                         audio_fraction=args.audio_fraction, text_only=args.text_only, long_share=args.long_share,
                         seed=args.seed, webdataset=args.webdataset, parquet=args.parquet, row_group=args.row_group)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
