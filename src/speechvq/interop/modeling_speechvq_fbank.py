"""transformers classes for speechvq's log-mel (``fbank``) wav2vec 2.0 models.

This file is self-contained (torch and transformers only): ``speechvq convert --to hf`` copies it
into the export, whose ``config.json`` names it in ``auto_map``, so that anyone can load the model
without speechvq::

    from transformers import AutoModel
    model = AutoModel.from_pretrained("export_dir", trust_remote_code=True)
    out = model(waveforms, attention_mask=mask, output_hidden_states=True)

With speechvq installed, ``import speechvq.interop.hf_fbank`` registers the classes with
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCTC``, and ``from_pretrained`` needs no
``trust_remote_code``. transformers has no native architecture with this front end (its
Wav2Vec2-BERT takes log-mel frames, but computed differently and feeding a Conformer), hence the
custom classes. Parameter names are those of transformers' ``Wav2Vec2Model`` / ``Wav2Vec2ForCTC``.

The front end is speechvq's ``FbankFeatureEncoder``: 25 ms periodic-Hann windows every 10 ms,
``|rfft|^2`` through HTK mel filters (no area normalisation), natural log with a floor, normalised
per utterance (mean and variance per channel over its valid frames) and stacked ``fbank_stack``
frames at a time. The Transformer is wav2vec 2.0's (post-LN, or pre-LN with
``do_stable_layer_norm``), with its convolutional positional embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, Wav2Vec2Config
from transformers.utils import ModelOutput


class SpeechvqFbankConfig(Wav2Vec2Config):
    """``Wav2Vec2Config`` plus the log-mel front end: ``num_mel_bins`` channels, ``fbank_stack``
    frames stacked per output frame, ``sampling_rate``, ``fbank_min_hz``, ``fbank_floor``, and
    ``normalize_waveform`` (zero mean, unit variance per utterance first, ``normalize_eps``)."""

    model_type = "speechvq-fbank-wav2vec2"

    def __init__(
        self,
        num_mel_bins: int = 80,
        fbank_stack: int = 2,
        sampling_rate: int = 16000,
        fbank_min_hz: float = 20.0,
        fbank_floor: float = 1e-10,
        normalize_waveform: bool = False,
        normalize_eps: float = 1e-7,
        **kwargs,
    ) -> None:
        self.normalize_waveform = normalize_waveform
        self.normalize_eps = normalize_eps
        self.num_mel_bins = num_mel_bins
        self.fbank_stack = fbank_stack
        self.sampling_rate = sampling_rate
        self.fbank_min_hz = fbank_min_hz
        self.fbank_floor = fbank_floor
        super().__init__(**kwargs)


def _mel_filters(num_bins: int, num_mels: int, rate: int, min_hz: float, max_hz: float) -> Tensor:
    """``[num_bins, num_mels]`` triangular HTK-mel filters without area normalisation (on the CPU)."""

    def hz_to_mel(hz: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: Tensor) -> Tensor:
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)

    cpu = torch.device("cpu")  # also while transformers builds the model on its meta device
    lo = hz_to_mel(torch.tensor(min_hz, dtype=torch.float64, device=cpu))
    hi = hz_to_mel(torch.tensor(max_hz, dtype=torch.float64, device=cpu))
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), num_mels + 2, dtype=torch.float64, device=cpu))
    bins = torch.linspace(0.0, rate / 2.0, num_bins, dtype=torch.float64, device=cpu)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - left[None, :]) / (centre - left)[None, :]
    falling = (right[None, :] - bins[:, None]) / (right - centre)[None, :]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class SpeechvqFbankFrontEnd(nn.Module):
    """Waveforms ``[B, S]`` -> normalised, stacked log-mel frames ``[B, T, num_mel_bins * stack]``."""

    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        rate = config.sampling_rate
        self.stack, self.floor = config.fbank_stack, config.fbank_floor
        self.window_length, self.hop = round(0.025 * rate), round(0.010 * rate)
        self.fft_length = 2 ** math.ceil(math.log2(self.window_length))
        self.mel_args = (self.fft_length // 2 + 1, config.num_mel_bins, rate, config.fbank_min_hz, rate / 2)
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(periodic Hann window ``[W]``, mel filters ``[F, M]``) on ``device``, made on first use
        (buffers would be created on transformers' meta device and never filled)."""
        if device not in self._constants:
            window = torch.hann_window(self.window_length, periodic=True, device=torch.device("cpu"))
            self._constants[device] = (window.to(device), _mel_filters(*self.mel_args).to(device))
        return self._constants[device]

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` output frames."""
        frames = (torch.div(lengths - self.window_length, self.hop, rounding_mode="floor") + 1).clamp(min=0)
        return torch.div(frames, self.stack, rounding_mode="floor")

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        window, filters = self.constants(waveforms.device)
        frames = waveforms.float().unfold(1, self.window_length, self.hop)  # (B, S) -> (B, N, W)
        spectrum = torch.fft.rfft(frames * window, n=self.fft_length).abs().pow(2)  # (B, N, F)
        mel = torch.log(torch.clamp(spectrum @ filters, min=self.floor))  # (B, N, M)
        n = (torch.div(lengths - self.window_length, self.hop, rounding_mode="floor") + 1).clamp(min=0)
        valid = (torch.arange(mel.size(1), device=mel.device)[None, :] < n[:, None]).to(mel.dtype)[..., None]
        count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = (mel * valid).sum(dim=1, keepdim=True) / count
        var = (((mel - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
        normed = (mel - mean) * torch.rsqrt(var + 1e-5) * valid
        out_frames = mel.size(1) // self.stack
        # (B, N, M) -> (B, T, M * stack)
        stacked = normed[:, : out_frames * self.stack].reshape(mel.size(0), out_frames, -1)
        keep = torch.arange(out_frames, device=mel.device)[None, :] < self.output_lengths(lengths)[:, None]
        return stacked * keep[..., None].to(stacked.dtype)


def _normalize(x: Tensor, lengths: Tensor, eps: float) -> Tensor:
    """Zero mean, unit (population) variance per utterance over its valid samples; padding 0."""
    x = x.float()
    valid = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    count = valid.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(-1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * valid


class FeatureProjection(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        dim = config.num_mel_bins * config.fbank_stack
        self.layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.projection = nn.Linear(dim, config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.projection(self.layer_norm(x)))


class PositionalConvEmbedding(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        k = config.num_conv_pos_embeddings
        conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            k,
            padding=k // 2,
            groups=config.num_conv_pos_embedding_groups,
        )
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove_last = k % 2 == 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))  # (B, T, D) -> (B, D, T')
        if self.remove_last:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout_p = config.attention_dropout

    def forward(self, x: Tensor, attend: Tensor | None) -> Tensor:
        batch, frames, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, frames, self.heads, dim // self.heads).transpose(1, 2)  # (B, H, T, D/H)

        y = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), attn_mask=attend,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2).reshape(batch, frames, dim))


class FeedForward(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_dropout(
            self.output_dense(self.intermediate_dropout(F.gelu(self.intermediate_dense(x))))
        )


class EncoderLayer(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pre_ln = config.do_stable_layer_norm

    def forward(self, x: Tensor, attend: Tensor | None) -> Tensor:
        if self.pre_ln:
            x = x + self.dropout(self.attention(self.layer_norm(x), attend))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attend)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.pre_ln = config.do_stable_layer_norm


@dataclass
class SpeechvqFbankOutput(ModelOutput):
    """``last_hidden_state`` ``[B, T, D]``; ``extract_features`` ``[B, T, C]`` (the log-mel frames);
    ``hidden_states``: the input of block 1, then every block's output (with
    ``output_hidden_states``); ``frame_lengths`` ``[B]`` valid frames."""

    last_hidden_state: Tensor | None = None
    extract_features: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    frame_lengths: Tensor | None = None


@dataclass
class SpeechvqFbankCTCOutput(ModelOutput):
    """``logits`` ``[B, T, V]``, ``frame_lengths`` ``[B]``, ``hidden_states`` as the base model's."""

    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    frame_lengths: Tensor | None = None


class SpeechvqFbankPreTrainedModel(PreTrainedModel):
    config_class = SpeechvqFbankConfig
    base_model_prefix = "wav2vec2"
    main_input_name = "input_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class SpeechvqFbankModel(SpeechvqFbankPreTrainedModel):
    """The log-mel wav2vec 2.0 body: waveforms in, Transformer states out."""

    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__(config)
        self.front_end = SpeechvqFbankFrontEnd(config)
        self.feature_projection = FeatureProjection(config)
        self.masked_spec_embed = nn.Parameter(torch.zeros(config.hidden_size))  # used in training only
        self.encoder = Encoder(config)
        self.post_init()

    def forward(
        self,
        input_values: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> SpeechvqFbankOutput:
        """``input_values`` ``[B, S]`` at ``sampling_rate``; ``attention_mask`` ``[B, S]``, 1 at
        valid samples (each row a prefix); None: all valid."""
        batch, samples = input_values.shape
        if attention_mask is None:
            lengths = torch.full((batch,), samples, dtype=torch.long, device=input_values.device)
        else:
            lengths = attention_mask.long().sum(-1)
        if self.config.normalize_waveform:
            input_values = _normalize(input_values, lengths, self.config.normalize_eps)
        features = self.front_end(input_values, lengths)  # (B, T, C)
        frame_lengths = self.front_end.output_lengths(lengths)
        valid = torch.arange(features.size(1), device=features.device)[None, :] < frame_lengths[:, None]
        x = self.feature_projection(features).masked_fill(~valid[..., None], 0.0)
        x = x + self.encoder.pos_conv_embed(x)
        if not self.encoder.pre_ln:
            x = self.encoder.layer_norm(x)
        x = self.encoder.dropout(x)
        attend = None if bool(valid.all()) else valid[:, None, None, :]  # (B, 1, 1, T): keys to attend
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x, attend)
            hidden.append(x)
        if self.encoder.pre_ln:
            x = self.encoder.layer_norm(x)
        return SpeechvqFbankOutput(
            last_hidden_state=x, extract_features=features,
            hidden_states=tuple(hidden) if output_hidden_states else None, frame_lengths=frame_lengths,
        )  # fmt: skip


class SpeechvqFbankForCTC(SpeechvqFbankPreTrainedModel):
    """:class:`SpeechvqFbankModel` with a Linear CTC output layer (``lm_head``, blank = ``pad_token_id``)."""

    def __init__(self, config: SpeechvqFbankConfig) -> None:
        super().__init__(config)
        self.wav2vec2 = SpeechvqFbankModel(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(
        self,
        input_values: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> SpeechvqFbankCTCOutput:
        out = self.wav2vec2(input_values, attention_mask, output_hidden_states=output_hidden_states)
        logits = self.lm_head(self.dropout(out.last_hidden_state))
        return SpeechvqFbankCTCOutput(
            logits=logits, hidden_states=out.hidden_states, frame_lengths=out.frame_lengths
        )
