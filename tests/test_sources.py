"""Data sources: lazy, indexed readers of JSON / JSONL files, WebDataset tar shards, Parquet / Arrow files and
weighted mixtures (mimo_spec.data.sources), on real files written here."""

import io
import json
import os
import pickle
import time
import tracemalloc
import wave

import numpy as np
import pytest
import torch

from mimo_spec.data.config import validate_data_config
from mimo_spec.data.loader import SampleOrder
from mimo_spec.data.sources import mixture_slots, open_source
from mimo_spec.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL.Image")


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def sample(i, **kw):
    return {"id": f"{i:03d}", "conversations": [human(f"<image>\nq{i} é✓"), gpt(f"a{i}")], **kw}


def source(split="train", **cfg):
    cfg = {"source": "llava_json", "eval_fraction": 0.0, **cfg}
    return open_source(validate_data_config(cfg), split)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def png_bytes(color=(255, 0, 0), mode="RGB", size=(4, 3)):
    buf = io.BytesIO()
    PIL.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(color=(0, 255, 0)):
    buf = io.BytesIO()
    PIL.new("RGB", (5, 5), color).save(buf, format="JPEG")
    return buf.getvalue()


def wav_bytes(n=160, rate=16000):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(np.arange(n) / 5) * 8000).astype(np.int16).tobytes())
    return buf.getvalue()


def flac_bytes(n=320, rate=16000):
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(n) / 7) * 0.5).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".mimo-index.npz"))


# ------------------------------------------------------------------------------------- llava_json
def test_jsonl_records_where_media_and_a_bad_line(tmp_path):
    (tmp_path / "imgs").mkdir()
    text = (json.dumps(sample(0, image="a.jpg")) + "\n\n   \r\n"  # blank lines are skipped, lines still counted
            + json.dumps(sample(1, images=["b.jpg", "/abs/c.png"], audio="x.wav", chosen="yes")) + "\r\n"
            + '{"id": "broken", "conversations": [\n'  # line 5: not JSON
            + "[1, 2]\n"  # line 6: JSON, not an object
            + json.dumps(sample(4)))  # line 7, no newline at the end
    f = tmp_path / "train.jsonl"
    f.write_text(text, encoding="utf-8")
    src = source(path=str(f), image_folder=str(tmp_path / "imgs"))
    assert len(src) == 5 and src.files() == [str(f)]
    r0, r1, r4 = src.record(0), src.record(1), src.record(4)
    assert r0.conversations == sample(0)["conversations"] and r0.id == "000" and r0.file == str(f)
    assert r0.where == "train.jsonl: line 1 (id '000')" and r4.where == "train.jsonl: line 7 (id '004')"
    assert [(m.name, m.path) for m in r0.images] == [("a.jpg", tmp_path / "imgs" / "a.jpg")]
    assert [m.name for m in r1.images] == ["b.jpg", "/abs/c.png"] and str(r1.images[1].path) == "/abs/c.png"
    # audio without audio_folder: the JSON file's own folder; other fields pass on in extra
    assert r1.audios[0].path == tmp_path / "x.wav" and r1.extra == {"chosen": "yes"} and r1.where.endswith("line 4 (id '001')")
    with pytest.raises(DataError, match=r"train.jsonl: not valid JSON at line 5, column \d+") as e:
        src.record(2)
    assert e.value.problems[0].path == "data.path"
    with pytest.raises(DataError, match=r"train.jsonl: line 6: expected a JSON object, got list"):
        src.record(3)
    assert src.record(4).id == "004"  # its neighbours read as before
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps(sample(0)) + '\n{"x": ' + "[" * 5000 + "]" * 5000 + "}\n" + json.dumps(sample(2)))
    src = source(path=str(deep))
    with pytest.raises(DataError, match=r"deep.jsonl: lists/objects nested too deeply at line 2"):
        src.record(1)
    assert src.record(2).id == "002"


def test_line_scan_matches_a_reference_at_every_chunk_size(tmp_path):
    """The chunked byte scan finds the same non-blank lines as splitting the whole file at "\\n"."""
    from mimo_spec.data.file_index import scan_lines

    rng = np.random.default_rng(0)
    pieces = ["", " ", "\t \r", '{"a": 1}', ' {"b": "x y"} \r', "é✓", "\u2028"]
    for trial in range(30):
        text = "\n".join(rng.choice(pieces, size=int(rng.integers(0, 12))).tolist()) + rng.choice(["", "\n", "\n\n"])
        data = text.encode()
        (tmp_path / "f.jsonl").write_bytes(data)
        want, pos = [], 0
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if line.strip(b" \t\r"):
                want.append((pos, pos + len(line), lineno))
            pos += len(line) + 1
        for chunk in (1, 2, 3, 5, 8, 1 << 20):
            idx = scan_lines(tmp_path / "f.jsonl", chunk_size=chunk)
            assert list(zip(idx["start"].tolist(), idx["end"].tolist(), idx["line"].tolist())) == want, (text, chunk)


def test_json_list_file_is_indexed_element_by_element(tmp_path):
    rows = [sample(i, image=f"{i}.jpg") for i in range(7)] + [{"id": 7, "conversations": [gpt("ü" * 300 + '"}]')]}]
    f = tmp_path / "llava.json"
    f.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")  # multi-line, non-ASCII
    src = source(path=str(f))
    assert len(src) == 8
    for i in range(8):
        r = src.record(i)
        assert r.conversations == rows[i]["conversations"] and r.id == str(rows[i]["id"])
        assert r.where == f"llava.json: sample {i} (id {rows[i]['id']!r})"
    assert src.record(3).images[0].path == tmp_path / "3.jpg"
    assert len(source(path=str(f), max_samples=3)) == 3
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert len(source(path=str(tmp_path / "empty.json"))) == 0
    (tmp_path / "bad.json").write_text('[{"id": 1},\n {"id": 2,, }]')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON at line 2, column 11") as e:
        source(path=str(tmp_path / "bad.json"))
    assert e.value.problems[0].path == "data.path"
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match=r"obj.json: expected a JSON list of samples, got an object"):
        source(eval_path=str(tmp_path / "obj.json"), path=str(f), split="eval")


def test_globs_folders_lists_and_missing_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "c.json").write_text(json.dumps([sample(20), sample(21), sample(22)]))
    assert source(path=str(d / "c.json"), max_samples=1).files() == [str(d / "c.json")]
    (d / ".c.json.mimo-index.npz").unlink()
    write_jsonl(d / "b.jsonl", [sample(10), sample(11)])
    write_jsonl(d / "a.jsonl", [sample(0)])
    (d / "notes.txt").write_text("not data")
    ids = lambda s: [s.record(i).id for i in range(len(s))]  # noqa: E731
    assert ids(source(path=str(d))) == ["000", "010", "011", "020", "021", "022"]  # a folder: sorted
    assert ids(source(path=str(d / "*.jsonl"))) == ["000", "010", "011"]
    assert ids(source(path=[str(d / "c.json"), str(d / "a.jsonl")])) == ["020", "021", "022", "000"]  # list order
    assert source(path=str(d / "*.jsonl")).files() == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    # max_samples: the first N in file order; files past them are not even read
    s = source(path=[str(d / "a.jsonl"), str(d / "b.jsonl"), str(d / "c.json")], max_samples=2)
    assert ids(s) == ["000", "010"] and s.files() == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    with pytest.raises(DataError, match=r"data.path: no file matches '.*nothing-\*.jsonl'"):
        source(path=str(d / "nothing-*.jsonl"))
    with pytest.raises(DataError, match=r"data.path: data file not found: .*gone.jsonl"):
        source(path=[str(d / "a.jsonl"), str(d / "gone.jsonl")])
    with pytest.raises(DataError, match=r"data.eval_path: data file not found: .*held.jsonl"):
        source("eval", path=str(d), eval_path=str(tmp_path / "held.jsonl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data.path: the folder .*empty holds no .json / .jsonl file"):
        source(path=str(empty))


def test_eval_split_follows_todays_rule(tmp_path):
    """eval_fraction holds out min(max(round(n*f), 1), n-1) records chosen by torch.randperm seeded with data.seed,
    over all the train files' records (after max_samples), in file order."""
    write_jsonl(tmp_path / "a.jsonl", [sample(i) for i in range(13)])
    (tmp_path / "b.json").write_text(json.dumps([sample(i) for i in range(13, 30)]))
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")]
    for f, seed, max_samples in ((0.2, 3, None), (0.01, 0, None), (0.5, 7, 21)):
        n = max_samples or 30
        n_eval = min(max(round(n * f), 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        want_eval, want_train = sorted(perm[:n_eval]), sorted(perm[n_eval:])
        kw = dict(path=paths, eval_fraction=f, seed=seed, max_samples=max_samples)
        tr, ev = source("train", **kw), source("eval", **kw)
        assert [int(tr.record(i).id) for i in range(len(tr))] == want_train
        assert [int(ev.record(i).id) for i in range(len(ev))] == want_eval
    assert len(source("eval", path=paths)) == 0 and len(source("train", path=paths)) == 30  # fraction 0
    # eval_path: the whole file (max_samples applies to each split)
    ev = source("eval", path=paths, eval_path=str(tmp_path / "a.jsonl"), eval_fraction=0.5, max_samples=5)
    assert [ev.record(i).id for i in range(len(ev))] == [f"{i:03d}" for i in range(5)]


# --------------------------------------------------------------------------------- index caching
def test_index_cache_is_reused_invalidated_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    d = tmp_path / "d"
    d.mkdir()
    f = write_jsonl(d / "t.jsonl", [sample(i) for i in range(5)])
    assert len(source(path=str(f))) == 5
    cache = d / ".t.jsonl.mimo-index.npz"
    assert cache_files(d) == [cache.name]
    with np.load(cache, allow_pickle=False) as z:  # plain arrays, no pickle: the byte offsets of the 5 lines
        lines = f.read_bytes().split(b"\n")[:5]
        assert z["start"].tolist() == [0] + np.cumsum([len(line) + 1 for line in lines[:4]]).tolist()
        assert z["line"].tolist() == [1, 2, 3, 4, 5]
    stamp = cache.stat().st_mtime_ns
    time.sleep(0.01)
    assert len(source(path=str(f))) == 5 and cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    # the same size, a new mtime (touch): rebuilt
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert len(source(path=str(f))) == 5 and cache.stat().st_mtime_ns != stamp
    # modified: rebuilt, and the records are the new ones
    write_jsonl(f, [sample(i) for i in range(40, 48)])
    s = source(path=str(f))
    assert len(s) == 8 and s.record(7).id == "047"
    # data.index_dir: the index goes there
    s = source(path=str(f), index_dir=str(tmp_path / "idx"))
    assert len(s) == 8 and len(list((tmp_path / "idx").glob("t.jsonl.*.mimo-index.npz"))) == 1
    # a folder the index cannot be written to (read-only; as root, a directory in the index's place): the user's
    # cache instead
    ro = tmp_path / "ro"
    ro.mkdir()
    g = write_jsonl(ro / "t.jsonl", [sample(i) for i in range(3)])
    (ro / ".t.jsonl.mimo-index.npz").mkdir()
    ro.chmod(0o555)
    try:
        assert len(source(path=str(g))) == 3 and source(path=str(g)).record(2).id == "002"
    finally:
        ro.chmod(0o755)
    assert len(list((tmp_path / "home-cache" / "mimo-spec" / "index").glob("t.jsonl.*.mimo-index.npz"))) == 1


def test_opening_a_large_jsonl_is_lazy(tmp_path):
    """200,000 lines: one byte scan builds the index; memory holds offsets, not records."""
    f = tmp_path / "big.jsonl"
    line = json.dumps(sample(0, image="coco/000.jpg"))
    with open(f, "w") as fh:
        for i in range(200_000):
            fh.write(line.replace('"000"', f'"{i:06d}"', 1) + "\n")
    tracemalloc.start()
    t0 = time.perf_counter()
    src = source(path=str(f))
    first = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t0 = time.perf_counter()
    again = source(path=str(f))  # from the cached index
    cached = time.perf_counter() - t0
    print(f"\n200,000-line JSONL ({f.stat().st_size / 1e6:.0f} MB): open {first:.2f} s (index build), "
          f"{cached:.3f} s cached; tracemalloc peak {peak / 1e6:.1f} MB")
    assert len(src) == len(again) == 200_000 and src.record(123_456).id == "123456"
    assert peak < 20e6
    assert len(pickle.dumps(src)) < 8 * 1024 * 1024  # index arrays (24 bytes a line), no records
    assert pickle.loads(pickle.dumps(src)).record(199_999).id == "199999"


# --------------------------------------------------------------------------------- webdataset
def write_shards(tmp_path):
    import webdataset as wds

    d = tmp_path / "shards"
    d.mkdir()
    (d / "pics").mkdir()
    media = {}
    with wds.TarWriter(str(d / "shard-0000.tar")) as w:
        media["s0"] = (jpg_bytes(), wav_bytes())
        w.write({"__key__": "s0", "json": sample(0), "jpg": media["s0"][0], "wav": media["s0"][1]})
        # several items: key.N.ext in numeric order (10 after 2), audio as FLAC; no "id": the key is the id
        imgs = [png_bytes((k, 0, 0)) for k in range(3)]
        media["s1"] = imgs
        w.write({"__key__": "s1", "json": {"conversations": [human("<image><image><image>"), gpt("x")]},
                 "0.png": imgs[0], "10.png": imgs[2], "2.png": imgs[1], "flac": flac_bytes(), "txt": "ignored"})
    with wds.TarWriter(str(d / "shard-0001.tar")) as w:
        # json only: its media paths resolve against image_folder / the shard's folder
        w.write({"__key__": "s2", "json": sample(2, image="pics/p.png", audio="a.wav")})
        w.write({"__key__": "s3", "jpg": jpg_bytes()})  # no json: a bad record
        w.write({"__key__": "dir/s4", "json": sample(4), "webp": b"RIFF....WEBP"})
    return d, media


def test_webdataset_shards(tmp_path):
    d, media = write_shards(tmp_path)
    cfg = {"source": "webdataset", "path": str(d / "shard-{0000..0001}.tar"), "eval_fraction": 0.0}
    src = open_source(validate_data_config(cfg), "train")
    assert len(src) == 5 and src.files() == [str(d / "shard-0000.tar"), str(d / "shard-0001.tar")]
    r0, r1, r2, r4 = src.record(0), src.record(1), src.record(2), src.record(4)
    assert r0.conversations == sample(0)["conversations"] and r0.id == "000" and r0.file == str(d / "shard-0000.tar")
    assert r0.where == "shard-0000.tar: key s0 (id '000')"
    # members stay slices of the shard until decoded (planning reads the json only)
    assert all(m.data is None and m.path == d / "shard-0000.tar" and not m.whole_file for m in r0.images + r1.images)
    assert [(m.name, m.open().read()) for m in r0.images] == [("shard-0000.tar:s0.jpg", media["s0"][0])]
    assert [(m.name, m.open().read(), m.suffix) for m in r0.audios] == [("shard-0000.tar:s0.wav", media["s0"][1], "wav")]
    assert [m.name for m in r1.images] == [f"shard-0000.tar:s1.{k}.png" for k in (0, 2, 10)]
    assert [m.open().read() for m in r1.images] == media["s1"] and r1.id == "s1" and r1.audios[0].suffix == "flac"
    assert [m.size() for m in r1.images] == [len(b) for b in media["s1"]]
    assert [(m.name, m.path) for m in r2.images] == [("pics/p.png", d / "pics/p.png")] and r2.audios[0].path == d / "a.wav"
    with pytest.raises(DataError, match=r"shard-0001.tar: sample 's3' has no s3.json member"):
        src.record(3)
    assert r4.id == "004" and r4.images[0].name == "shard-0001.tar:dir/s4.webp"
    # the same samples (keys and member bytes) as webdataset's own reader
    import webdataset as wds

    theirs = list(wds.WebDataset([str(p) for p in sorted(d.glob("*.tar"))], shardshuffle=False))
    assert [s["__key__"] for s in theirs] == ["s0", "s1", "s2", "s3", "dir/s4"]
    assert theirs[1]["10.png"] == r1.images[2].open().read() and theirs[0]["wav"] == r0.audios[0].open().read()
    # indexed once per shard, then read from the cache; image_folder for json paths; globs and lists
    assert cache_files(d) == [".shard-0000.tar.mimo-index.npz", ".shard-0001.tar.mimo-index.npz"]
    src = open_source(validate_data_config({**cfg, "path": [str(d / "*0001.tar")], "image_folder": str(tmp_path)}),
                      "train")
    assert len(src) == 3 and src.record(0).images[0].path == tmp_path / "pics/p.png"
    copy = pickle.loads(pickle.dumps(src))
    assert copy.record(2).images[0].open().read() == b"RIFF....WEBP"
    with pytest.raises(DataError, match=r"data.path: data file not found: .*shard-0002.tar \(from '.*\{0000..0002\}"):
        open_source(validate_data_config({**cfg, "path": str(d / "shard-{0000..0002}.tar")}), "train")
    (d / "bad.tar").write_bytes(b"x" * 1000)
    with pytest.raises(DataError, match=r"bad.tar: cannot be read as a tar shard"):
        open_source(validate_data_config({**cfg, "path": str(d / "bad.tar")}), "train")
    whole = (d / "shard-0000.tar").read_bytes()  # a shard cut off in the middle of a member: its hint says so
    (d / "cut.tar").write_bytes(whole[:len(whole) // 2 + 100])
    with pytest.raises(DataError) as e:
        open_source(validate_data_config({**cfg, "path": str(d / "cut.tar")}), "train")
    assert "cut.tar: cannot be read as a tar shard" in str(e.value) and "cut-off" in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------ parquet
def test_parquet_and_arrow_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    imgs = [png_bytes((k, 1, 2)) for k in range(10)]
    conv = [json.dumps([human(f"<image>\nq{k}"), gpt(f"a{k}")]) for k in range(10)]
    # JSON-string conversations; images as Hugging Face Image structs {bytes, path} (one path-only);
    # audio a list of binary; 3 rows per row group
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    t = pa.table({"id": [f"r{k}" for k in range(10)], "conversations": conv,
                  "images": pa.array([{"bytes": imgs[k], "path": f"img{k}.png"} if k != 4 else
                                      {"bytes": None, "path": "disk/4.png"} for k in range(10)], image_type),
                  "audios": pa.array([[wav_bytes()] * (k % 3) for k in range(10)], pa.list_(pa.binary()))})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=3)
    # conversations as a list of {from, value} structs; plain binary image column under another name
    t2 = pa.table({"conversations": [[human("<image>hi"), gpt("yo")]] * 2, "pic": [imgs[0], imgs[1]]})
    pq.write_table(t2, tmp_path / "b.parquet")
    cfg = {"source": "parquet", "path": str(tmp_path / "*.parquet"), "eval_fraction": 0.0}
    src = open_source(validate_data_config(cfg), "train")
    assert len(src) == 12
    for k in (7, 0, 5, 9, 4):  # across row groups, back and forth
        r = src.record(k)
        assert r.conversations == json.loads(conv[k]) and r.id == f"r{k}" and r.where == f"a.parquet: row {k} (id 'r{k}')"
        assert len(r.audios) == k % 3 and all(m.data == wav_bytes() for m in r.audios)
        if k != 4:
            assert [(m.name, m.data, m.suffix) for m in r.images] == [(f"a.parquet:row {k}:img{k}.png", imgs[k], "png")]
    assert src.record(4).images[0].path == tmp_path / "disk/4.png"
    r = src.record(11)  # b.parquet: no id / images / audios columns of those names
    assert r.conversations == [human("<image>hi"), gpt("yo")] and r.images == [] and r.id is None
    src = open_source(validate_data_config({**cfg, "path": str(tmp_path / "b.parquet"), "image_column": "pic"}), "train")
    assert [(m.name, m.data) for m in src.record(1).images] == [("b.parquet:row 1:pic[0]", imgs[1])]
    with pytest.raises(DataError, match=r"data.image_column: .*b.parquet: no column 'picture' .*did you mean pic"):
        open_source(validate_data_config({**cfg, "path": str(tmp_path / "b.parquet"), "image_column": "picture"}),
                    "train")
    with pytest.raises(DataError, match=r"data.conversations_column: .*no column 'conv'"):
        open_source(validate_data_config({**cfg, "conversations_column": "conv"}), "train")
    # a bad JSON cell is that record's error only
    pq.write_table(pa.table({"conversations": ["[not json", conv[1]]}), tmp_path / "c.parquet")
    src = open_source(validate_data_config({**cfg, "path": str(tmp_path / "c.parquet")}), "train")
    with pytest.raises(DataError, match=r"c.parquet: not valid JSON at row 0"):
        src.record(0)
    assert src.record(1).conversations == json.loads(conv[1])
    # Arrow IPC: the file format and the stream format (what Hugging Face datasets writes)
    for name, new in (("f.arrow", pa.ipc.new_file), ("s.arrow", pa.ipc.new_stream)):
        with new(str(tmp_path / name), t.schema) as w:
            for b in t.to_batches(max_chunksize=4):
                w.write_batch(b)
        src = open_source(validate_data_config({**cfg, "path": str(tmp_path / name)}), "train")
        assert len(src) == 10 and src.record(6).images[0].data == imgs[6] and src.record(9).id == "r9"
        assert pickle.loads(pickle.dumps(src)).record(5).conversations == json.loads(conv[5])


# ------------------------------------------------------------------------------------ mixture
def mixture_cfg(tmp_path, weights=(0.7, 0.3), sizes=(10, 1000), **kw):
    entries = []
    for s, (w, n) in enumerate(zip(weights, sizes)):
        f = write_jsonl(tmp_path / f"m{s}.jsonl", [sample(s * 10_000 + i) for i in range(n)])
        entries.append({"weight": w, "source": "llava_json", "path": str(f), "eval_fraction": 0.0})
    return validate_data_config({"source": "mixture", "mixture": entries, **kw})


def test_mixture_order_honours_the_weights_exactly(tmp_path):
    src = open_source(mixture_cfg(tmp_path, weights=(0.7, 0.2, 0.1), sizes=(10, 1000, 7)), "train")
    assert len(src) == 1017
    assert mixture_slots([0.7, 0.2, 0.1], 1017).tolist() == [712, 203, 102]  # largest remainder: sums to 1017
    order = src.order(seed=5)
    index = [order[p] for p in range(3 * 1017)]
    sources = np.searchsorted([0, 10, 1010, 1017], index, side="right") - 1
    for epoch in range(3):  # each epoch: exactly the slots of each source
        assert np.bincount(sources[epoch * 1017:(epoch + 1) * 1017], minlength=3).tolist() == [712, 203, 102]
    # the small source repeats: each of its records equally often; the big one moves on through its records
    small = np.array(index)[sources == 0]
    counts = np.bincount(small, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 3 * 712
    big = np.array(index)[sources == 1] - 10
    assert len(set(big[:609].tolist())) == 609  # 3 epochs x 203 visits: no record twice within its own epoch
    # the k-th visit to a source is that source's own SampleOrder[k]
    assert (small[:25] == [SampleOrder(10, _seed_of(5, 0))[k] for k in range(25)]).all()
    # deterministic for a seed, different for another
    assert [src.order(5)[p] for p in range(500)] == index[:500]
    assert [src.order(6)[p] for p in range(500)] != index[:500]
    r = src.record(1012)
    assert r.id == "20002" and r.where == "mixture[2] llava_json: m2.jsonl: line 3 (id '20002')"
    copy = pickle.loads(pickle.dumps(src))
    assert copy.record(500).id == src.record(500).id == "10490"


def _seed_of(seed, s):
    from mimo_spec.data.sources import _derived_seed

    return _derived_seed(seed, "source", s)


def test_mixture_config_and_errors(tmp_path):
    cfg = mixture_cfg(tmp_path, truncation="truncate", tokenizer="byte", seed=3)
    assert [c.truncation for _, c in cfg.sources()] == ["truncate"] * 2 and cfg.sources()[0][1].seed == 3
    with pytest.raises(ConfigError) as e:
        validate_data_config({"source": "mixture", "mixture": [
            {"weight": 1, "source": "llava_json", "path": "a", "tokenizer": "x"},
            {"weight": 0, "source": "webdataset", "path": "b", "image_resize": "crop"},
            {"source": "parquet", "path": "c", "image_colum": "x"}]})
    text = str(e.value)
    assert "data.mixture[0].tokenizer: shared by every source of the mixture: not set in an entry" in text
    assert "data.mixture[1].weight: input should be greater than 0" in text
    assert "data.mixture[1].image_resize: shared by every source" in text
    assert "data.mixture[2].weight: required in a parquet mixture entry" in text
    assert "data.mixture[2].image_colum: unknown key for a parquet mixture entry (did you mean image_column?)" in text
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].source: must be one of llava_json, webdataset, parquet"):
        validate_data_config({"source": "mixture", "mixture": [{"weight": 1, "source": "json", "path": "a"}]})
    (tmp_path / "empty.jsonl").write_text("\n")
    bad = validate_data_config({"source": "mixture", "mixture": [
        {"weight": 1, "source": "llava_json", "path": str(tmp_path / "m0.jsonl")},
        {"weight": 1, "source": "llava_json", "path": str(tmp_path / "empty.jsonl")}]})
    with pytest.raises(DataError, match=r"data.mixture\[1\]: no records in .*empty.jsonl"):
        open_source(bad, "train")
    bad = validate_data_config({"source": "mixture", "mixture": [
        {"weight": 1, "source": "llava_json", "path": str(tmp_path / "m0.jsonl")},
        {"weight": 1, "source": "parquet", "path": str(tmp_path / "none-*.parquet")}]})
    with pytest.raises(DataError, match=r"data.mixture\[1\].path: no file matches"):
        open_source(bad, "train")
    # the eval split: each entry's own (here eval_fraction of m0, none of m1)
    ev = open_source(validate_data_config({"source": "mixture", "mixture": [
        {"weight": 1, "source": "llava_json", "path": str(tmp_path / "m0.jsonl"), "eval_fraction": 0.2},
        {"weight": 1, "source": "llava_json", "path": str(tmp_path / "m1.jsonl"), "eval_fraction": 0.0}]}), "eval")
    assert len(ev) == 2 and {ev.order(0)[p] for p in range(10)} == {0, 1}


class _Reads(torch.utils.data.Dataset):
    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        try:
            r = self.src.record(i)
        except DataError as e:
            return i, "bad", str(e)[:20]
        return i, r.id, b"".join(m.open().read() if m.exists() else b"" for m in r.images + r.audios)


def test_sources_read_the_same_in_dataloader_workers(tmp_path):
    """Forked workers share the parent's open descriptors: reads must not move each other (os.pread)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d, _ = write_shards(tmp_path)
    write_jsonl(tmp_path / "t.jsonl", [sample(i) for i in range(40)])
    pq.write_table(pa.table({"conversations": [json.dumps([gpt(str(k))]) for k in range(30)],
                             "images": [png_bytes((k, k, k)) for k in range(30)]}), tmp_path / "p.parquet",
                   row_group_size=4)
    for cfg in ({"source": "webdataset", "path": str(d)}, {"source": "llava_json", "path": str(tmp_path / "t.jsonl")},
                {"source": "parquet", "path": str(tmp_path / "p.parquet")}):
        src = open_source(validate_data_config({**cfg, "eval_fraction": 0.0}), "train")
        here = [_Reads(src)[i] for i in range(len(src))]  # the parent opens its files first
        loader = torch.utils.data.DataLoader(_Reads(src), batch_size=None, num_workers=2,
                                             sampler=list(reversed(range(len(src)))) * 3)
        got = list(loader)
        assert [tuple(g) for g in got] == list(reversed(here)) * 3, cfg["source"]


def test_shipped_data_configs_compose(tmp_path):
    from mimo_spec.config import compose_config

    write_jsonl(tmp_path / "a.jsonl", [sample(i) for i in range(20)])
    cases = {"webdataset": "data.path='/d/shard-{0000..0127}.tar'", "parquet": "data.path=/d/x.parquet",
             "mixture": f"data.mixture=[{{weight:3,source:llava_json,path:'{tmp_path / 'a.jsonl'}'}},"
                        "{weight:1,source:webdataset,path:'/d/s-{0..3}.tar'}]"}
    for name, override in cases.items():
        cfg = validate_data_config(compose_config([f"data={name}", override, "seed=4"]).data)
        assert cfg.source == name and cfg.seed == 4 and cfg.template is None
    assert cfg.sources()[1][1].path == "/d/s-{0..3}.tar" and cfg.sources()[0][0] == 3.0
    with pytest.raises(ConfigError, match=r"data.mixture: required for source 'mixture'"):
        validate_data_config(compose_config(["data=mixture"]).data)
