"""Discrete tokenizers (kind ``tokenizer``): items (images, audio clips) <-> integer codes.

Every tokenizer is a frozen ``nn.Module`` (no parameter takes gradients; ``encode`` / ``decode`` run
without autograd) with ``item_kind``, ``codebook_size``, ``num_codebooks``, ``encode(x) -> codes``,
``decode(codes) -> x`` and ``example_targets(num_items, generator)``:

- images (``vq``: ``janus_vq``, ``chameleon_vq``, ``emu3_vq``): ``(N, C, H, W)`` -> ``(N, T)`` int64, row-major
  over the ``grid`` (h, w) of ``num_tokens`` codes; ``image_size`` is the square input side.
- audio (``codec``: ``encodec``, ``mimi``, ``dac``): ``(N, samples)`` -> ``(N, K, T)`` int64 (K codebooks);
  ``sampling_rate`` and ``num_frames(num_samples)``.

The neural tokenizers are transformers' own classes, built from explicit parameters; their state-dict
keys are those classes' keys, so Hugging Face weights load as they are (``interop/hf_tokenizers.py``).
"""
