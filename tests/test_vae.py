"""VAE wrappers: Wan (tiny random AutoencoderKLWan, Wan2.1- and Wan2.2-style) streaming decode, and PatchVAE."""
import json

import pytest
import torch
from diffusers import AutoencoderKLWan

from liveavatar.models.vae import PatchVAE, StreamingDecoder, WanVAE, build_vae

Z21 = 4
Z22 = 8


def _tiny_wan21() -> AutoencoderKLWan:
    # Three stages, two of them temporal: 4x time (what diffusers' encode assumes), 4x space.
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=Z21,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_spatial=4,
    )


def _tiny_wan22() -> AutoencoderKLWan:
    # Wan2.2 TI2V layout: residual up/down blocks, patchify by 2 (12 = 3 * 2 * 2 channels in and out).
    torch.manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=Z22,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        latents_mean=[0.05 * i for i in range(Z22)],
        latents_std=[1.0 + 0.1 * i for i in range(Z22)],
        scale_factor_spatial=8,
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convs gain nothing from intra-op threads, and on a loaded 2-core machine two OpenMP threads make each
    # decode ~100x slower (7.5 s instead of 0.07 s measured); restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan21_vae")
    _tiny_wan21().save_pretrained(path)
    return WanVAE.from_pretrained(path)


@pytest.fixture(scope="module")
def wan22():
    return WanVAE(_tiny_wan22())


def _stream(decoder: StreamingDecoder, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    outs, i = [], 0
    for n in sizes:
        out = decoder.decode(latents[:, :, i : i + n])
        # First chunk: 1 + 4 (n - 1) frames; later chunks: 4 n.
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        outs.append(out)
        i += n
    assert i == latents.shape[2]
    return torch.cat(outs, dim=2)


def test_geometry(wan21, wan22):
    assert (wan21.latent_channels, wan21.time_factor, wan21.space_factor) == (Z21, 4, 4)
    assert (wan22.latent_channels, wan22.time_factor, wan22.space_factor) == (Z22, 4, 8)
    assert [wan21.latent_frames(t) for t in (0, 1, 5, 9, 81)] == [0, 1, 2, 3, 21]
    assert [wan21.video_frames(f) for f in (0, 1, 2, 3, 21)] == [0, 1, 5, 9, 81]


def test_geometry_of_full_size_configs():
    # Real Wan2.1 / Wan2.2 TI2V architectures on the meta device (no memory, no weights): factors come from config.
    with torch.device("meta"):
        wan21 = WanVAE(AutoencoderKLWan())
        wan22 = WanVAE(
            AutoencoderKLWan(
                base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2,
                in_channels=12, out_channels=12, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                scale_factor_spatial=16,
            )
        )
    assert (wan21.latent_channels, wan21.time_factor, wan21.space_factor) == (16, 4, 8)
    assert (wan22.latent_channels, wan22.time_factor, wan22.space_factor) == (48, 4, 16)


@pytest.mark.parametrize("sizes", [[1] * 7, [2, 2, 2, 1], [3, 3, 1], [1, 3, 2, 1], [7]])
def test_streaming_decode_equals_full_decode(wan21, sizes):
    torch.manual_seed(2)
    latents = torch.randn(2, Z21, 7, 2, 3)
    full = wan21.decode(latents)
    assert full.shape == (2, 3, 25, 8, 12)
    assert full.abs().max() <= 1.0
    streamed = _stream(wan21.stream_decoder(), latents, sizes)
    assert torch.equal(streamed, full)


def test_decode_matches_diffusers(wan21, wan22):
    # Our decode applies post_quant_conv per latent frame; diffusers applies it to all frames at once.
    torch.manual_seed(3)
    for vae in (wan21, wan22):
        latents = torch.randn(1, vae.latent_channels, 4, 2, 3)
        raw = latents * vae._std + vae._mean  # denormalize: z = normalized * std + mean
        ref = vae.model.decode(raw).sample
        torch.testing.assert_close(vae.decode(latents), ref, atol=1e-5, rtol=0)


def test_wan22_streaming_decode_equals_full_decode(wan22):
    torch.manual_seed(4)
    latents = torch.randn(1, Z22, 7, 2, 3)
    full = wan22.decode(latents)
    assert full.shape == (1, 3, 25, 16, 24)
    for sizes in ([1, 3, 2, 1], [2, 2, 2, 1], [1] * 7):
        assert torch.equal(_stream(wan22.stream_decoder(), latents, sizes), full)


def test_reset_starts_a_new_video(wan21):
    torch.manual_seed(5)
    first, second = torch.randn(1, Z21, 5, 2, 3), torch.randn(1, Z21, 4, 2, 3)
    decoder = wan21.stream_decoder()
    _stream(decoder, first, [2, 3])
    assert decoder.latent_frames_done == 5
    decoder.reset()
    assert decoder.latent_frames_done == 0
    assert torch.equal(_stream(decoder, second, [1, 3]), wan21.decode(second))
    # Without reset the second video would be decoded as a continuation (different frames, 4 n of them).
    assert decoder.decode(second[:, :, :1]).shape[2] == 4


def test_streams_own_their_cache(wan21):
    # Two interleaved streams plus a full decode in between must not disturb each other.
    torch.manual_seed(6)
    a, b = torch.randn(1, Z21, 4, 2, 3), torch.randn(1, Z21, 4, 2, 3)
    sa, sb = wan21.stream_decoder(), wan21.stream_decoder()
    outs_a, outs_b = [], []
    for i in range(0, 4, 2):
        outs_a.append(sa.decode(a[:, :, i : i + 2]))
        wan21.decode(b)
        outs_b.append(sb.decode(b[:, :, i : i + 2]))
    assert torch.equal(torch.cat(outs_a, 2), wan21.decode(a))
    assert torch.equal(torch.cat(outs_b, 2), wan21.decode(b))


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_encode_shapes_and_normalization(name, request):
    vae = request.getfixturevalue(name)
    sf = vae.space_factor
    torch.manual_seed(7)
    video = torch.rand(2, 3, 9, 2 * sf, 3 * sf) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, vae.latent_channels, vae.latent_frames(9), 2, 3) == (2, vae.latent_channels, 3, 2, 3)
    mu = vae.model.encode(video).latent_dist.mean
    torch.testing.assert_close(latents, (mu - vae._mean) / vae._std)
    assert vae.decode(latents).shape == video.shape
    assert vae.encode(video[:, :, :1]).shape[2] == 1  # a single image: one latent frame
    with pytest.raises(ValueError, match="1 \\+ 4"):
        vae.encode(video[:, :, :8])
    with pytest.raises(ValueError, match="multiples"):
        vae.encode(video[..., : sf + 1])


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        WanVAE.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        WanVAE.from_pretrained(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not an AutoencoderKLWan folder"):
        WanVAE.from_pretrained(other)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="could not load"):
        WanVAE.from_pretrained(no_weights)


def test_pipeline_folder_and_build_vae(tmp_path):
    _tiny_wan21().save_pretrained(tmp_path / "vae")  # a diffusers pipeline root with a vae/ subfolder
    vae = build_vae("wan", str(tmp_path), dtype="float32")
    assert isinstance(vae, WanVAE) and vae.latent_channels == Z21 and vae.dtype == torch.float32
    with pytest.raises(ValueError, match="needs a path"):
        build_vae("wan", None)
    with pytest.raises(ValueError, match="unknown vae kind"):
        build_vae("sd", None)
    patch = build_vae("patch", None, space_factor=4)
    assert isinstance(patch, PatchVAE) and patch.space_factor == 4 and patch.latent_channels == 48


@pytest.mark.parametrize("space_factor,shift,scale", [(2, 0.0, 1.0), (4, 0.0, 0.5), (1, 0.0, 1.0)])
def test_patch_vae_round_trip(space_factor, shift, scale):
    vae = PatchVAE(space_factor=space_factor, shift=shift, scale=scale)
    torch.manual_seed(8)
    video = torch.rand(2, 3, 5, 8, 12) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 3 * space_factor**2, 5, 8 // space_factor, 12 // space_factor)
    assert (vae.time_factor, vae.latent_frames(5), vae.video_frames(5)) == (1, 5, 5)
    assert torch.equal(vae.decode(latents), video)
    # Space-to-depth per frame: latent channel c * f * f + i * f + j holds pixel (i, j) of each f x f block.
    f = space_factor
    assert torch.equal(latents[:, 1 * f * f + (f - 1), :, 0, 0], (video[:, 1, :, 0, f - 1] - shift) / scale)
    stream = vae.stream_decoder()
    streamed = torch.cat([stream.decode(latents[:, :, i : i + n]) for i, n in ((0, 1), (1, 3), (4, 1))], dim=2)
    assert torch.equal(streamed, vae.decode(latents))


def test_patch_vae_affine_and_errors():
    vae = PatchVAE(space_factor=2, shift=0.25, scale=2.0)
    video = torch.full((1, 3, 1, 4, 4), 0.75)
    assert torch.allclose(vae.encode(video), torch.full((1, 12, 1, 2, 2), 0.25))
    torch.testing.assert_close(vae.decode(vae.encode(video)), video)
    with pytest.raises(ValueError, match="multiples of space_factor 2"):
        vae.encode(torch.zeros(1, 3, 1, 5, 4))
    with pytest.raises(ValueError, match="channels"):
        vae.decode(torch.zeros(1, 3, 1, 2, 2))
