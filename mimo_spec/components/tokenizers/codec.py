"""Neural audio codecs: transformers' EncodecModel and DacModel, built from YAML params (mono audio).

A batch of clips ``(N, samples)`` (float waveform at ``sampling_rate``, roughly in [-1, 1]) becomes
``(N, K, T)`` int64 codes: K residual-VQ codebooks, T = ``num_frames(samples)`` frames; ``decode`` maps
codes back to ``(N, samples')`` waveforms (samples' = T * hop_length, at least the input's length; cut it
to the original length if needed). As for the image VQs, the Hugging Face model's children are this
module's own, so the state-dict keys are exactly transformers' (``interop/hf_tokenizers.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mimo_spec.components.tokenizers.vq import HFTokenizerBase, _transformers
from mimo_spec.errors import InputError, ParamError
from mimo_spec.registry import register


class _AudioCodec(HFTokenizerBase):
    item_kind = "audio"

    def _check_audio(self, x: Any, name: str = "audio") -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected (N, samples) float waveforms, got {got}", path=name,
                             hint="mono audio at the codec's sampling_rate, one clip per row")
        if x.shape[1] < self.hop_length:
            raise InputError(f"clips of {x.shape[1]} samples are shorter than one code frame "
                             f"({self.hop_length} samples)", path=name)
        return x

    def _check_codes(self, codes: Any, name: str = "codes") -> torch.Tensor:
        if (not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.shape[1] != self.num_codebooks
                or codes.is_floating_point()):
            got = f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise InputError(f"expected (N, {self.num_codebooks}, frames) integer codes, got {got}", path=name)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise InputError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, "
                             f"{int(codes.max())}]", path=name)
        return codes.long()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, samples) waveforms -> (N, num_codebooks, num_frames(samples)) int64 codes (on the codec's device)."""
        x = self._check_audio(x)
        p = next(self.parameters())
        return self._encode(x.to(device=p.device, dtype=p.dtype)[:, None, :]).long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, num_codebooks, T) codes -> (N, T * hop_length) waveforms, in the codec's dtype."""
        return self._decode(self._check_codes(codes).to(next(self.parameters()).device))

    def example_targets(self, num_items: int, generator: torch.Generator | None = None,
                        num_samples: int | None = None) -> torch.Tensor:
        """Random clips in [-0.5, 0.5], ``num_samples`` long (default: 8 code frames)."""
        n = num_samples or 8 * self.hop_length
        return torch.rand(num_items, n, generator=generator) - 0.5


@register("tokenizer", "encodec")
class Encodec(_AudioCodec):
    """EnCodec (transformers' EncodecModel), mono, 24 kHz layout: residual-VQ codes at ``bandwidth``.

    The whole clip is encoded at once, without normalisation; ``bandwidth`` (kbps) picks the number of
    codebooks K = floor(bandwidth * 1000 / (log2(codebook_size) * frame_rate)) (2 at 1.5 kbps for encodec_24khz).

    Args:
        sampling_rate: samples per second of the audio (24000).
        bandwidth: the bandwidth (kbps) the codes are made at; one of target_bandwidths (1.5).
        target_bandwidths: the bandwidths the model supports; the largest sets how many codebooks it holds.
        hidden_size: width of the latent frames (128).
        num_filters: channels of the first convolution (32).
        num_residual_layers: residual layers per down/upsampling block (1).
        upsampling_ratios: the decoder's upsampling factors; the encoder downsamples by the same in reverse,
            hop_length = their product ([8, 5, 4, 2]).
        norm_type: "weight_norm" or "time_group_norm" (weight_norm).
        kernel_size: kernel of the first convolution (7).
        last_kernel_size: kernel of the last convolution (7).
        residual_kernel_size: kernel of the residual layers (3).
        dilation_growth_rate: dilation growth per residual layer (2).
        use_causal_conv: causal (left-padded) convolutions (true).
        pad_mode: padding of the convolutions ("reflect").
        compress: reduction of the residual branches' width (2).
        num_lstm_layers: LSTM layers after the encoder's / before the decoder's convolutions (2).
        trim_right_ratio: share of the transposed convolutions' padding trimmed on the right (1.0).
        codebook_size: codes per codebook (1024).
        codebook_dim: width of a codebook vector (default hidden_size).
        use_conv_shortcut: a convolution (rather than the identity) on the residual shortcut (true).
    """

    def __init__(self, sampling_rate: int = 24000, bandwidth: float = 1.5,
                 target_bandwidths: list[float] = (1.5, 3.0, 6.0, 12.0, 24.0), hidden_size: int = 128,
                 num_filters: int = 32, num_residual_layers: int = 1, upsampling_ratios: list[int] = (8, 5, 4, 2),
                 norm_type: str = "weight_norm", kernel_size: int = 7, last_kernel_size: int = 7,
                 residual_kernel_size: int = 3, dilation_growth_rate: int = 2, use_causal_conv: bool = True,
                 pad_mode: str = "reflect", compress: int = 2, num_lstm_layers: int = 2,
                 trim_right_ratio: float = 1.0, codebook_size: int = 1024, codebook_dim: int | None = None,
                 use_conv_shortcut: bool = True):
        super().__init__()
        target_bandwidths = [float(b) for b in target_bandwidths]
        if float(bandwidth) not in target_bandwidths:
            raise ParamError("bandwidth", f"bandwidth {bandwidth} is not one of target_bandwidths {target_bandwidths}")
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ParamError("codebook_size", f"codebook_size must be a power of 2, got {codebook_size}")
        tf = _transformers()
        config = tf.EncodecConfig(
            target_bandwidths=target_bandwidths, sampling_rate=sampling_rate, audio_channels=1, normalize=False,
            chunk_length_s=None, overlap=None, hidden_size=hidden_size, num_filters=num_filters,
            num_residual_layers=num_residual_layers, upsampling_ratios=[int(r) for r in upsampling_ratios],
            norm_type=norm_type, kernel_size=kernel_size, last_kernel_size=last_kernel_size,
            residual_kernel_size=residual_kernel_size, dilation_growth_rate=dilation_growth_rate,
            use_causal_conv=use_causal_conv, pad_mode=pad_mode, compress=compress, num_lstm_layers=num_lstm_layers,
            trim_right_ratio=trim_right_ratio, codebook_size=codebook_size, codebook_dim=codebook_dim,
            use_conv_shortcut=use_conv_shortcut)
        self.sampling_rate, self.bandwidth, self.codebook_size = sampling_rate, float(bandwidth), codebook_size
        self.hop_length = config.hop_length
        self.num_codebooks = max(1, math.floor(self.bandwidth * 1000 / (math.log2(codebook_size) * config.frame_rate)))
        if self.num_codebooks > config.num_quantizers:
            raise ParamError("bandwidth", f"bandwidth {bandwidth} needs {self.num_codebooks} codebooks; the model "
                             f"holds {config.num_quantizers}")
        self._adopt(tf.EncodecModel(config))

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a clip of ``num_samples`` samples: ceil(num_samples / hop_length)."""
        return -(-int(num_samples) // self.hop_length)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model.encode(x, bandwidth=self.bandwidth, return_dict=True).audio_codes[0]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.hf_model.decode(codes[None], [None], return_dict=True).audio_values[:, 0]


@register("tokenizer", "dac")
class Dac(_AudioCodec):
    """DAC, the Descript Audio Codec (transformers' DacModel): ``num_codebooks`` residual codebooks.

    Factorised (low-dimensional, L2-normalised) codes; hop_length = product of downsampling_ratios (512 for
    dac_16khz: 12 codebooks; dac_44khz: 9).

    Args:
        sampling_rate: samples per second of the audio (16000).
        encoder_hidden_size: channels of the encoder's first convolution, doubled at each downsampling (64).
        downsampling_ratios: the encoder's strides ([2, 4, 8, 8]); the decoder upsamples in reverse.
        decoder_hidden_size: channels of the decoder's first convolution (1536).
        num_codebooks: residual codebooks (n_codebooks; 12 in dac_16khz).
        codebook_size: codes per codebook (1024).
        codebook_dim: width of a (factorised) codebook vector (8).
    """

    def __init__(self, sampling_rate: int = 16000, encoder_hidden_size: int = 64,
                 downsampling_ratios: list[int] = (2, 4, 8, 8), decoder_hidden_size: int = 1536,
                 num_codebooks: int = 12, codebook_size: int = 1024, codebook_dim: int = 8):
        super().__init__()
        tf = _transformers()
        self.downsampling_ratios = [int(r) for r in downsampling_ratios]
        if not self.downsampling_ratios or min(self.downsampling_ratios) < 1:
            raise ParamError("downsampling_ratios", f"expected positive strides, got {downsampling_ratios}")
        config = tf.DacConfig(
            encoder_hidden_size=encoder_hidden_size, downsampling_ratios=self.downsampling_ratios,
            decoder_hidden_size=decoder_hidden_size, n_codebooks=num_codebooks, codebook_size=codebook_size,
            codebook_dim=codebook_dim, sampling_rate=sampling_rate)
        self.sampling_rate, self.codebook_size, self.num_codebooks = sampling_rate, codebook_size, num_codebooks
        self.hop_length = config.hop_length
        self._adopt(tf.DacModel(config))

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a clip of ``num_samples`` samples (each stride-s block: floor((L + 2 ceil(s/2) -
        2s) / s) + 1; num_samples / hop_length when it divides)."""
        n = int(num_samples)
        for s in self.downsampling_ratios:
            n = (n + 2 * math.ceil(s / 2) - 2 * s) // s + 1
        return n

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf_model.encode(x, return_dict=True).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.hf_model.decode(audio_codes=codes, return_dict=True).audio_values


@register("tokenizer", "mimi")
class Mimi(_AudioCodec):
    """Mimi (transformers' MimiModel; Kyutai's codec in Moshi, Sesame's CSM): split residual-VQ codes.

    A SEANet convolutional encoder, a small transformer, 2x downsampling to ``frame_rate`` (12.5 Hz at
    24 kHz), and a split residual VQ (the first ``num_semantic_quantizers`` codebooks semantic, the rest
    acoustic); the decoder mirrors it.
    ``num_codebooks`` of the ``num_quantizers`` held are used (CSM: 32; Moshi: 8).

    Args:
        sampling_rate: samples per second of the audio (24000).
        num_codebooks: codebooks used to encode (default all num_quantizers).
        num_quantizers: residual codebooks held (32).
        num_semantic_quantizers: of them, the semantic ones (1).
        codebook_size: codes per codebook (2048).
        codebook_dim: width of a codebook vector (256).
        vector_quantization_hidden_dimension: the quantizer's inner width (256).
        hidden_size: width of the latent frames and the transformers (512).
        num_filters: channels of the first convolution (64).
        num_residual_layers: residual layers per down/upsampling block (1).
        upsampling_ratios: the decoder's upsampling factors ([8, 6, 5, 4]); the encoder's in reverse.
        kernel_size: kernel of the first convolution (7).
        last_kernel_size: kernel of the last convolution (3).
        residual_kernel_size: kernel of the residual layers (3).
        dilation_growth_rate: dilation growth per residual layer (2).
        use_causal_conv: causal convolutions (true).
        pad_mode: padding of the convolutions ("constant").
        compress: reduction of the residual branches' width (2).
        trim_right_ratio: share of the transposed convolutions' padding trimmed on the right (1.0).
        use_conv_shortcut: a convolution on the residual shortcut (false).
        upsample_groups: groups of the frame-rate up/downsampling convolutions (512).
        num_hidden_layers: layers of the encoder's and the decoder's transformer (8).
        intermediate_size: MLP width of those transformers (2048).
        num_attention_heads: their attention heads (8).
        num_key_value_heads: their key/value heads (8).
        head_dim: their head width (default hidden_size / num_attention_heads).
        hidden_act: their MLP activation ("gelu").
        max_position_embeddings: their longest sequence (8000).
        norm_eps: their LayerNorm epsilon (1e-5).
        sliding_window: their attention window (250).
        layer_scale_initial_scale: initial LayerScale of their residual branches (0.01).
        attention_bias: biases on their attention projections (false).
        rope_theta: their rotary base (10000).
    """

    def __init__(self, sampling_rate: int = 24000, num_codebooks: int | None = None, num_quantizers: int = 32,
                 num_semantic_quantizers: int = 1, codebook_size: int = 2048, codebook_dim: int = 256,
                 vector_quantization_hidden_dimension: int = 256, hidden_size: int = 512, num_filters: int = 64,
                 num_residual_layers: int = 1, upsampling_ratios: list[int] = (8, 6, 5, 4), kernel_size: int = 7,
                 last_kernel_size: int = 3, residual_kernel_size: int = 3, dilation_growth_rate: int = 2,
                 use_causal_conv: bool = True, pad_mode: str = "constant", compress: int = 2,
                 trim_right_ratio: float = 1.0, use_conv_shortcut: bool = False, upsample_groups: int = 512,
                 num_hidden_layers: int = 8, intermediate_size: int = 2048, num_attention_heads: int = 8,
                 num_key_value_heads: int = 8, head_dim: int | None = None, hidden_act: str = "gelu",
                 max_position_embeddings: int = 8000, norm_eps: float = 1e-5, sliding_window: int = 250,
                 layer_scale_initial_scale: float = 0.01, attention_bias: bool = False, rope_theta: float = 10000.0):
        super().__init__()
        k = num_quantizers if num_codebooks is None else int(num_codebooks)
        if not num_semantic_quantizers <= k <= num_quantizers or k < 1:
            raise ParamError("num_codebooks", f"num_codebooks ({k}) must lie in [max(1, num_semantic_quantizers "
                             f"= {num_semantic_quantizers}), num_quantizers = {num_quantizers}]")
        tf = _transformers()
        try:
            config = tf.MimiConfig(
                sampling_rate=sampling_rate, audio_channels=1, hidden_size=hidden_size, num_filters=num_filters,
                num_residual_layers=num_residual_layers, upsampling_ratios=[int(r) for r in upsampling_ratios],
                kernel_size=kernel_size, last_kernel_size=last_kernel_size, residual_kernel_size=residual_kernel_size,
                dilation_growth_rate=dilation_growth_rate, use_causal_conv=use_causal_conv, pad_mode=pad_mode,
                compress=compress, trim_right_ratio=trim_right_ratio, codebook_size=codebook_size,
                codebook_dim=codebook_dim, num_quantizers=num_quantizers, use_conv_shortcut=use_conv_shortcut,
                vector_quantization_hidden_dimension=vector_quantization_hidden_dimension,
                num_semantic_quantizers=num_semantic_quantizers, upsample_groups=upsample_groups,
                num_hidden_layers=num_hidden_layers, intermediate_size=intermediate_size,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                hidden_act=hidden_act, max_position_embeddings=max_position_embeddings, norm_eps=norm_eps,
                sliding_window=sliding_window, layer_scale_initial_scale=layer_scale_initial_scale,
                attention_bias=attention_bias,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)})
        except ValueError as e:  # transformers' own checks (codebook_size a power of 2, ...)
            raise ParamError("module", f"transformers refuses this Mimi: {e}") from None
        config._attn_implementation = "eager"
        self.sampling_rate, self.codebook_size, self.num_codebooks = sampling_rate, codebook_size, k
        self.hop_length = config.frame_size
        self._adopt(tf.MimiModel(config))

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a clip of ``num_samples`` samples (transformers' get_encoded_length)."""
        return int(self.hf_model.get_encoded_length(int(num_samples)))

    def _fresh_codebooks(self) -> None:
        """transformers caches each codebook (embed_sum / cluster_usage) at first use: after a load or a move
        to another device or dtype that cache is stale, so it is dropped before every call (cheap)."""
        for m in self.modules():
            if hasattr(m, "_embed") and hasattr(m, "embed_sum"):
                m._embed = None

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self._fresh_codebooks()
        return self.hf_model.encode(x, num_quantizers=self.num_codebooks).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        self._fresh_codebooks()
        return self.hf_model.decode(codes).audio_values[:, 0]
