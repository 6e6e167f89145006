"""Janus image generation: mimo-spec's ``generate`` (KV cache, classifier-free guidance) vs transformers'
``JanusForConditionalGeneration.generate(generation_mode="image")``, the same weights, side by side in one run.

A Janus-shaped model with random (perturbed) weights is built in transformers, imported with ``import_hf``, and
both generate one image greedily (``guidance_scale`` 5, as Janus samples) from the same prompt: transformers'
``generate`` + ``decode_image_tokens``, ours ``generate(output_modality="image_gen")`` (which decodes the codes
with the VQ-VAE too). Reported: image tokens (codes) per second of each, the ratio, and whether the codes are
equal (they are in float32; in bfloat16 near-ties may flip).

  python benchmarks/janus_generate.py                      # CPU, a small model (a few seconds)
  python benchmarks/janus_generate.py --device cuda --hidden 2048 --layers 24 --grid 24 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOS, PAD, BOI, EOI, IMG = 1, 0, 101, 102, 100


def build_hf(hidden: int, layers: int, grid: int, codebook: int, seed: int = 0):
    import transformers as tf

    heads = max(1, hidden // 64)
    text = dict(model_type="llama", vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=hidden * 11 // 4,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)
    patch = 16
    vision = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=grid * patch,
                  patch_size=patch, mlp_ratio=2.0, projection_dim=hidden, depth=2, num_image_tokens=grid * grid)
    # the VQ: 2 levels (2x downsampling) keep the decoder small; the code grid is the vision grid
    vq = dict(embed_dim=8, num_embeddings=codebook, latent_channels=64, base_channels=32, channel_multiplier=[1, 2],
              num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden, num_hidden_layers=2)
    config = tf.JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=IMG,
                            tie_word_embeddings=False)
    config.boi_token_id, config.eoi_token_id = BOI, EOI
    torch.manual_seed(seed)
    hf = tf.JanusForConditionalGeneration(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hf.generation_config.bos_token_id, hf.generation_config.pad_token_id = BOS, PAD
    hf.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--grid", type=int, default=8, help="codes per image side (Janus: 24)")
    ap.add_argument("--codebook", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args()

    from mimo_spec.generation import generate
    from mimo_spec.interop import import_hf

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hf = build_hf(args.hidden, args.layers, args.grid, args.codebook)
    _, ours = import_hf(hf, dtype=dtype, device=device)
    ours.eval()
    hf = hf.to(device=device, dtype=dtype)
    hf.config._attn_implementation = "sdpa"
    n = args.grid * args.grid
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 90, (1, args.prompt), generator=g)
    prompt[0, 0] = BOS
    hf_prompt = torch.cat([prompt, torch.tensor([[BOI]])], 1).to(device)
    mask = torch.ones_like(hf_prompt)

    def run_hf():
        with torch.no_grad():
            codes = hf.generate(hf_prompt, attention_mask=mask, generation_mode="image", guidance_scale=args.guidance,
                                do_sample=False, max_new_tokens=n)
            hf.decode_image_tokens(codes)
        return codes[0]

    def run_ours():
        out = generate(ours, prompt.to(device), output_modality="image_gen", guidance_scale=args.guidance,
                       pad_id=PAD, max_new_tokens=n + 2)
        return out.codes["image_gen"][0]

    times = {"transformers": [], "mimo_spec": []}
    codes = {}
    for name, fn in (("transformers", run_hf), ("mimo_spec", run_ours)):
        codes[name] = fn()  # warm-up
        for _ in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "device": str(device), "dtype": args.dtype, "hidden": args.hidden, "layers": args.layers,
        "image_tokens": n, "guidance_scale": args.guidance,
        "transformers_tokens_per_s": round(n / best["transformers"], 1),
        "mimo_spec_tokens_per_s": round(n / best["mimo_spec"], 1),
        "speedup": round(best["transformers"] / best["mimo_spec"], 3),
        "codes_equal": bool(torch.equal(codes["transformers"].cpu(), codes["mimo_spec"].cpu())),
    }
    if not args.json:
        print(f"Janus image generation, {n} codes, guidance {args.guidance}, {args.dtype} on {device} "
              f"(LM {args.layers} x {args.hidden}); best of {args.repeats}, codes + decoded pixels")
        print(f"  transformers generate(generation_mode='image'): {result['transformers_tokens_per_s']:>9} tokens/s")
        print(f"  mimo_spec generate(output_modality=...):        {result['mimo_spec_tokens_per_s']:>9} tokens/s")
        print(f"  speedup {result['speedup']}x; codes equal: {result['codes_equal']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
