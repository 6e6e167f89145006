"""Training-step time and memory of an imported LLaVA-OneVision vs transformers' LlavaOnevisionForConditionalGeneration.

One process, side by side: transformers' model is built from a small LLaVA-OneVision config with random
(perturbed) weights and imported with ``import_hf`` (the same weights). A step is forward + backward + AdamW
step on one batch of 4 rows of 256 tokens holding 5 images of mixed aspect ratios (54x252, 234x126, 162x171,
261x243, 81x72 px: very wide, tall, square, large, small), each tiled by transformers'
LlavaOnevisionImageProcessor (anyres: 90-px tiles, grid pinpoints up to 3x3 tiles, a base tile first; 28
tiles, 742 image tokens): transformers takes the processor's padded 5-D ``pixel_values``, ours the same
images' tiles back to back (the unpadded rows), with the same ``image_sizes``. Both unpad each crop grid
to its image's aspect ratio, shrink grids larger than ``anyres_max_4`` bilinearly and put a learned newline
after each grid row. Before timing, both models' losses on the batch are checked equal (1e-4: the same
computation). The steps are interleaved so machine
noise hits both alike (who goes first alternates); the min and median wall-clock step times are reported,
and the median process CPU time (steadier when other processes share the cores).

Shapes: LM (Qwen2) hidden 256, 4 layers, 4 heads (2 KV), FFN 704, vocab 4096; SigLIP tower width 128,
4 blocks, 4 heads, FFN 512, 90-px tiles with 14-px patches (a 6x6 grid, 6 px unused, as SigLIP-so400m's
384/14); projector 2-layer GELU MLP.

Reports: both models' loss, min / median step time and the ratio ours / HF (of the medians), tokens/s, and
the step's peak memory above what was resident before it (as benchmarks/train_step_vs_hf_qwen2vl.py
measures it: CUDA's max_memory_allocated, or the CPU process's peak resident set). ``--profile`` adds
torch.profiler's top operators (self CPU time) of one step of each. On cores shared with other processes,
``--threads 1`` gives much steadier numbers (two threads then mostly wait for each other).

    .venv/bin/python benchmarks/train_step_vs_hf_llava_onevision.py --steps 5 --threads 2
    .venv/bin/python benchmarks/train_step_vs_hf_llava_onevision.py --steps 10 --threads 1 --profile
    python benchmarks/train_step_vs_hf_llava_onevision.py --device cuda --steps 20 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from mimo_spec.loss import counted_positions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import adamw, alternate, mib, peak_step_memory  # noqa: E402

VOCAB, IMG, VID = 4096, 4000, 4001
SEQ, TILE, PATCH, MAX_TILES = 256, 90, 14, 4
PINS = [[TILE * a, TILE * b] for a in (1, 2, 3) for b in (1, 2, 3)]
# (height, width) px, in token order: very wide (1x3 crops, unpadded rows), tall (3x2, unpadded columns, shrunk),
# square (2x2), large (3x3, shrunk), small (1x1)
IMAGES = [(54, 252), (234, 126), (162, 171), (261, 243), (81, 72)]
ROWS = [[0, 4], [1], [2], [3]]  # the images each row holds


def hf_model():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1)
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, image_size=TILE, patch_size=PATCH, vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=IMG, video_token_index=VID,
                               image_grid_pinpoints=PINS, vision_aspect_ratio=f"anyres_max_{MAX_TILES}",
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(cfg)
    with torch.no_grad():  # no zero biases / unit norms: the loss check then compares real computations
        g = torch.Generator().manual_seed(1)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return hf.train()


def batch():
    """(input_ids, labels, HF's padded pixel_values (N, max tiles, 3, S, S), image_sizes, our tiles, tiles
    per image)."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from mimo_spec.components.vision.anyres import anyres_image_tokens, anyres_tiles

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGES]
    proc = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINS)
    out = proc(images, return_tensors="pt")
    pv, sizes = out["pixel_values"].float(), out["image_sizes"]
    g = TILE // PATCH
    geo = {"tile_size": TILE, "patch_grid": g, "tile_tokens": g * g, "grid_pinpoints": PINS, "unpad": True,
           "newline": True, "max_tiles": MAX_TILES}
    tiles = [anyres_tiles(h, w, geo) for h, w in IMAGES]
    assert pv.shape[1] == max(tiles) and sizes.tolist() == [list(s) for s in IMAGES]
    ours = torch.cat([pv[i, :n] for i, n in enumerate(tiles)])
    counts = [anyres_image_tokens(h, w, geo) for h, w in IMAGES]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 3900, (len(ROWS), SEQ), generator=gen)
    for r, items in enumerate(ROWS):
        pos = 5
        for k in items:
            ids[r, pos:pos + counts[k]] = IMG
            pos += counts[k] + 7
        assert pos < SEQ - 16, (r, pos)
    labels = ids.clone()
    labels[ids == IMG] = -100
    return ids, labels, pv, sizes, ours, tiles


def top_ops(step, n: int = 12) -> str:
    """torch.profiler's top operators (self CPU time) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optimizer", default="fused", choices=["fused", "loop"],
                    help="AdamW on both sides: fused (both trainers' default) or the per-tensor loop")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast for both")
    ap.add_argument("--backend", default="local", choices=["local", "te", "auto"], help="mimo-spec's layers")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step of each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    from mimo_spec.interop import import_hf

    m_hf = hf_model()
    cfg, m_ours = import_hf(m_hf)
    if args.backend != "local":
        from mimo_spec import build_model

        cfg["backend"] = args.backend
        state = m_ours.state_dict()
        m_ours = build_model(cfg)
        m_ours.load_state_dict(state)
    m_ours, m_hf = m_ours.to(dev).train(), m_hf.to(dev).train()
    ids, labels, pv, sizes, tiles_px, tiles = batch()
    ids_d, labels_d, pv_d, tiles_d = (t.to(dev) for t in (ids, labels, pv, tiles_px))
    inputs = {"images": {"vit": {"pixel_values": tiles_d, "image_sizes": sizes}}}  # image_sizes stay on the host
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def loss_ours():
        with amp:
            # the LM head only where the loss counts, as the training step does (mimo_spec.train.step)
            at = counted_positions(labels).to(dev, non_blocking=True)
            return m_ours(ids_d, inputs, labels=labels_d, logits_at=at).loss

    def loss_hf():
        with amp:
            return m_hf(input_ids=ids_d, pixel_values=pv_d, image_sizes=sizes.to(dev), labels=labels_d).loss

    with torch.no_grad():  # the same computation: equal losses before any step
        l_ours, l_hf = float(loss_ours()), float(loss_hf())
    tol = 1e-4 if args.precision == "fp32" else 5e-2
    assert abs(l_ours - l_hf) <= tol, f"losses differ: mimo-spec {l_ours:.6f}, HF {l_hf:.6f}"

    o_ours = adamw(m_ours.parameters(), fused=args.optimizer == "fused")
    o_hf = adamw(m_hf.parameters(), fused=args.optimizer == "fused")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step_ours():
        o_ours.zero_grad(set_to_none=True)
        loss_ours().backward()
        o_ours.step()

    def step_hf():
        o_hf.zero_grad(set_to_none=True)
        loss_hf().backward()
        o_hf.step()

    times, cpu = alternate({"mimo-spec": step_ours, "hf": step_hf}, args.warmup, args.steps, sync)
    peak = {"mimo-spec": peak_step_memory(step_ours, dev), "hf": peak_step_memory(step_hf, dev)}
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    tokens = ids.numel()
    n_ours = sum(p.numel() for p in m_ours.parameters())
    n_hf = sum(p.numel() for p in m_hf.parameters())
    print(f"device={dev} precision={args.precision} backend={m_ours.language_model.backend} threads={args.threads} "
          f"steps={args.steps} batch={tuple(ids.shape)} images={len(IMAGES)} tiles per image={tiles} "
          f"({tiles_px.shape[0]} tiles of {TILE} px, {int((ids == IMG).sum())} image tokens)")
    print(f"loss before training: mimo-spec {l_ours:.6f}  HF {l_hf:.6f}  (|diff| {abs(l_ours - l_hf):.1e})")
    print(f"{'':14s}{'min ms':>10s}{'median ms':>11s}{'CPU ms':>10s}{'tokens/s':>12s}{'step peak memory':>20s}   "
          "params")
    for name, label, n in (("mimo-spec", "mimo-spec", n_ours), ("hf", "HF OneVision", n_hf)):
        print(f"{label:14s}{best[name] * 1000:10.1f}{med[name] * 1000:11.1f}{cpu_med[name] * 1000:10.1f}"
              f"{tokens / med[name]:12.0f}{mib(peak[name]):>20s}   {n:,}")
    print(f"ratio mimo-spec / HF: time {med['mimo-spec'] / med['hf']:.2f}x (median), "
          f"{best['mimo-spec'] / best['hf']:.2f}x (min), CPU time {cpu_med['mimo-spec'] / cpu_med['hf']:.2f}x (median)"
          + (f", peak memory {peak['mimo-spec'] / peak['hf']:.2f}x" if peak["mimo-spec"] and peak["hf"] else ""))
    if args.profile:
        for label, fn in (("mimo-spec", step_ours), ("HF OneVision", step_hf)):
            print(f"\n== {label}: top ops of one step (self CPU time)\n{top_ops(fn)}")


if __name__ == "__main__":
    main()
