"""Reading and writing DiT checkpoints.

Formats read:
- the original Wan2.1 layout: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards
  listed by ``diffusion_pytorch_model.safetensors.index.json``), or ``.pth``/``.pt`` files; or a single weights file;
- the diffusers layout (``WanTransformer3DModel`` in config.json): keys are mapped to Wan's names.

Format written: the original Wan2.1 layout (safetensors + config.json, sharded above a size), so the checkpoints
of this project load wherever Wan2.1 checkpoints do, with the additions (audio, reference) as extra keys.

Loading is strict: missing, unexpected and mis-shaped keys are all reported in one error. Modules that this
project adds to Wan2.1 (see :func:`is_addition`) may be absent: they are initialised so that their output is
zero at first and the loader says which ones it initialised.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import DiTConfig, s2v_original_config

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".index.json"
ADDITION_PREFIXES = ("audio_proj.", "interact_audio_proj.", "ref_embedding.", "audio_modulation.")
ADDITION_INFIXES = (".audio_attn.", ".interact_audio_attn.")

# diffusers WanTransformer3DModel name -> Wan2.1 name (regex, replacement), applied in order.
DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_(q|k|v)\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.norm_(q|k)\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_(q|k|v)\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.norm_(q|k)\.", r"blocks.\1.cross_attn.norm_\2."),
    # diffusers calls the cross-attention norm norm2 (and the FFN norm norm3); Wan the other way round.
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


# Keys only Wan2.2-S2V's model has (its audio encoder and injector, FramePack, the condition mask).
S2V_MARKERS = ("casual_audio_encoder.", "audio_injector.", "frame_packer.", "trainable_cond_mask.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message lists every problem."""


def is_addition(name: str) -> bool:
    """True for parameters of modules this project adds to Wan2.1 (absent from a plain Wan checkpoint)."""
    return name.startswith(ADDITION_PREFIXES) or any(s in name for s in ADDITION_INFIXES)


def diffusers_to_wan_key(key: str) -> str:
    for pattern, repl in DIFFUSERS_TO_WAN:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def config_from_diffusers(values: dict) -> dict:
    """diffusers ``WanTransformer3DModel`` config -> :class:`DiTConfig` fields."""
    heads = values.get("num_attention_heads", 40)
    return {
        "patch_size": values.get("patch_size", (1, 2, 2)),
        "in_dim": values.get("in_channels", 16),
        "out_dim": values.get("out_channels") or values.get("in_channels", 16),
        "dim": heads * values.get("attention_head_dim", 128),
        "ffn_dim": values.get("ffn_dim", 13824),
        "freq_dim": values.get("freq_dim", 256),
        "text_dim": values.get("text_dim", 4096),
        "num_heads": heads,
        "num_layers": values.get("num_layers", 40),
        "eps": values.get("eps", 1e-6),
        "qk_norm": bool(values.get("qk_norm", "rms_norm_across_heads")),
        "cross_attn_norm": values.get("cross_attn_norm", True),
    }


def _checkpoint_files(path: Path) -> tuple[list[Path], dict | None]:
    """Weight files of a checkpoint folder or file, and its config.json (None if absent)."""
    if path.is_file():
        cfg_file = path.parent / "config.json"
        return [path], (json.loads(cfg_file.read_text()) if cfg_file.is_file() else None)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {path} holds no *.safetensors, *.pth or *.pt weights")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path}: shards listed in the index are missing: {missing}")
    return files, config


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    """One weights file's tensors (a ``.pth`` memory-mapped); one clear line for a file that cannot be read."""
    try:
        if f.suffix == ".safetensors":
            return load_file(str(f))
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(part, dict) and "state_dict" in part and isinstance(part["state_dict"], dict):
            part = part["state_dict"]
        return {k: v for k, v in part.items() if isinstance(v, torch.Tensor)}
    except Exception as err:  # corrupt or foreign files: one clear line, not a library traceback
        raise CheckpointError(f"cannot read checkpoint file {f}: {err}") from err


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape and dtype, from the safetensors headers (a ``.pth`` is memory-mapped), without reading
    the weights."""
    out = {}
    for f in files:
        if f.suffix != ".safetensors":
            out.update({k: (tuple(v.shape), v.dtype) for k, v in _read_file(f).items()})
            continue
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    out[key] = (tuple(part.get_shape()), SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32))
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint file {f}: {err}") from err
    return out


def _is_diffusers(raw_config: dict | None, keys) -> bool:
    return (raw_config or {}).get("_class_name") == "WanTransformer3DModel" or any(
        k.startswith("condition_embedder.") for k in keys)


# Architecture fields that change the computation but no weight's shape: a config that differs from the checkpoint's
# own config.json in one of them would load without complaint and compute something else.
UNSEEN_BY_SHAPES = ("num_heads", "rope_theta", "audio_feature_norm")


def unseen_differences(ckpt_config: dict | None, config: DiTConfig) -> list[tuple[str, object, object]]:
    """``(field, checkpoint's value, config's value)`` for each of :data:`UNSEEN_BY_SHAPES` that the checkpoint's
    config.json states and ``config`` contradicts."""
    if not ckpt_config:
        return []
    return [(k, ckpt_config[k], getattr(config, k)) for k in UNSEEN_BY_SHAPES
            if k in ckpt_config and ckpt_config[k] != getattr(config, k)]


def load_dit(path: str | Path, config: DiTConfig | None = None, dtype: torch.dtype | None = None, device="cpu"):
    """Build an :class:`AvatarDiT` and load ``path`` into it (see the module doc for formats and rules).

    ``config`` overrides the checkpoint's config.json (for example a preset with audio modules on top of a plain
    Wan checkpoint); without either, the checkpoint cannot be loaded. The built model carries the names of the
    additions it initialised in ``model.initialised_modules``.

    The keys are checked from the files' headers first; then the shards are read one at a time, each converted and
    assigned into the model (built on the meta device) before the next is read, so the host holds the model plus
    about one shard, never the whole checkpoint twice.
    """
    from .dit import AvatarDiT

    files, raw_config = _checkpoint_files(Path(path))
    headers = read_headers(files)
    diffusers = _is_diffusers(raw_config, headers)
    rename = diffusers_to_wan_key if diffusers else (lambda k: k)
    headers = {rename(k): v for k, v in headers.items()}
    ckpt_config = (config_from_diffusers(raw_config) if raw_config else None) if diffusers else raw_config
    if config is None:
        if ckpt_config is None:
            raise CheckpointError(f"checkpoint {path} has no config.json; pass a model config")
        config = DiTConfig.from_dict(ckpt_config)
    is_s2v = any(k.startswith(S2V_MARKERS) for k in headers)
    if is_s2v != (config.family == "s2v"):
        found, wanted = ("a Wan2.2-S2V", "an S2V") if is_s2v else ("a Wan2.1-family", "a Wan2.1-family")
        raise CheckpointError(
            f"checkpoint {path} is {found} model ({'it has' if is_s2v else 'it lacks'} S2V's audio encoder and "
            f"injector keys) but the model config is of family {config.family!r}; pick {wanted} preset "
            f"({'model=wan2.2-s2v-14b or model=liveavatar-14b' if is_s2v else 'model=wan2.1-14b, wan2.1-1.3b, ...'})")
    with torch.device("meta"):
        model = AvatarDiT(config)
    expected = model.state_dict()

    problems = []
    missing = [k for k in expected if k not in headers and not is_addition(k)]
    unexpected = [k for k in headers if k not in expected]
    shapes = [
        f"{k}: checkpoint {headers[k][0]} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in headers and headers[k][0] != tuple(v.shape)
    ]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    unseen = unseen_differences(ckpt_config, config)
    if unseen:
        raise CheckpointError(
            f"checkpoint {path} was saved with " + ", ".join(f"{k}={ckpt!r}" for k, ckpt, _ in unseen)
            + " but the model config says " + ", ".join(f"{k}={ours!r}" for k, _, ours in unseen)
            + " (the weights fit either way, the computation does not); pass "
            + " ".join(f"model.dit.{k}={ckpt}" for k, ckpt, _ in unseen))

    target = dtype or next(iter(headers.values()))[1]
    for f in files:  # one shard at a time
        _assign_file(model, f, rename, device, target)

    absent = sorted({_module_of(k) for k in expected if k not in headers})
    if absent:
        for name in absent:
            module = model.get_submodule(name)
            module.to_empty(device=device)
            model.init_addition(name, module)
            module.to(target)
        log.info("initialised modules absent from %s (zero output at first): %s", path, ", ".join(absent))
    model.initialised_modules = absent
    return model


def _assign_file(model, f: Path, rename, device, dtype: torch.dtype) -> None:
    """Read one weights file and assign its tensors into ``model``, each converted to ``device`` / ``dtype`` (float
    tensors only) and its original released at once; nothing of the file outlives the call but the model's
    parameters."""
    loaded, part = _read_file(f), {}
    for key in list(loaded):
        tensor = loaded.pop(key)
        part[rename(key)] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        del tensor
    model.load_state_dict(part, strict=False, assign=True)


def _module_of(key: str) -> str:
    """The addition module a parameter belongs to (``blocks.3.audio_attn.attn.q.weight`` -> ``blocks.3.audio_attn``)."""
    for prefix in ADDITION_PREFIXES:
        if key.startswith(prefix):
            return prefix.rstrip(".")
    for infix in ADDITION_INFIXES:
        if infix in key:
            head = key.split(infix)[0]
            return head + infix.rstrip(".")
    raise KeyError(key)


def _short(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def save_dit(model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write ``model`` in the original Wan2.1 layout; shards above ``max_shard_bytes`` (default 10 GB) with an
    index json. Files are written under temporary names and renamed, so a crash never leaves a complete-looking
    but partial checkpoint."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_shard_bytes = max_shard_bytes or 10 * 1024**3
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    if model.config.family == "s2v":  # the original's own config, so its code can build this checkpoint's model
        config = s2v_original_config(model.config)
    else:
        config = {"_class_name": "WanModel", "model_type": "t2v", **model.config.to_dict()}
    written: list[tuple[Path, Path]] = []

    def stage(name: str) -> Path:
        final = path / name
        tmp = path / f".{name}.tmp"
        written.append((tmp, final))
        return tmp

    if len(shards) == 1:
        save_file(shards[0], str(stage(WEIGHTS_NAME)), metadata={"format": "pt"})
    else:
        weight_map = {}
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        for i, shard in enumerate(shards, 1):
            name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(stage(name)), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        stage(WEIGHTS_NAME + INDEX_SUFFIX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    stage("config.json").write_text(json.dumps(config, indent=2))
    for tmp, final in written:
        os.replace(tmp, final)
