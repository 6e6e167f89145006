"""Training-step time and memory of an imported Qwen2-VL vs transformers' Qwen2VLForConditionalGeneration.

One process, side by side: transformers' model is built from a small Qwen2-VL config with random weights
and imported with ``import_hf`` (the same weights). A step is forward + backward + AdamW step on one batch
that mixes image sizes and a video (4 rows of 256 tokens: images of 16x16, 12x12, 8x20, 20x8 and 6x10
patches, a video of 2 frame groups of 8x12 patches; 972 patches through the vision tower, 243 of the
1024 positions are image/video tokens). Our step includes computing the M-RoPE positions from the grids
on the host (the training loop's way); transformers computes them inside its forward. The steps are
interleaved so machine noise hits both alike; the median step time is reported.

Shapes: LM hidden 256, 4 layers, 4 heads (2 KV), FFN 704, vocab 4096, mrope_section [8, 12, 12];
vision tower width 128, 4 blocks, 4 heads, patch 14, temporal patch 2, 2x2 merge.

Reports: both steps' initial loss (equal: the same weights), median step time and the ratio ours / HF,
tokens/s (all positions of the batch per second), and the step's peak memory above what was resident
before it (activations, gradients, temporaries): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after glibc's malloc_trim
returns freed memory), measured on one extra step of each model.

Measured in one process against the previous code (shared 2-core machine, 1 thread, 15 steps, medians of
process CPU time): 0.86-0.88x (was 0.90-0.95x); the vision tower alone 0.81x of HF's. With the head and loss
fused (mimo_spec.loss.linear_cross_entropy) and both sides on fused AdamW (the default; ``--optimizer loop``
for the per-tensor loop): 0.84x, 0.86x at 1 thread, 0.83x at 2 threads (three runs). The next day, on the same
machine running about twice as slow (528 vs 596 ms/step; a loaded host: element-wise passes, which both sides
run alike, took a larger share): 0.94x and 0.88x at 1 thread. The ratio moves with the machine more than
with run-to-run noise. With RMSNorm's hand-written backward (components/layers.py) and 256-row head/loss chunks
(loss.py), 1 thread, 15 steps: 0.82x, 0.82x, 0.83x while the machine ran ~500 ms/step; 0.85x, 0.83x, 0.79x at
1300-1950 ms/step. Later the same day, at 700-2700 ms/step (a 1024^2 GEMM at 46-91 GFLOP/s between runs, fresh
memory written at 0.5-1.3 GB/s: the host's page faults cost ~12 us each), six runs spread from 0.83x to 1.15x:
figures from such phases say nothing; compare runs taken while ``/proc`` shows the machine quiet.
Each run prints the host's speed (a GEMM and a write into fresh memory) before and after the steps.
On 2026-11-30, the host steady and fast (GEMM 74-98 GFLOP/s, fresh writes 1.4-2.0 GB/s), 1 thread: 0.90x and
0.92x (482 vs 525-538 ms/step), 0.93x with glibc's heap trimming off for both: the earlier 0.80-0.85x came
from phases where transformers' allocations page-faulted more. ``--breakdown`` profiles both steps: GEMM 311 vs
358 ms, attention 67 vs 69, AdamW 4 vs 4, the rest 72 vs 99, so ours could not go below 0.72-0.78x even with
no element-wise work at all. With every block under ``torch.compile`` (the layout's ``compile: true``) ours is
0.85x of transformers' eager step and 0.88x of its compiled blocks.
``--shape 2b`` gives the model Qwen2-VL-2B's proportions (vision width / LM width 1280/1536, vision depth /
LM depth 32/28, FFN 5.83x) and image-heavy rows (half the positions image/video tokens, 2,684 patches): the
vision tower is then most of the step. Measured 2026-11-30 (host steady, 1 thread, one run each): small 0.90x
(462 vs 513 ms), 2b 0.95x (2,899 vs 3,066 ms, peak memory 0.91x). The vision tower's work is GEMMs both sides
run alike (transformers' per-item attention costs little at these sizes on the CPU), so a vision-heavy batch
moves the ratio towards 1, not below 0.85x.

On one H200 (2026-11-30, torch 2.11, bf16 autocast, ``--shape 2b-gpu --steps 20``): 133.2 vs 166.7 ms/step
(0.80x), 61.5k vs 49.2k tokens/s, step peak 14.8 vs 24.9 GiB (0.59x). The first run there gave 1.40x: the fused
head's chunks were ~100 rows of the 151,936-token vocabulary and its weight gradient summed by fp32 GEMMs;
``--breakdown`` (kernel time per op on a GPU) showed it as 31 ms of ``addmm_``.

    .venv/bin/python benchmarks/train_step_vs_hf_qwen2vl.py --steps 5 --threads 2
    python benchmarks/train_step_vs_hf_qwen2vl.py --device cuda --steps 20
    python benchmarks/train_step_vs_hf_qwen2vl.py --device cuda --precision bf16 --shape 2b-gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from mimo_spec.loss import counted_positions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import (adamw, alternate, breakdown, host_speed, mib, peak_step_memory, print_breakdown,  # noqa: E402
                         print_device_profile)

VOCAB, IMG, VID, VSTART, VEND = 4096, 4000, 4001, 4002, 4003
MERGE = 2
# (t, h, w) patch grids of the images and videos, in token order; each row: the items it holds, in order
# ("i", k) = image k, ("v", k) = video k
SHAPES = {
    # the original toy: a vision tower half the LM's width, a quarter of the positions image/video tokens
    "small": dict(seq=256, lm=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2),
                  vision=dict(depth=4, embed_dim=128, mlp_ratio=4, num_heads=4),
                  images=[(1, 16, 16), (1, 12, 12), (1, 8, 20), (1, 20, 8), (1, 6, 10)], videos=[(2, 8, 12)],
                  rows=[[("i", 0), ("i", 1)], [("i", 2), ("v", 0)], [("i", 3)], [("i", 4)]]),
    # Qwen2-VL-2B's proportions scaled down: vision width / LM width 1280/1536, vision depth / LM depth 32/28,
    # FFN 5.83x the LM width, head dims 80 (vision) and 64, and half the positions image/video tokens, as in
    # the image-heavy SFT batches such models train on (the vision tower is then most of the step, as there)
    "2b": dict(seq=320, lm=dict(hidden_size=384, intermediate_size=2240, num_hidden_layers=4, num_attention_heads=6,
                                num_key_value_heads=2),
               vision=dict(depth=5, embed_dim=320, mlp_ratio=4, num_heads=4),
               images=[(1, 20, 20), (1, 16, 24), (1, 24, 16), (1, 28, 20), (1, 12, 36), (1, 10, 14)],
               videos=[(2, 12, 16)],
               rows=[[("i", 0), ("i", 1)], [("i", 2), ("v", 0)], [("i", 3)], [("i", 4), ("i", 5)]]),
    # Qwen2-VL-2B itself at a quarter of its depth (vision 1280 wide, 8 of 32 blocks, 16 heads; LM 1536 wide,
    # 7 of 28 layers, 12 heads, 2 KV, FFN 8960, its 151,936-token vocabulary and mrope_section [16, 24, 24]),
    # images of 448x448 to 896x672 pixels and a 4-frame-group video in rows of 2,048 tokens: a GPU-sized step
    "2b-gpu": dict(seq=2048, vocab=151936, mrope=[16, 24, 24],
                   lm=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=7, num_attention_heads=12,
                           num_key_value_heads=2),
                   vision=dict(depth=8, embed_dim=1280, mlp_ratio=4, num_heads=16),
                   images=[(1, 32, 32), (1, 46, 34), (1, 34, 46), (1, 64, 48), (1, 28, 40), (1, 20, 20)],
                   videos=[(4, 24, 32)],
                   rows=[[("i", 0), ("i", 1)], [("i", 2), ("v", 0)], [("i", 3)], [("i", 4), ("i", 5)]]),
}


def hf_model(shape: dict):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=shape.get("vocab", VOCAB), **shape["lm"], max_position_embeddings=max(1024, shape["seq"]),
                rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "mrope_section": shape.get("mrope", [8, 12, 12]),
                                 "rope_theta": 1000000.0})
    vision = dict(**shape["vision"], hidden_size=shape["lm"]["hidden_size"], patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=MERGE)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID,
                        vision_start_token_id=VSTART, vision_end_token_id=VEND, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).train()


def batch(shape: dict):
    """(input_ids, labels, mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)."""
    g = torch.Generator().manual_seed(0)
    patch = 3 * 2 * 14 * 14
    seq, images, videos = shape["seq"], shape["images"], shape["videos"]
    ids = torch.randint(0, 3900, (len(shape["rows"]), seq), generator=g)
    for r, items in enumerate(shape["rows"]):
        pos = 5
        for kind, k in items:
            t, h, w = (images if kind == "i" else videos)[k]
            n = t * h * w // MERGE**2
            ids[r, pos] = VSTART
            ids[r, pos + 1:pos + 1 + n] = IMG if kind == "i" else VID
            ids[r, pos + 1 + n] = VEND
            pos += n + 2 + 7
        assert pos < seq - 16
    labels = ids.clone()
    labels[(ids == IMG) | (ids == VID) | (ids == VSTART) | (ids == VEND)] = -100
    types = torch.zeros_like(ids)
    types[ids == IMG], types[ids == VID] = 1, 2
    grid = torch.tensor(images)
    vgrid = torch.tensor(videos)
    px = torch.randn(int(grid.prod(1).sum()), patch, generator=g)
    pxv = torch.randn(int(vgrid.prod(1).sum()), patch, generator=g)
    return ids, labels, types, px, grid, pxv, vgrid


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
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES),
                    help="small: the original toy; 2b: Qwen2-VL-2B's vision/LM proportions, image-heavy rows; "
                         "2b-gpu: Qwen2-VL-2B's widths at a quarter of its depth, rows of 2,048 tokens (a GPU)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile both steps: GEMM, attention, optimizer and the rest, and the ratio's floor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    from mimo_spec.interop import import_hf

    shape = SHAPES[args.shape]
    m_hf = hf_model(shape)
    cfg, m_ours = import_hf(m_hf)
    if args.backend != "local":
        from mimo_spec import build_model

        cfg["backend"] = args.backend
        state = m_ours.state_dict()
        m_ours = build_model(cfg)
        m_ours.load_state_dict(state)
    m_ours, m_hf = m_ours.to(dev).train(), m_hf.to(dev).train()
    ids, labels, types, px, grid, pxv, vgrid = batch(shape)
    ids_d, labels_d, types_d, px_d, pxv_d = (t.to(dev) for t in (ids, labels, types, px, pxv))
    o_ours = adamw(m_ours.parameters(), fused=args.optimizer == "fused")
    o_hf = adamw(m_hf.parameters(), fused=args.optimizer == "fused")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    host_inputs = {"images": {"vit": {"pixel_values": px, "image_grid_thw": grid}},
                   "videos": {"vit": {"pixel_values_videos": pxv, "video_grid_thw": vgrid}}}
    dev_inputs = {"images": {"vit": {"pixel_values": px_d, "image_grid_thw": grid}},       # grids stay on the host
                  "videos": {"vit": {"pixel_values_videos": pxv_d, "video_grid_thw": vgrid}}}
    losses = {}

    def step_ours():
        o_ours.zero_grad(set_to_none=True)
        pos = m_ours.position_ids(ids, host_inputs).to(dev, non_blocking=True)  # on the host, as the loop does
        with amp:
            # the LM head only where the loss counts, as the training step does (mimo_spec.train.step)
            at = counted_positions(labels).to(dev, non_blocking=True)
            loss = m_ours(ids_d, dev_inputs, position_ids=pos, labels=labels_d, logits_at=at).loss
        loss.backward()
        o_ours.step()
        losses.setdefault("mimo-spec", float(loss.detach()))

    def step_hf():
        o_hf.zero_grad(set_to_none=True)
        with amp:
            loss = m_hf(input_ids=ids_d, mm_token_type_ids=types_d, pixel_values=px_d, image_grid_thw=grid.to(dev),
                        pixel_values_videos=pxv_d, video_grid_thw=vgrid.to(dev), labels=labels_d).loss
        loss.backward()
        o_hf.step()
        losses.setdefault("hf", float(loss.detach()))

    before = host_speed() if dev.type == "cpu" else None
    times, cpu = alternate({"mimo-spec": step_ours, "hf": step_hf}, args.warmup, args.steps, sync)
    if before:
        print(f"{before} before the steps; after: {host_speed()[6:]}")
    peak = {"mimo-spec": peak_step_memory(step_ours, dev), "hf": peak_step_memory(step_hf, dev)}
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = ids.numel()
    n_ours = sum(p.numel() for p in m_ours.parameters())
    n_hf = sum(p.numel() for p in m_hf.parameters())
    print(f"device={dev} precision={args.precision} backend={m_ours.language_model.backend} threads={args.threads} "
          f"steps={args.steps} shape={args.shape} batch={tuple(ids.shape)} images={len(grid)} videos={len(vgrid)} "
          f"vision patches={px.shape[0] + pxv.shape[0]}")
    print(f"first-step loss: mimo-spec {losses['mimo-spec']:.6f}  HF {losses['hf']:.6f}  "
          f"(|diff| {abs(losses['mimo-spec'] - losses['hf']):.1e})")
    print(f"{'':12s}{'ms/step':>10s}{'tokens/s':>12s}{'step peak memory':>20s}   params")
    for name, label, n in (("mimo-spec", "mimo-spec", n_ours), ("hf", "HF Qwen2-VL", n_hf)):
        print(f"{label:12s}{med[name] * 1000:10.1f}{tokens / med[name]:12.0f}{mib(peak[name]):>20s}   {n:,}")
    print(f"ratio mimo-spec / HF: time {med['mimo-spec'] / med['hf']:.2f}x"
          + (f", peak memory {peak['mimo-spec'] / peak['hf']:.2f}x" if peak["mimo-spec"] and peak["hf"] else ""))
    print(f"ratio by process CPU time (steadier on shared cores): "
          f"{statistics.median(cpu['mimo-spec']) / statistics.median(cpu['hf']):.2f}x")
    if args.breakdown:
        steps = {"mimo-spec": step_ours, "HF Qwen2-VL": step_hf}
        print_device_profile(steps) if dev.type == "cuda" else print_breakdown(breakdown(steps))


if __name__ == "__main__":
    main()
