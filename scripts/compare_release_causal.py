"""Check this project's streaming of the S2V family against Live Avatar's released causal model (not run in CI: the
release cannot be vendored).

Given a checkout of Alibaba-Quark/LiveAvatar, this builds the release's ``CausalWanModel_S2V`` with a tiny
configuration and random weights everywhere (the zero-initialised paths included), loads the same weights here
strictly (the key names are the same), and streams the same blocks through both:

- the release, driven as its single-GPU pipeline drives it (``release_causal_driver.py``): one sink prefill with
  the reference latent and the FramePack tokens of the motion latents at timestep 0, then one forward per block
  against one KV cache (the current block and the three before it), the sink's reference re-rotated by Rolling
  RoPE with the offset ``D`` (the release draws it from 4..30 on every forward; here it is fixed per run);
- here, :class:`~liveavatar.engine.stream.StreamCore` with what ``model=liveavatar-14b`` sets
  (``model.sink_motion=true``, ``model.window_blocks=3``, ``model.rope.policy=rolling`` with
  ``rolling_offset=D``), one cache lane written by every forward, as one denoising step's lane is.

Every block gets its own noisy input and one of the release's four timesteps. The stream is long enough for the
ring to wrap and for Rolling RoPE to move the reference past its training position 30. Printed: one line per
``D`` with the relative error ``max |ours - release| / max |release|`` over all blocks, and two controls that must
fail (ours with the offset off by one, ours without the motion tokens in the sink), then one JSON object. Exit
status 1 when an error reaches ``--tolerance`` (default 1e-4) or a control stays below it.

    python scripts/compare_release_causal.py --liveavatar /path/to/LiveAvatar

Everything runs in float32 on the CPU; the precision patches the driver applies to the release (its RoPE tables
in half precision, one bfloat16 cast, flash-attention) are listed in ``release_causal_driver.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import release_causal_driver as release  # noqa: E402

from liveavatar.engine.stream import EngineSettings, StreamCore  # noqa: E402
from liveavatar.models import AvatarDiT, DiTConfig  # noqa: E402



def our_config(original: dict) -> DiTConfig:
    """The release's constructor arguments read as an original S2V config.json is read."""
    return DiTConfig.from_dict({**original, "model_type": "s2v", "patch_size": tuple(original["patch_size"]),
                                "frames_per_block": release.NUM_FRAMES_PER_BLOCK})


def stream_ours(model: AvatarDiT, inputs: dict, d: int, sink_motion: bool = True) -> list[torch.Tensor]:
    """One forward per block through one cache lane, as the release's pipeline does for one denoising step."""
    settings = EngineSettings(steps=[1000.0], shift=1.0, sink="reference", history="timestep_forced",
                              window_blocks=release.RING_BLOCKS - 1, rope_policy="rolling", rolling_offset=d,
                              sink_motion=sink_motion)
    ref = inputs["ref_latents"]
    core = StreamCore(model, settings, tuple(ref.shape[i] for i in (1, 3, 4)), inputs["context"], ref, lanes=1,
                      sink_motion=inputs["motion_latents"] if sink_motion else None)
    features = inputs["audio"].permute(0, 3, 1, 2)  # [1, layers, feat, V] -> [1, V, layers, feat]
    blocks = model.audio_block_inputs(features, len(inputs["noise_blocks"]))
    out = []
    with torch.no_grad():
        for b, (x, t) in enumerate(zip(inputs["noise_blocks"], inputs["timesteps"])):
            audio = core.audio_tokens(blocks[b])
            out.append(core.forward(x, torch.tensor([float(t)]), [0], [b], audio, write=True))
    return out


def relative_error(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    a, b = torch.cat(ours, dim=2), torch.cat(theirs, dim=2)
    return float((a - b).abs().max() / b.abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--liveavatar", type=Path, required=True, help="a checkout of Alibaba-Quark/LiveAvatar")
    parser.add_argument("--blocks", type=int, default=14, help="blocks to stream (the ring holds 4)")
    parser.add_argument("--offsets", type=int, nargs="+", default=[4, 17, 30], help="Rolling RoPE offsets D")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model_file = args.liveavatar / "liveavatar/models/wan/causal_model_s2v.py"
    if not model_file.is_file():
        print(f"--liveavatar {args.liveavatar}: no {model_file.relative_to(args.liveavatar)} there", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    original = dict(release.TINY_CONFIG)
    theirs_model = release.build_release_model(str(args.liveavatar), original)
    weights = release.random_state_dict(theirs_model, seed=args.seed, std=0.05)
    del theirs_model
    ours_model = AvatarDiT(our_config(original)).eval()
    ours_model.load_state_dict(weights, strict=True)

    n = args.blocks
    inputs = release.random_inputs(original, 16, 16, n, seed=args.seed + 1)
    results = {}
    for d in args.offsets:
        theirs = release.run_release(str(args.liveavatar), original, weights, inputs, fixed_D=d)
        ours = stream_ours(ours_model, inputs, d)
        err = relative_error(ours, theirs)
        per_block = [relative_error([o], [t]) for o, t in zip(ours, theirs)]
        # Controls: the comparison must tell a wrong offset and a sink without its motion tokens apart.
        wrong_offset = relative_error(stream_ours(ours_model, inputs, d + 1 if d < 30 else d - 1), theirs)
        no_motion = relative_error(stream_ours(ours_model, inputs, d, sink_motion=False), theirs)
        results[f"D={d}"] = {"relative_error": err, "worst_block": max(range(n), key=per_block.__getitem__),
                             "output_scale": float(torch.cat(theirs, dim=2).abs().max()),
                             "control_wrong_offset": wrong_offset, "control_no_sink_motion": no_motion}
        print(f"S2V causal stream, {n} blocks, Rolling RoPE offset D={d}: relative error {err:.3g} "
              f"(controls: offset off by one {wrong_offset:.3g}, no motion tokens in the sink {no_motion:.3g})")
    print(json.dumps(results))
    ok = all(r["relative_error"] < args.tolerance <= min(r["control_wrong_offset"], r["control_no_sink_motion"])
             for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
