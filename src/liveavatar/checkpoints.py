"""``python -m liveavatar.checkpoints inspect PATH [--preset NAME]``: what a checkpoint folder (or file) holds, in
one table, read from the tensors' headers (safetensors) or a memory-mapped load (``.pth``), never the whole weights:
layout (Wan or diffusers key names), family, widths, layers, dtypes, LoRA keys, this project's additions; with
``--preset`` (or the nearest preset by widths) the keys missing, unexpected or of another shape against it. For
finding out fast why a folder does not load.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .models.checkpoint import (S2V_MARKERS, CheckpointError, _checkpoint_files, _is_diffusers, diffusers_to_wan_key,
                                is_addition, read_headers)

HEAD_DIM = 128  # every Wan model's attention head width


@dataclass
class Summary:
    """What :func:`inspect` found."""

    path: Path
    files: int
    layout: str
    family: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: Counter
    lora_keys: int
    widths: dict[str, int | str] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)   # against ``preset``
    preset: str | None = None

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def tensor_headers(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], Counter]:
    """Every tensor's shape and the count of each dtype, without reading the weights."""
    headers = read_headers(files)
    return ({k: shape for k, (shape, _) in headers.items()},
            Counter(str(dtype).removeprefix("torch.") for _, dtype in headers.values()))


def widths(shapes: dict[str, tuple[int, ...]], config: dict | None = None) -> dict[str, int | str]:
    """The architecture the Wan-named shapes imply (``?`` where a key is absent); the head count from the folder's
    config.json, else from Wan's head width of 128."""
    def dim(key: str, axis: int):
        return shapes[key][axis] if key in shapes and len(shapes[key]) > axis else "?"

    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    model_dim = dim("patch_embedding.weight", 0)
    return {"dim": model_dim, "in_dim": dim("patch_embedding.weight", 1), "ffn_dim": dim("blocks.0.ffn.0.weight", 0),
            "text_dim": dim("text_embedding.0.weight", 1), "num_layers": len(layers) if layers else "?",
            "num_heads": _heads(config, model_dim),
            "audio blocks": len({k.split(".")[1] for k in shapes if ".audio_attn." in k})
            or len({k.split(".")[2] for k in shapes if k.startswith("audio_injector.injector.")})}


def _heads(config: dict | None, model_dim) -> int | str:
    config = config or {}
    if config.get("num_heads") or config.get("num_attention_heads"):
        return int(config.get("num_heads") or config["num_attention_heads"])
    return f"{model_dim // HEAD_DIM} (if heads are {HEAD_DIM} wide)" if isinstance(model_dim, int) else "?"


def family(shapes: dict[str, tuple[int, ...]], w: dict) -> str:
    if any(k.startswith(S2V_MARKERS) for k in shapes):
        return "wan2.2-s2v"
    if w.get("in_dim") == 48:
        return "wan2.2-ti2v"
    return "wan2.1 / wan2.2 t2v"


def nearest_preset(w: dict) -> str | None:
    from .models.presets import preset_config, preset_names

    for name in preset_names():
        dit = preset_config(name)["dit"]
        if (dit.get("dim"), dit.get("num_layers"), dit.get("in_dim")) == (w["dim"], w["num_layers"], w["in_dim"]):
            return name
    return None


def against_preset(shapes: dict[str, tuple[int, ...]], name: str) -> dict[str, list[str]]:
    """Keys missing (of the base), unexpected, or of another shape against preset ``name``'s DiT."""
    from .models.presets import from_preset

    expected = {k: tuple(v.shape) for k, v in from_preset(name).state_dict().items()}
    base = {k: v for k, v in shapes.items() if "lora_" not in k}
    return {
        "missing": [k for k in expected if k not in base and not is_addition(k)],
        "additions absent (initialised at load)": [k for k in expected if k not in base and is_addition(k)],
        "unexpected": [k for k in base if k not in expected],
        "other shape": [f"{k}: {base[k]} vs {expected[k]}" for k in expected if k in base and base[k] != expected[k]],
    }


def inspect(path: str | Path, preset: str | None = None) -> Summary:
    files, config = _checkpoint_files(Path(path))
    shapes, dtypes = tensor_headers(files)
    layout = "diffusers" if _is_diffusers(config, shapes) else "wan"
    if layout == "diffusers":
        shapes = {diffusers_to_wan_key(k): v for k, v in shapes.items()}
    lora = sum(1 for k in shapes if "lora_A" in k or "lora_B" in k or "lora_down" in k or "lora_up" in k)
    w = widths(shapes, config)
    summary = Summary(Path(path), len(files), layout, family(shapes, w), shapes, dtypes, lora, w)
    summary.preset = preset or nearest_preset(w)
    if summary.preset is not None:
        summary.problems = against_preset(shapes, summary.preset)
    return summary


def _examples(items: list[str], limit: int = 3) -> str:
    return "" if not items else " (" + ", ".join(items[:limit]) + (", ..." if len(items) > limit else "") + ")"


def table(s: Summary) -> str:
    rows = [("path", str(s.path)), ("files", str(s.files)), ("key names", s.layout), ("family", s.family),
            ("tensors", str(len(s.shapes))), ("parameters", f"{s.parameters:,}"),
            ("dtypes", ", ".join(f"{d} x{n}" for d, n in s.dtypes.most_common())),
            ("LoRA keys", str(s.lora_keys) if s.lora_keys else "none")]
    rows += [(k, str(v)) for k, v in s.widths.items()]
    additions = sorted({k.split(".")[0] if not k.startswith("blocks.") else "blocks.N." + k.split(".")[2]
                        for k in s.shapes if is_addition(k)})
    plain = "none (a plain Wan2.2-S2V checkpoint)" if s.family == "wan2.2-s2v" else "none (a plain Wan checkpoint)"
    rows.append(("project additions", ", ".join(additions) if additions else plain))
    if s.preset is None:
        rows.append(("preset", "no preset has these widths (pass --preset NAME to compare)"))
    else:
        fits = not (s.problems["missing"] or s.problems["unexpected"] or s.problems["other shape"])
        rows.append(("preset", f"{s.preset}: {'fits' if fits else 'does NOT fit'}"))
        for kind, items in s.problems.items():
            rows.append((f"  {kind}", f"{len(items)}{_examples(items)}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m liveavatar.checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="what a checkpoint holds, and whether it fits a preset")
    q.add_argument("path")
    q.add_argument("--preset", default=None, help="compare against this model preset (default: the one whose "
                                                   "widths match, if any)")
    args = p.parse_args(argv)
    try:
        print(table(inspect(args.path, args.preset)))
    except (CheckpointError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
