"""How much of the noise a trained toy model removes, per noise level: the x0 error of one forward on held-out toy
clips (the training forward, with the run's own block-causal mask, window and sink positions), next to the error of
not denoising at all (the noise's own size, sigma * E|noise|), and the lip sync of that x0 estimate (Pearson r of
the mouth opening read from its pixels against the audio envelope, over all clips' frames): at high noise the x0
estimate can only know the mouth from the audio, so its lip sync there is what the model learnt of the audio.

    python scripts/denoise_probe.py outputs/train/toy_df_sink_rolling        # a train.py run folder

A model that removes little noise at the last steps of sampling leaves visible grain in its video, whatever it
learnt about identity and the mouth; the toy metrics read the mouth from pixels, so grain costs lip sync. Prints
one line per noise level and, last, one JSON object.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def probe(run: Path, timesteps: list[float], clips: int, seed: int) -> list[dict]:
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from liveavatar.data.toy import make_clip
    from liveavatar.metrics.toy import mouth_opening
    from liveavatar.training.datamodule import ToyDataset, collate
    from liveavatar.training.launch import build_module

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.init_from = str(run / "model")
    module = build_module(cfg)
    module.configure_model()
    model, loss = module.model.eval(), module.loss_fn
    data = ToyDataset(clips, int(cfg.data.latent_frames), module.dit_config, seed=seed)
    batch = collate([data[i] for i in range(clips)])
    scenes = [make_clip(data.clip_seed(i), int(cfg.data.latent_frames)) for i in range(clips)]

    def lip_sync(latents: torch.Tensor) -> float:
        """Pearson r over every clip's frames of the decoded mouth opening against the envelope (each clip
        centred on its own means, so clips of different identities pool)."""
        video = data.vae.decode(latents).clamp(-1.0, 1.0)
        opening, envelope = [], []
        for clip, scene in zip(video, scenes):
            mouth = mouth_opening(clip, scene.reference)
            opening.append(mouth - mouth.mean())
            envelope.append(scene.envelope - scene.envelope.mean())
        return float(np.corrcoef(np.concatenate(opening), np.concatenate(envelope))[0, 1])

    x0 = batch["latents"].float()
    b, _, frames = x0.shape[:3]
    g = torch.Generator().manual_seed(0)
    placement = {}
    if loss.causal and loss.positions is not None:
        frame_pos, sink_pos = loss.positions.training_positions(b, frames, g, "cpu")
        placement = dict(frame_pos=frame_pos, reference_pos=sink_pos[..., None],
                         window_blocks=loss.positions.window_blocks)
    rows = []
    for level in timesteps:
        t = torch.full((b, frames), float(level))
        noise = torch.randn(x0.shape, generator=g)
        xt = loss.flow.add_noise(x0, noise, t)
        with torch.no_grad():
            v = model(xt, t, batch["text"], audio=batch.get("audio"), causal=loss.causal,
                      reference=batch.get("reference"), **placement)
        estimate = loss.flow.x0_from_velocity(xt, v, t)
        x0_error = (estimate - x0).abs().mean().item()
        untouched = (xt - x0).abs().mean().item()   # the error of returning the noisy input as it is
        rows.append({"t": level, "x0_error": x0_error, "noisy_input_error": untouched,
                     "noise_removed": 1.0 - x0_error / untouched, "x0_lip_sync": lip_sync(estimate)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a train.py run folder (config.yaml and model/)")
    p.add_argument("--timesteps", type=float, nargs="+", default=[950, 800, 600, 400, 250, 125, 62.5, 20])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=987654321, help="toy clip seed (training uses data.seed, 0)")
    args = p.parse_args()
    if not (args.run / "config.yaml").is_file() or not (args.run / "model").is_dir():
        print(f"error: {args.run} is not a finished train.py run folder (config.yaml and model/)", file=sys.stderr)
        sys.exit(2)
    rows = probe(args.run, args.timesteps, args.clips, args.seed)
    for r in rows:
        print(f"t={r['t']:7.1f}  x0 error {r['x0_error']:.4f}  (noisy input {r['noisy_input_error']:.4f}: "
              f"{100 * r['noise_removed']:.0f}% of the noise removed)  x0 lip sync {r['x0_lip_sync']:.3f}")
    print(json.dumps({"run": str(args.run), "levels": rows}))


if __name__ == "__main__":
    main()
