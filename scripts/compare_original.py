"""Check this project's Wan2.2 families against the original code (not run in CI: the original repositories
cannot be vendored).

Given a checkout of Wan-Video/Wan2.2, this builds tiny models there with random weights, saves them with the
original code in the original layout (sharded safetensors + index + config.json), loads those folders here
strictly, and compares forwards on the same inputs:

- S2V (``WanModel_S2V``), bidirectional, with FramePack motion frames, a pose condition and audio;
- S2V with the motion frames dropped (the original's first clip);
- TI2V (``WanModel``, ``model_type="ti2v"``, 48 latent channels as the 5B): the first latent frame replaced by the
  image latent at timestep 0, per-token timesteps as ``textimage2video.py`` builds them (``reference=first_frame``);

and prints one line per comparison with the relative error ``max |ours - original| / max |original|``, then one
JSON object. Exit status 1 when an error reaches ``--tolerance`` (default 1e-4).

    python scripts/compare_original.py --wan22 /path/to/Wan2.2 [--device cuda]

The original code calls flash-attention; here it is replaced by PyTorch's scaled-dot-product attention (every
sequence in these inputs is full length, so ``k_lens`` masks nothing). Everything runs in float32.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = dict(patch_size=(1, 2, 2), dim=96, ffn_dim=192, freq_dim=256, num_heads=4, num_layers=4, window_size=(-1, -1),
            qk_norm=True, cross_attn_norm=True, eps=1e-6, enable_adain=True, adain_mode="attn_norm",
            audio_inject_layers=[0, 2, 3], zero_init=True, zero_timestep=True, enable_motioner=False,
            add_last_motion=True, trainable_token=False, enable_tsm=False, enable_framepack=True,
            framepack_drop_mode="padd", audio_dim=48, motion_frames=73, cond_dim=16, text_len=16)


def _sdpa(q, k, v, q_lens=None, k_lens=None, window_size=None, **_):
    """Stand-in for the original's flash_attention: ``[B, L, H, D]`` in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float())
    return out.transpose(1, 2).to(v.dtype)


def import_original(checkout: Path):
    """The original ``wan.modules.s2v.model_s2v`` module, imported without the package ``__init__`` files (they pull
    the whole pipelines and their dependencies) and with flash-attention replaced by SDPA."""
    if not (checkout / "wan" / "modules" / "s2v" / "model_s2v.py").is_file():
        raise SystemExit(f"error: {checkout} is not a Wan2.2 checkout (no wan/modules/s2v/model_s2v.py)")
    sys.path.insert(0, str(checkout))
    for name in ("wan", "wan.modules", "wan.modules.s2v", "wan.distributed"):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / name.replace(".", "/"))]
        sys.modules[name] = package
    for name in ("wan.modules.attention", "wan.modules.model", "wan.modules.s2v.model_s2v", "wan.modules.s2v.motioner"):
        module = importlib.import_module(name)
        module.flash_attention = _sdpa
    return sys.modules["wan.modules.s2v.model_s2v"]


@torch.no_grad()
def randomise(model: torch.nn.Module) -> None:
    """Random non-zero weights everywhere, the zero-initialised paths (head, audio injection, condition mask)
    included: matrices ~ N(0, 1 / fan_in), norm scales ~ 1 + N(0, 0.1), biases and the rest ~ N(0, 0.1)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "modulation" not in name:
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        else:
            p.copy_(0.1 * torch.randn_like(p))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))


def compare_ti2v(args, avatar_dit) -> float:
    """A tiny original TI2V ``WanModel`` against ours with ``reference=first_frame``; returns the relative error."""
    from liveavatar.models import DiTConfig

    original = sys.modules["wan.modules.model"]
    tiny = dict(model_type="ti2v", patch_size=(1, 2, 2), text_len=16, in_dim=48, dim=96, ffn_dim=192, freq_dim=256,
                out_dim=48, num_heads=4, num_layers=3)
    torch.manual_seed(args.seed + 2)
    theirs = original.WanModel(**tiny).eval()
    randomise(theirs)
    theirs = theirs.to(args.device)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)
        config = DiTConfig.from_dict({**json.loads((Path(folder) / "config.json").read_text()),
                                      "reference": "first_frame"})
        ours = avatar_dit.from_pretrained(folder, config=config).to(args.device).eval()
    g = torch.Generator().manual_seed(args.seed + 3)
    frames, hh, ww = 3, 8, 12
    noise = torch.randn(48, frames, hh, ww, generator=g).to(args.device)
    image = torch.randn(48, 1, hh, ww, generator=g).to(args.device)
    context = torch.randn(5, 4096, generator=g).to(args.device)
    t = 611.0
    # textimage2video.py: mask 0 on the first frame, the latent's first frame is the image, per-token timesteps
    mask = torch.ones_like(noise)
    mask[:, 0] = 0
    latent = (1 - mask) * image + mask * noise
    seq_len = frames * (hh // 2) * (ww // 2)
    per_token = (mask[0][:, ::2, ::2] * t).flatten()[None]
    with torch.no_grad():
        want = theirs([latent], t=per_token, context=[context], seq_len=seq_len)[0]
        got = ours(noise[None], torch.tensor([t], device=args.device), context[None], reference=image[None])[0]
    error = relative_error(got[:, 1:], want[:, 1:])  # the first frame's output is discarded by both samplers
    print(f"ti2v, first-frame conditioning: relative error {error:.2e} (output scale {float(want.abs().max()):.3g})")
    return error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wan22", type=Path, required=True, help="a checkout of Wan-Video/Wan2.2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from liveavatar.models import AvatarDiT

    original = import_original(args.wan22)
    torch.manual_seed(args.seed)
    theirs = original.WanModel_S2V(**TINY).eval()
    randomise(theirs)
    theirs = theirs.to(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)  # the original layout, sharded
        shards = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        ours = AvatarDiT.from_pretrained(folder).to(args.device).eval()
    print(f"saved by the original code in {len(shards)} shards, loaded here strictly: "
          f"{sum(p.numel() for p in ours.parameters()):,} parameters")

    g = torch.Generator().manual_seed(args.seed + 1)
    frames, hh, ww, c = 3, 16, 16, 16
    rand = lambda *shape: torch.randn(*shape, generator=g).to(args.device)  # noqa: E731
    x, ref, cond = rand(c, frames, hh, ww), rand(c, 1, hh, ww), rand(16, frames, hh, ww)
    motion = rand(c, 19, hh, ww)
    context = rand(7, 4096)  # the original config.json does not record text_dim: the default
    audio = rand(1, 25, TINY["audio_dim"], 4 * frames)  # the original's [B, layers, feat, video_frames]
    t = torch.tensor([637.0], device=args.device)
    with torch.no_grad():
        for name, drop in (("bidirectional, FramePack motion", False), ("bidirectional, motion dropped", True)):
            want = theirs([x], t, [context], None, [ref], [motion], [cond], audio_input=audio,
                          motion_frames=[73, 19], drop_motion_frames=drop)[0]
            got = ours(x[None], t, context[None], audio=audio.permute(0, 3, 1, 2), reference=ref[None], cond=cond[None],
                       motion_latents=None if drop else motion[None])[0]
            results[name] = relative_error(got, want)
            print(f"{name}: relative error {results[name]:.2e} (output scale {float(want.abs().max()):.3g})")
    results["ti2v, first-frame conditioning"] = compare_ti2v(args, AvatarDiT)
    worst = max(results.values())
    print(json.dumps({"errors": results, "worst": worst, "tolerance": args.tolerance}))
    return 0 if worst < args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
