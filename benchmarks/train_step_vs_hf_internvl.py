"""Training-step time and memory of an imported InternVL vs transformers' InternVLForConditionalGeneration.

One process, side by side: transformers' model is built from a small InternVL config with random weights
and imported with ``import_hf`` (the same weights). A step is forward + backward + AdamW step on one batch
of 4 rows of 256 tokens holding 5 images of mixed aspect ratios (112x336, 224x112, 100x100, 224x224,
112x224 px), each cut by GotOcr2ImageProcessor(crop_to_patches=True, 112-px tiles, up to 6 tiles + a
thumbnail) as InternVL's processor does: 16 tiles through the vision tower, 16 tokens per tile after the
2x2 pixel shuffle, laid out as ``<img>`` + the tiles' placeholders + ``</img>``. The steps are interleaved
so machine noise hits both alike; the median step time is reported.

Shapes: LM (Qwen2) hidden 256, 4 layers, 4 heads (2 KV), FFN 704, vocab 4096; InternViT width 128,
4 blocks, 4 heads, FFN 512, patch 14, LayerScale, final layernorm; projector LayerNorm + 2-layer MLP.

Reports: both steps' initial loss (equal: the same weights), median step time and the ratio ours / HF,
tokens/s, and the step's peak memory above what was resident before it (as
benchmarks/train_step_vs_hf_qwen2vl.py measures it: CUDA's max_memory_allocated, or the CPU process's
peak resident set).

Measured in one process against the previous code (shared 2-core machine, 1 thread, 15 steps, medians of
process CPU time): text_heavy 0.92x (was 0.94-0.97x), image_heavy 0.91x (was 0.95x). With the head and loss fused
and both sides on fused AdamW (the default): text_heavy 0.87x, 0.89x (1 thread), 0.87x (2 threads); image_heavy
0.89x, 0.94x. The vision tower and
projector already run at HF's speed (81 vs 82 ms); the rest is the LM's GEMMs and AdamW, alike on both sides.

    .venv/bin/python benchmarks/train_step_vs_hf_internvl.py --steps 5 --threads 2
    python benchmarks/train_step_vs_hf_internvl.py --device cuda --steps 20 --precision bf16
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

VOCAB, IMG, START, END = 4096, 4000, 4001, 4002
SEQ, TILE, PATCH = 256, 112, 14
PER_TILE = (TILE // PATCH // 2) ** 2  # 2x2 pixel shuffle: 16 tokens per tile
IMAGES = [(112, 336), (224, 112), (100, 100), (224, 224), (112, 224)]  # (height, width) px, in token order
ROWS = [[0, 1], [2, 3], [4], []]  # the images each row holds (the last row is text only)


def hf_model():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
                bos_token_id=0, eos_token_id=1)
    vision = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  image_size=TILE, patch_size=PATCH, use_mean_pooling=False)
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMG, image_seq_length=PER_TILE,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(cfg).train()


def batch():
    """(input_ids, labels, pixel_values (tiles, 3, 112, 112), tiles per image)."""
    from transformers import GotOcr2ImageProcessorPil

    g = torch.Generator().manual_seed(0)
    proc = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": TILE, "width": TILE}, min_patches=1,
                                    max_patches=6)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in IMAGES]
    out = proc(images, return_tensors="pt")
    tiles = out["num_patches"].tolist()
    ids = torch.randint(0, 3900, (len(ROWS), SEQ), generator=g)
    for r, items in enumerate(ROWS):
        pos = 5
        for k in items:
            n = tiles[k] * PER_TILE
            ids[r, pos] = START
            ids[r, pos + 1:pos + 1 + n] = IMG
            ids[r, pos + 1 + n] = END
            pos += n + 2 + 7
        assert pos < SEQ - 16
    labels = ids.clone()
    labels[(ids == IMG) | (ids == START) | (ids == END)] = -100
    return ids, labels, out["pixel_values"].float(), tiles


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
    ap.add_argument("--shape", default="text_heavy", choices=["text_heavy", "image_heavy"],
                    help="text_heavy: 112-px tiles (16 tokens each), 4x256 tokens, 25%% image placeholders; "
                         "image_heavy: 224-px tiles (64 tokens each), 4x512 tokens, 50%% image placeholders "
                         "(InternVL's real data is image-heavier still: 256 tokens per tile)")
    args = ap.parse_args()
    global TILE, SEQ, PER_TILE
    if args.shape == "image_heavy":
        TILE, SEQ = 224, 512
        PER_TILE = (TILE // PATCH // 2) ** 2
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
    ids, labels, px, tiles = batch()
    ids_d, labels_d, px_d = (t.to(dev) for t in (ids, labels, px))
    o_ours = adamw(m_ours.parameters(), fused=args.optimizer == "fused")
    o_hf = adamw(m_hf.parameters(), fused=args.optimizer == "fused")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    inputs = {"images": {"vit": {"pixel_values": px_d}}}
    losses = {}

    def step_ours():
        o_ours.zero_grad(set_to_none=True)
        with amp:
            # the LM head only where the loss counts, as the training step does (mimo_spec.train.step)
            at = counted_positions(labels).to(dev, non_blocking=True)
            loss = m_ours(ids_d, inputs, labels=labels_d, logits_at=at).loss
        loss.backward()
        o_ours.step()
        losses.setdefault("mimo-spec", float(loss.detach()))

    def step_hf():
        o_hf.zero_grad(set_to_none=True)
        with amp:
            loss = m_hf(input_ids=ids_d, pixel_values=px_d, labels=labels_d).loss
        loss.backward()
        o_hf.step()
        losses.setdefault("hf", float(loss.detach()))

    times, cpu = alternate({"mimo-spec": step_ours, "hf": step_hf}, args.warmup, args.steps, sync)
    peak = {"mimo-spec": peak_step_memory(step_ours, dev), "hf": peak_step_memory(step_hf, dev)}
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = ids.numel()
    n_ours = sum(p.numel() for p in m_ours.parameters())
    n_hf = sum(p.numel() for p in m_hf.parameters())
    print(f"device={dev} precision={args.precision} backend={m_ours.language_model.backend} threads={args.threads} "
          f"steps={args.steps} batch={tuple(ids.shape)} images={len(IMAGES)} tiles per image={tiles} "
          f"({px.shape[0]} tiles of {TILE} px, {int((ids == IMG).sum())} image tokens)")
    print(f"first-step loss: mimo-spec {losses['mimo-spec']:.6f}  HF {losses['hf']:.6f}  "
          f"(|diff| {abs(losses['mimo-spec'] - losses['hf']):.1e})")
    print(f"{'':12s}{'ms/step':>10s}{'tokens/s':>12s}{'step peak memory':>20s}   params")
    for name, label, n in (("mimo-spec", "mimo-spec", n_ours), ("hf", "HF InternVL", n_hf)):
        print(f"{label:12s}{med[name] * 1000:10.1f}{tokens / med[name]:12.0f}{mib(peak[name]):>20s}   {n:,}")
    print(f"ratio mimo-spec / HF: time {med['mimo-spec'] / med['hf']:.2f}x"
          + (f", peak memory {peak['mimo-spec'] / peak['hf']:.2f}x" if peak["mimo-spec"] and peak["hf"] else ""))
    print(f"ratio by process CPU time (steadier on shared cores): "
          f"{statistics.median(cpu['mimo-spec']) / statistics.median(cpu['hf']):.2f}x")


if __name__ == "__main__":
    main()
