"""Audio conditioning (liveavatar.models.audio): the wav2vec2 and energy/mel extractors, grouping by latent
frame, the projection, and how the DiT uses the audio tokens (zero-initialised, per-frame, causal)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_wav2vec2

from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.audio import (
    SAMPLE_RATE,
    AudioProjection,
    EnergyMelFeatures,
    Wav2Vec2Features,
    group_by_latent_frame,
    latent_frames_for,
    video_frames_for,
)

HIDDEN, LAYERS = 32, 2


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v"), hidden=HIDDEN, layers=LAYERS)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# ------------------------------------------------------------------------------------------- extractors
def test_wav2vec2_features_match_direct_model_resampled(w2v_dir):
    from transformers import Wav2Vec2Model

    wav = speech_like(2.0)
    enc = Wav2Vec2Features(w2v_dir)
    assert (enc.num_layers, enc.feature_dim) == (LAYERS + 1, HIDDEN)
    feats = enc(wav)
    assert feats.shape == (1, 50, LAYERS + 1, HIDDEN) and feats.dtype == torch.float32

    # Reference: Wav2Vec2FeatureExtractor's normalisation, the model at 50 Hz, then numpy.interp to 25 fps
    # with the first and last frames aligned.
    model = Wav2Vec2Model.from_pretrained(w2v_dir, local_files_only=True).eval()
    norm = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
    with torch.no_grad():
        out = model(torch.from_numpy(norm)[None], output_hidden_states=True)
    hidden = torch.stack(out.hidden_states, dim=1)[0].numpy()  # [layers, T50, hidden]
    t50 = hidden.shape[1]
    assert t50 == 99  # 320x downsampling of 32000 samples, as the real wav2vec2
    positions = np.linspace(0, t50 - 1, 50)
    expected = np.empty((50, LAYERS + 1, HIDDEN), dtype=np.float64)
    for layer in range(LAYERS + 1):
        for c in range(HIDDEN):
            expected[:, layer, c] = np.interp(positions, np.arange(t50), hidden[layer, :, c])
    np.testing.assert_allclose(feats[0].numpy(), expected, rtol=1e-4, atol=1e-4)

    # An explicit frame count overrides the one the audio length gives.
    assert enc(wav, frames=30).shape == (1, 30, LAYERS + 1, HIDDEN)


def test_wav2vec2_features_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Wav2Vec2Features(tmp_path / "nowhere")


def test_energy_mel_features_follow_loudness():
    n_mels = 31
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    wav = np.concatenate([np.zeros(SAMPLE_RATE), 0.5 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    enc = EnergyMelFeatures(n_mels=n_mels)
    feats = enc(wav)
    assert feats.shape == (1, 50, 1, n_mels + 1) and (enc.num_layers, enc.feature_dim) == (1, n_mels + 1)
    energy = feats[0, :, 0, -1]
    # In units of 20 dB: frames centred in the silence sit at the floor (10 log10(1e-6) / 20 = -3), frames inside
    # the tone at its mean power (0.5^2 / 2: 10 log10(0.125) / 20 = -0.45), the transition frame (its window half
    # silent) in between.
    torch.testing.assert_close(energy[:24], torch.full((24,), -3.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(energy[27:-1], torch.full((22,), 10 * np.log10(0.125) / 20), atol=0.01, rtol=0)
    assert energy[:24].max() < energy[25] < energy[27:].min()
    # The mel band holding 440 Hz rises too (by more than 20 dB).
    assert feats[0, 30:45, 0, :n_mels].max(-1).values.min() > feats[0, 5:20, 0, :n_mels].max(-1).values.max() + 1
    assert enc(wav, frames=10).shape == (1, 10, 1, n_mels + 1)


def test_frame_counts():
    assert video_frames_for(2 * SAMPLE_RATE) == 50
    assert video_frames_for(100) == 1 and video_frames_for(0) == 0
    assert [latent_frames_for(v) for v in (0, 1, 2, 5, 6, 9, 81)] == [0, 1, 2, 2, 3, 3, 21]


# ------------------------------------------------------------------------------------------- grouping
def frame_index_features(v: int, layers: int = 2, feat: int = 3) -> torch.Tensor:
    """``[1, v, layers, feat]`` whose every value is its video frame index."""
    return torch.arange(v, dtype=torch.float32)[None, :, None, None].expand(1, v, layers, feat).clone()


def test_group_by_latent_frame_layout():
    grouped = group_by_latent_frame(frame_index_features(9), latent_frames=3)
    assert grouped.shape == (1, 3, 4, 2, 3)
    # Latent frame 0: video frame 0 alone, repeated; latent frame f: video frames 4f-3 .. 4f.
    assert grouped[0, :, :, 0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert torch.all(grouped == grouped[..., :1, :1])  # every layer/channel carries the same index
    # Extra video frames past the last latent frame are dropped.
    assert group_by_latent_frame(frame_index_features(12), 3)[0, :, :, 0, 0].tolist() == [[0] * 4, [1, 2, 3, 4], [5, 6, 7, 8]]


def test_group_by_latent_frame_pads_with_last_frame():
    grouped = group_by_latent_frame(frame_index_features(7), latent_frames=3)
    assert grouped[0, :, :, 0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 6, 6]]
    grouped = group_by_latent_frame(frame_index_features(1), latent_frames=2)
    assert grouped[0, :, :, 0, 0].tolist() == [[0] * 4, [0] * 4]
    with pytest.raises(ValueError):
        group_by_latent_frame(frame_index_features(1)[:, :0], latent_frames=1)


# ------------------------------------------------------------------------------------------ projection
def audio_config(**overrides) -> DiTConfig:
    values = dict(
        in_dim=4, out_dim=4, dim=32, ffn_dim=64, freq_dim=32, text_dim=16, text_len=8, num_heads=4, num_layers=2,
        reference="none", frames_per_block=2, audio_dim=24, audio_feature_dim=HIDDEN, audio_layers_in=LAYERS + 1,
        audio_blocks=[0, 1],
    )
    values.update(overrides)
    return DiTConfig(**values)


def test_audio_projection_shapes_and_errors():
    proj = AudioProjection(audio_config())
    feats = torch.randn(2, 9, LAYERS + 1, HIDDEN)
    assert proj(feats).shape == (2, 3, 4, 24)
    assert proj(feats, latent_frames=5).shape == (2, 5, 4, 24)  # short audio: padded with the last frame
    for bad in (torch.randn(2, 9, LAYERS + 1, HIDDEN + 1), torch.randn(2, 9, LAYERS, HIDDEN), torch.randn(2, 9, HIDDEN)):
        with pytest.raises(ValueError, match="do not fit"):
            proj(bad)


def test_audio_projection_without_layer_norm_keeps_the_level():
    """A LayerNorm over the features removes what all of them share (for log energies: the loudness);
    ``audio_feature_norm="none"`` keeps it."""
    feats = torch.randn(1, 9, LAYERS + 1, HIDDEN)
    louder = feats + 1.0  # every log energy up by 20 dB
    normed, plain = AudioProjection(audio_config()), AudioProjection(audio_config(audio_feature_norm="none"))
    for proj in (normed, plain):
        torch.nn.init.normal_(proj.layer_weights)
    torch.testing.assert_close(normed(louder), normed(feats), atol=1e-4, rtol=0)
    assert (plain(louder) - plain(feats)).abs().mean() > 0.05
    assert not any("norm" in name for name, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="audio_feature_norm"):
        audio_config(audio_feature_norm="batch")


def test_audio_projection_tokens_are_per_video_frame():
    """Each token of latent frame f depends only on its own video frame's features."""
    proj = AudioProjection(audio_config())
    feats = torch.randn(1, 9, LAYERS + 1, HIDDEN)
    changed = feats.clone()
    changed[:, 6] += torch.randn_like(changed[:, 6])  # video frame 6 = latent frame 2, slot 1
    diff = (proj(changed) - proj(feats)).abs().amax(-1)[0]
    assert diff[2, 1] > 0
    diff[2, 1] = 0
    assert torch.all(diff == 0)


# ------------------------------------------------------------------------------------------------ DiT
def dit_inputs(cfg: DiTConfig, frames: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, frames, 4, 4, generator=g)
    t = torch.tensor([700.0])
    context = torch.randn(1, 5, cfg.text_dim, generator=g)
    audio = torch.randn(1, 1 + 4 * (frames - 1), cfg.audio_layers_in, cfg.audio_feature_dim, generator=g)
    return x, t, context, audio


def randomised_model(cfg: DiTConfig, seed: int = 0) -> AvatarDiT:
    """A fresh model predicts zeros (zero head): give every parameter a random value."""
    torch.manual_seed(seed)
    model = AvatarDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def audio_out_projections(model: AvatarDiT) -> list[torch.nn.Parameter]:
    return [p for block in model.blocks if block.audio_attn is not None for p in block.audio_attn.attn.o.parameters()]


@torch.no_grad()
def test_dit_audio_branch_starts_at_zero():
    cfg = audio_config()
    fresh = AvatarDiT(cfg)
    projections = audio_out_projections(fresh)
    assert len(projections) == 4 and all(torch.all(p == 0) for p in projections)

    model = randomised_model(cfg)
    for p in audio_out_projections(model):
        p.zero_()  # the state of a fresh model's audio branch, with everything else random
    x, t, context, audio = dit_inputs(cfg)
    without = model(x, t, context, causal=True)
    assert without.abs().max() > 0  # not vacuous: the randomised head gives a non-zero prediction
    torch.testing.assert_close(model(x, t, context, audio=audio, causal=True), without, rtol=0, atol=0)

    for p in audio_out_projections(model):
        p.normal_(0, 0.1)
    with_audio = model(x, t, context, audio=audio, causal=True)
    assert (with_audio - without).abs().max() > 1e-3
    # Audio changes the prediction through the features, not merely by being present.
    other = model(x, t, context, audio=audio + torch.randn_like(audio), causal=True)
    assert (other - with_audio).abs().max() > 1e-3


@pytest.mark.parametrize("reference", ["none", "sink"])
@torch.no_grad()
def test_dit_audio_is_causal_per_block(reference):
    cfg = audio_config(reference=reference, frames_per_block=2)
    model = randomised_model(cfg)
    x, t, context, audio = dit_inputs(cfg, frames=4)  # blocks: latent frames {0, 1} and {2, 3}
    ref = torch.randn(1, cfg.in_dim, 1, 4, 4) if reference == "sink" else None
    base = model(x, t, context, audio=audio, causal=True, reference=ref)

    def changed_frames(latent: int, causal: bool = True) -> list[bool]:
        perturbed = audio.clone()
        start = 0 if latent == 0 else 4 * latent - 3
        # Random, not constant: the projection's LayerNorm removes a constant offset across channels.
        perturbed[:, start : 4 * latent + 1] += torch.randn_like(perturbed[:, start : 4 * latent + 1])
        out = model(x, t, context, audio=perturbed, causal=causal, reference=ref)
        first = base if causal else model(x, t, context, audio=audio, causal=False, reference=ref)
        return [bool((out[:, :, f] - first[:, :, f]).abs().max() > 1e-5) for f in range(4)]

    # The last latent frame's audio reaches its own block (frames 2 and 3, through self-attention inside the
    # block) and never the earlier block.
    assert changed_frames(3) == [False, False, True, True]
    assert changed_frames(2) == [False, False, True, True]
    # Audio of the first block reaches everything after it.
    assert changed_frames(1) == [True, True, True, True]
    # Without the causal mask the last frame's audio reaches the first frames too (the check above bites).
    assert changed_frames(3, causal=False)[0]


@torch.no_grad()
def test_dit_accepts_audio_grouped_by_latent_frame():
    """Features already grouped by latent frame (a slice of a longer video) give the same output as the flat
    per-video-frame features they were grouped from."""
    cfg = audio_config()
    model = randomised_model(cfg)
    x, t, context, audio = dit_inputs(cfg, frames=3)
    grouped = group_by_latent_frame(audio, latent_frames=3)
    torch.testing.assert_close(model.embed_audio(grouped), model.embed_audio(audio))
    torch.testing.assert_close(model(x, t, context, audio=grouped, causal=True), model(x, t, context, audio=audio, causal=True))


def test_split_into_blocks_groups_each_block_like_one_whole_grouping():
    from liveavatar.models.audio import blocks_for, split_into_blocks

    features = torch.randn(1, 23, 2, 3)            # 23 video frames -> 7 latent frames -> 3 blocks of 3
    blocks = split_into_blocks(features, 3, 4)
    assert blocks_for(23, 3, 4) == len(blocks) == 3
    whole = group_by_latent_frame(features, 9, 4)
    torch.testing.assert_close(torch.cat(blocks, dim=1), whole, rtol=0, atol=0)
    assert all(b.shape == (1, 3, 4, 2, 3) for b in blocks)


# ------------------------------------------------------------------------------------------- streaming
from pathlib import Path  # noqa: E402

from liveavatar.models.audio import blocks_for, split_into_blocks, split_video_frames  # noqa: E402
from liveavatar.models.audio_stream import StreamingAudioFeatures, stream_blocks  # noqa: E402

SPEECH = Path(__file__).resolve().parents[1] / "data/example/speech.wav"


@pytest.fixture(scope="module")
def speech():
    from liveavatar import media

    return media.read_audio(SPEECH)  # 4.0 s: 100 video frames at 25 fps


def offline_blocks(extractor, wav, fpb, per_latent):
    return split_into_blocks(extractor(wav, video_frames_for(len(wav))), fpb, per_latent)


def compare(stream, offline, blocks, label):
    """Max/mean absolute and relative (Frobenius) differences over ``blocks``; printed for the record."""
    a, o = torch.cat([stream[b] for b in blocks], 1), torch.cat([offline[b] for b in blocks], 1)
    d = (a - o).abs()
    figures = {"max": d.max().item(), "mean": d.mean().item(), "rel": (d.norm() / o.norm()).item(),
               "rel_max": (d.max() / o.abs().max()).item()}
    print(f"{label}: blocks {blocks[0]}..{blocks[-1]}: max abs {figures['max']:.3g}, mean abs {figures['mean']:.3g}, "
          f"relative (Frobenius) {figures['rel']:.3g}, max abs / max |offline| {figures['rel_max']:.3g}")
    return figures


def after_lookback(stream: StreamingAudioFeatures, count: int) -> list[int]:
    """Blocks whose look-back window lies wholly inside the audio (the first look-back window excluded)."""
    return [b for b in range(count) if stream.block_frames(b)[0] >= max(1, stream.lookback_frames)]


@pytest.mark.parametrize("fpb,per_latent", [(3, 1), (3, 4)])
def test_streaming_energy_mel_equals_offline(speech, fpb, per_latent):
    """Each energy/mel frame only sees its own and the previous frame's audio: with a look-back of at least one
    frame the streamed features are the offline ones; without look-back a block's first frame loses its past."""
    enc = EnergyMelFeatures()
    offline = offline_blocks(enc, speech, fpb, per_latent)
    streamed = stream_blocks(enc, speech, 25, fpb, per_latent, lookback_s=0.5)
    assert len(streamed) == len(offline) and all(s.shape == o.shape for s, o in zip(streamed, offline))
    probe = StreamingAudioFeatures(enc, 25, fpb, per_latent, lookback_s=0.5)
    figures = compare(streamed, offline, after_lookback(probe, len(offline)), f"energy_mel lookback 0.5 s ({fpb}x{per_latent})")
    assert figures["max"] <= 1e-4
    # Early blocks too: their window starts at the file's start, like the offline pass.
    torch.testing.assert_close(torch.cat(streamed, 1), torch.cat(offline, 1), rtol=0, atol=1e-4)

    blind = stream_blocks(enc, speech, 25, fpb, per_latent, lookback_s=0)
    figures = compare(blind, offline, list(range(1, len(offline))), f"energy_mel lookback 0 ({fpb}x{per_latent})")
    assert figures["max"] > 1.0


def test_streaming_energy_mel_in_the_s2v_pairing_equals_offline(speech):
    """Wan2.2-S2V pairs latent frame j with video frames 4j..4j+3 (no first frame alone): streamed blocks are each
    block's 12 video frames, as the offline split gives them, the last one padded the same way."""
    enc = EnergyMelFeatures()
    wav = speech[: int(1.7 * SAMPLE_RATE)]  # 42 video frames: the last of 4 blocks is padded
    frames = video_frames_for(len(wav))
    offline = split_video_frames(enc(wav, frames), 3, 4, blocks_for(frames, 3, 4))
    streamed = stream_blocks(enc, wav, 25, 3, 4, lookback_s=0.5, first_frame_alone=False)
    assert [s.shape for s in streamed] == [o.shape for o in offline] == [(1, 12, *offline[0].shape[2:])] * 4
    torch.testing.assert_close(torch.cat(streamed, 1), torch.cat(offline, 1), rtol=0, atol=1e-4)
    probe = StreamingAudioFeatures(enc, 25, 3, 4, first_frame_alone=False)
    assert [probe.block_frames(b) for b in range(3)] == [(0, 12), (12, 24), (24, 36)]


def test_streaming_wav2vec2_close_to_offline(speech, w2v_dir):
    """wav2vec2 sees the whole file offline (GroupNorm over time in its first conv layer, bidirectional attention),
    so streamed features only approach the offline ones; with the whole file as look-back the last block matches."""
    enc = Wav2Vec2Features(w2v_dir)
    fpb, per_latent = 3, 4  # Wan's layout: blocks of 12 video frames (0.48 s)
    offline = offline_blocks(enc, speech, fpb, per_latent)
    streamed = stream_blocks(enc, speech, 25, fpb, per_latent, lookback_s=2.0)
    assert len(streamed) == len(offline) and all(s.shape == o.shape for s, o in zip(streamed, offline))
    probe = StreamingAudioFeatures(enc, 25, fpb, per_latent, lookback_s=2.0)
    figures = compare(streamed, offline, after_lookback(probe, len(offline)), "wav2vec2 (tiny random) lookback 2 s")
    assert figures["rel"] < 0.25 and figures["mean"] < 0.2

    # The same late blocks (first frame >= 3 s) without look-back and with 3 s: no look-back is clearly worse.
    late = [b for b in range(len(offline)) if probe.block_frames(b)[0] >= 75]
    errors = {lb: compare(stream_blocks(enc, speech, 25, fpb, per_latent, lb), offline, late,
                          f"wav2vec2 (tiny random) lookback {lb} s")["rel"] for lb in (0, 3.0)}
    assert errors[0] > 2 * errors[3.0]

    # Look-back covering the whole file: the last block sees exactly the offline input.
    whole = stream_blocks(enc, speech, 25, fpb, per_latent, lookback_s=4.0)
    torch.testing.assert_close(whole[-1], offline[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["energy_mel", "wav2vec2"])
def test_streaming_chunk_size_does_not_matter(speech, w2v_dir, kind):
    enc = EnergyMelFeatures() if kind == "energy_mel" else Wav2Vec2Features(w2v_dir)
    wav = speech[: int(1.7 * SAMPLE_RATE)]  # not a whole number of blocks: the last one is padded
    reference = stream_blocks(enc, wav, 25, 3, 4, lookback_s=0.6)
    assert len(reference) == len(offline_blocks(enc, wav, 3, 4))
    for chunk in (1000, 640 * 12, 7777, len(wav)):
        other = stream_blocks(enc, wav, 25, 3, 4, lookback_s=0.6, chunk_samples=chunk)
        assert len(other) == len(reference)
        torch.testing.assert_close(torch.cat(other, 1), torch.cat(reference, 1), rtol=0, atol=0)
    # Chunks that are not numpy: a torch tensor works the same.
    other = stream_blocks(enc, torch.from_numpy(wav), 25, 3, 4, lookback_s=0.6, chunk_samples=3000)
    torch.testing.assert_close(torch.cat(other, 1), torch.cat(reference, 1), rtol=0, atol=0)


def test_streaming_block_is_ready_when_its_audio_is_and_ignores_later_audio(speech, w2v_dir):
    enc = Wav2Vec2Features(w2v_dir)
    stream = StreamingAudioFeatures(enc, 25, frames_per_block=3, video_frames_per_latent=4, lookback_s=1.0)
    assert stream.block_frames(0) == (0, 9) and stream.block_frames(1) == (9, 21)
    end0, end1 = stream.boundary(9), stream.boundary(21)
    assert (end0, end1) == (9 * 640, 21 * 640) and stream.block_seconds == pytest.approx(0.48)
    assert stream.push(speech[: end0 - 1]) == []
    first = stream.push(speech[end0 - 1 : end0])
    assert len(first) == 1 and first[0].shape == (1, 3, 4, LAYERS + 1, HIDDEN)
    assert stream.push(speech[end0 : end1 - 1]) == []
    second = stream.push(speech[end1 - 1 : end1])
    assert len(second) == 1

    # Other audio after block 1 leaves blocks 0 and 1 alone (no look-ahead), while the offline features change.
    noisy = speech.copy()
    noisy[end1:] = np.random.default_rng(0).standard_normal(noisy.size - end1).astype(np.float32) * 0.3
    again = stream_blocks(enc, noisy, 25, 3, 4, lookback_s=1.0)
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    torch.testing.assert_close(again[1], second[0], rtol=0, atol=0)
    assert (offline_blocks(enc, noisy, 3, 4)[1] - offline_blocks(enc, speech, 3, 4)[1]).abs().max() > 1e-3

    with pytest.raises(RuntimeError, match="after flush"):
        stream.flush()
        stream.push(speech[:10])
    with pytest.raises(ValueError, match="lookback_s"):
        StreamingAudioFeatures(enc, 25, 3, 4, lookback_s=-1)
