"""The Wan2.2-TI2V family: first-frame conditioning as the original's text-image-to-video, and a tiny TI2V checkpoint
in the original layout streamed with StreamAvatar's engine preset through every engine.

The forward is compared with the original ``WanModel`` (``model_type="ti2v"``) by ``scripts/compare_original.py``
(relative error 4.4e-7; not in CI: the original repositories cannot be vendored).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liveavatar.models import AvatarDiT, from_preset

from conftest import infer_in_process, randomise, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_first_frame_conditioning_is_the_image_at_timestep_zero():
    # reference=first_frame equals feeding the clip with its first frame replaced by the image at t = 0, per frame
    # timesteps given by hand (what Wan2.2's textimage2video.py does with its mask), and the image matters.
    torch.manual_seed(0)
    cfg = tiny_config(reference="first_frame")
    model = randomise(AvatarDiT(cfg), std=0.1).eval()
    plain = randomise(AvatarDiT(tiny_config(reference="none")), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    x, image, context = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 1, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        got = model(x, torch.tensor([700.0]), context, reference=image)
        by_hand = plain(torch.cat([image, x[:, :, 1:]], dim=2), torch.tensor([[0.0, 700, 700, 700]]), context)
        other = model(x, torch.tensor([700.0]), context, reference=image + 1)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert (other[:, :, 1:] - got[:, :, 1:]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_ti2v_files(tmp_path_factory):
    """A TI2V base checkpoint in the original layout (only Wan's keys, random non-zero) and a tiny Wan2.2 VAE."""
    from diffusers import AutoencoderKLWan

    folder = tmp_path_factory.mktemp("tiny_ti2v")
    torch.manual_seed(0)
    base = from_preset("tiny-ti2v", device="cpu", audio_dim=0, audio_blocks=[], audio_modulation=False)
    randomise(base, std=0.15, seed=1).save_pretrained(folder / "dit", max_shard_bytes=300_000)
    torch.manual_seed(1)
    AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                     temperal_downsample=[True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                     latents_mean=[0.05 * i for i in range(8)], latents_std=[1.0 + 0.1 * i for i in range(8)],
                     scale_factor_spatial=8).save_pretrained(folder / "vae")
    return folder


def infer_ti2v(files, out, *overrides, nproc=None):
    """What infer.py prints on stderr and the frames it writes: under torchrun with ``nproc`` ranks, else
    ``infer_in_process``."""
    args = ["model=tiny-ti2v", f"checkpoint={files / 'dit'}", f"model.vae.path={files / 'vae'}", "max_seconds=1.0",
            "engine=streamavatar", f"output.path={out}", "output.frames=true", *overrides]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "infer.py")]
        result = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        stderr = result.stderr
    else:
        stderr = infer_in_process(args)
    return stderr, np.load(Path(out).with_suffix(".frames.npy"))


@pytest.mark.distributed
def test_tiny_ti2v_checkpoint_streams_with_streamavatar_settings_through_every_engine(tmp_path, tiny_ti2v_files):
    config = json.loads((tiny_ti2v_files / "dit" / "config.json").read_text())
    assert config["in_dim"] == 8 and len(list((tiny_ti2v_files / "dit").glob("*-of-*.safetensors"))) > 1
    # The base holds no audio modules: they are initialised at zero output, and the run says so.
    stderr, sequential = infer_ti2v(tiny_ti2v_files, tmp_path / "seq.mp4")
    assert "they start at zero output" in stderr
    assert sequential.shape[0] >= 20 and sequential.std() > 1
    _, batched = infer_ti2v(tiny_ti2v_files, tmp_path / "batch.mp4", "engine.name=stream_batch")
    assert np.abs(batched.astype(int) - sequential.astype(int)).max() <= 1
    _, tpp = infer_ti2v(tiny_ti2v_files, tmp_path / "tpp.mp4", "engine.name=tpp", nproc=4)  # 3 steps + decoding
    np.testing.assert_array_equal(tpp, sequential)
    # The preset's Reference Sink + first block is what streamed: the plain reference sink gives other frames.
    _, reference_only = infer_ti2v(tiny_ti2v_files, tmp_path / "ref.mp4", "engine.keep_first_block=false")
    assert np.abs(reference_only.astype(int) - sequential.astype(int)).max() > 0


def test_first_frame_training_conditions_on_the_clip_and_has_no_loss_on_it():
    # The flow loss of a reference=first_frame model takes the clip's own first frame as the image and does not
    # score it: changing the first frame's target noise or the batch's reference changes nothing but the input.
    from liveavatar.training.flow_loss import FlowLossConfig, FlowMatchingLoss

    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config(reference="first_frame")), std=0.1)
    loss_fn = FlowMatchingLoss(FlowLossConfig(drop_text=0.0, drop_audio=0.0), causal=False, frames_per_block=2)
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 4, 4, 8, 8, generator=g), "text": torch.randn(2, 5, 32, generator=g),
             "reference": torch.randn(2, 4, 1, 8, 8, generator=g)}
    loss, _ = loss_fn(model, batch, torch.Generator().manual_seed(2))
    other_reference = dict(batch, reference=torch.randn(2, 4, 1, 8, 8, generator=g))
    same, _ = loss_fn(model, other_reference, torch.Generator().manual_seed(2))
    assert torch.equal(loss, same)  # the batch's reference is not the image: the clip's first frame is
    other_first = dict(batch, latents=torch.cat([batch["latents"][:, :, :1] + 1, batch["latents"][:, :, 1:]], dim=2))
    changed, _ = loss_fn(model, other_first, torch.Generator().manual_seed(2))
    assert not torch.equal(loss, changed)  # ... and it conditions the other frames
    # The prediction for the first frame gets no gradient; every other frame's does.
    outputs = []
    forward = model.forward

    def keep(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.retain_grad()
        outputs.append(out)
        return out

    model.forward = keep
    loss, _ = loss_fn(model, batch, torch.Generator().manual_seed(2))
    loss.backward()
    grad = outputs[0].grad
    assert grad[:, :, 0].abs().max() == 0 and (grad[:, :, 1:].abs().amax(dim=(0, 1, 3, 4)) > 0).all()
