"""Text conditioning: prompt -> embeddings ``[B, L, text_dim]`` for the DiT's cross-attention.

Wan2.1 encodes prompts with the encoder of umT5-XXL (``text_dim = 4096``, at most ``text_len = 512`` tokens) and
keeps only the real tokens of each prompt; the DiT zero-pads the context to ``text_len`` itself
(:meth:`~liveavatar.models.dit.AvatarDiT.embed_text`). Every encoder here follows one call contract::

    embeddings, lengths = encoder(prompts)   # [B, L, text_dim] float32, [B] int64

with ``L`` the longest prompt's token count (``<= text_len``) and zeros past each prompt's own length, so the
result may be passed to the DiT as is (zeros there are exactly the padding Wan2.1 adds).

Encoders: :class:`UMT5TextEncoder` (transformers ``UMT5EncoderModel`` from a local folder),
:class:`PrecomputedTextEncoder` (embeddings saved by :func:`save_precomputed`, for machines without the
11 GB text encoder), :class:`RandomTextEncoder` (weight-free and deterministic, for tests and CPU demos).
:func:`build_text_encoder` picks one from a config.
"""
from __future__ import annotations

import html
import re
import zlib
from pathlib import Path
from typing import Protocol, Sequence

import torch

# Model types whose encoder is the T5 family (umT5 is what Wan2.1 uses; plain T5/mT5 load the same way).
_T5_MODEL_TYPES = ("umt5", "t5", "mt5")


class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder."""

    text_dim: int
    text_len: int

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]: ...


def _as_prompt_list(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("text encoder: no prompts given")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"text encoder: prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


def clean_prompt(text: str) -> str:
    """Wan2.1's prompt cleaning (``clean="whitespace"``): fix mojibake (with ``ftfy`` when installed), unescape
    HTML twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs broken unicode; prompts typed by hand rarely need it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _pad_batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L_i, D]`` tensors -> ``[B, max L_i, D]`` zero-padded, and the lengths ``[B]``."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    out = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths


# ------------------------------------------------------------------------------------------------- umT5
class UMT5TextEncoder:
    """The encoder of umT5 (transformers ``UMT5EncoderModel``) and its tokenizer, loaded offline from a local
    folder (``config.json``, weights, tokenizer files; e.g. a download of ``google/umt5-xxl``), or from a
    diffusers Wan pipeline folder (``text_encoder/`` and ``tokenizer/`` subfolders).

    Args:
        path: the folder.
        tokenizer_path: where the tokenizer is when it is not in ``path`` (default: ``path``, or the
            ``tokenizer/`` folder beside a diffusers ``text_encoder/``).
        text_len: most tokens per prompt, ``</s>`` included (longer prompts are truncated, as Wan2.1 does).
        device, dtype: where and in which precision the encoder runs (Wan2.1 runs umT5-XXL in bfloat16);
            the embeddings are returned in float32 on ``device`` either way.
    """

    def __init__(
        self,
        path: str | Path,
        text_len: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer_path: str | Path | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

        path = Path(path)
        if (path / "text_encoder" / "config.json").is_file():  # a diffusers pipeline root
            path, tokenizer_path = path / "text_encoder", tokenizer_path or path / "tokenizer"
        elif tokenizer_path is None and path.name == "text_encoder" and (path.parent / "tokenizer").is_dir():
            tokenizer_path = path.parent / "tokenizer"
        tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else path
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder: {path} is not a folder (expected a umT5 encoder with its tokenizer)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder: {path} has no config.json (expected a umT5 encoder folder)")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as err:  # an unreadable config says nothing more useful than the path
            raise ValueError(f"text encoder: cannot read the config of {path}: {err}") from err
        model_type = getattr(config, "model_type", None)
        if model_type not in _T5_MODEL_TYPES:
            raise ValueError(f"text encoder: {path} holds a {model_type!r} model, not a umT5/T5 encoder")
        if text_len < 1:
            raise ValueError(f"text encoder: text_len must be positive, got {text_len}")
        model_cls = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel, "mt5": MT5EncoderModel}[model_type]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        except Exception as err:
            raise ValueError(f"text encoder: cannot load a tokenizer from {tokenizer_path}: {err}") from err
        # Cast after loading: the dtype keyword of from_pretrained was renamed between transformers 4 and 5.
        self.model = model_cls.from_pretrained(path, local_files_only=True).to(device, dtype).eval()
        self.model.requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.text_len = text_len
        self.text_dim = config.d_model

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, L]`` (``</s>`` appended, truncated to ``text_len``, padded to the
        longest prompt: the encoder's output at real tokens does not depend on how far the batch is padded)."""
        enc = self.tokenizer(
            [clean_prompt(p) for p in _as_prompt_list(prompts)], padding="longest", truncation=True,
            max_length=self.text_len, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` (B strings) -> embeddings ``[B, L, text_dim]`` float32 (zero past each prompt's length)
        and lengths ``[B]``, ``L = max(lengths) <= text_len``."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        # Pad positions hold garbage (they attend to real tokens); Wan2.1 drops them, the DiT sees zeros there.
        return hidden * mask[..., None].to(hidden.dtype), mask.sum(1).long()


# ------------------------------------------------------------------------------------------ precomputed
def save_precomputed(path: str | Path, embeddings: torch.Tensor) -> Path:
    """Save text embeddings ``[L, D]`` or ``[B, L, D]`` to ``.safetensors`` (key ``"context"``) or ``.pt``."""
    path = Path(path)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() not in (2, 3):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"save_precomputed: expected a [L, D] or [B, L, D] tensor, got {shape}")
    tensor = (embeddings[None] if embeddings.dim() == 2 else embeddings).detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"context": tensor}, str(path))
    elif path.suffix in (".pt", ".pth"):
        torch.save(tensor, path)
    else:
        raise ValueError(f"save_precomputed: {path} must end in .safetensors or .pt")
    return path


def load_precomputed(path: str | Path) -> torch.Tensor:
    """Load text embeddings saved by :func:`save_precomputed` (or by hand) -> ``[B, L, D]`` float32.

    ``.safetensors``: the key ``"context"``, or the only key. ``.pt``/``.pth``: a tensor, a dict with
    ``"context"`` (or one entry), or a list of ``[L_i, D]`` tensors (what Wan2.1's ``T5EncoderModel`` returns),
    which is zero-padded to the longest. A ``[L, D]`` tensor becomes ``[1, L, D]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"precomputed text embeddings: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    elif path.suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"precomputed text embeddings: {path} must end in .safetensors or .pt")
    if isinstance(data, dict):
        if "context" in data:
            data = data["context"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise ValueError(f"precomputed text embeddings: {path} has keys {sorted(data)}; expected 'context' or a single key")
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in data):
        data = _pad_batch([t.float() for t in data])[0]
    if not isinstance(data, torch.Tensor) or data.dim() not in (2, 3):
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"precomputed text embeddings: {path} holds {shape}, expected a [L, D] or [B, L, D] tensor")
    return (data[None] if data.dim() == 2 else data).float()


class PrecomputedTextEncoder:
    """Returns embeddings loaded from a file whatever the prompt (the prompt was encoded elsewhere, e.g. on a
    machine with the umT5 weights). A stored batch of one is repeated for every prompt; a stored batch of ``B``
    needs exactly ``B`` prompts. Lengths are the positions up to the last non-zero row."""

    def __init__(self, path: str | Path, text_dim: int | None = None, text_len: int = 512, device: str | torch.device = "cpu"):
        self.path = Path(path)
        emb = load_precomputed(self.path)
        if text_dim is not None and emb.shape[-1] != text_dim:
            raise ValueError(f"precomputed text embeddings: {self.path} have width {emb.shape[-1]}, the model expects text_dim={text_dim}")
        if emb.shape[1] > text_len:
            raise ValueError(f"precomputed text embeddings: {self.path} have {emb.shape[1]} tokens, more than text_len={text_len}")
        nonzero = emb.abs().amax(-1) > 0  # [B, L]
        positions = torch.arange(1, emb.shape[1] + 1)
        self.lengths = (nonzero * positions).amax(1).clamp(min=1)
        self.embeddings = emb.to(device)
        self.text_dim, self.text_len = emb.shape[-1], text_len

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(_as_prompt_list(prompts))
        emb, lengths = self.embeddings, self.lengths
        if emb.shape[0] == 1:
            return emb.expand(n, -1, -1).clone(), lengths.expand(n).clone()
        if emb.shape[0] != n:
            raise ValueError(f"precomputed text embeddings: {self.path} hold {emb.shape[0]} prompts, asked for {n}")
        return emb.clone(), lengths.clone()


# ----------------------------------------------------------------------------------------------- random
class RandomTextEncoder:
    """A weight-free, deterministic stand-in for umT5 (tests, CPU demos): words and punctuation are hashed
    (CRC32, stable across processes, unlike ``hash``) to ids in ``vocab_size``, embedded with a fixed-seed
    normal table ``[vocab_size, text_dim]``, and a ``</s>`` row is appended. The same prompt always gives the
    same embeddings; different prompts give different ones."""

    def __init__(self, text_dim: int, text_len: int = 512, vocab_size: int = 4096, seed: int = 0, device: str | torch.device = "cpu"):
        if text_len < 1 or text_dim < 1:
            raise ValueError(f"random text encoder: text_dim and text_len must be positive, got {text_dim}, {text_len}")
        self.text_dim, self.text_len, self.vocab_size = text_dim, text_len, vocab_size
        gen = torch.Generator().manual_seed(seed)  # CPU generator: the same table on every device
        self.table = torch.randn(vocab_size + 1, text_dim, generator=gen).to(device)  # last row: </s>
        self.device = torch.device(device)

    def token_ids(self, prompt: str) -> list[int]:
        """Ids of a prompt's words (lower-cased), ``</s>`` last, truncated to ``text_len`` keeping ``</s>``."""
        words = re.findall(r"\w+|[^\w\s]", clean_prompt(prompt).lower())
        ids = [zlib.crc32(w.encode("utf-8")) % self.vocab_size for w in words][: self.text_len - 1]
        return ids + [self.vocab_size]

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.table[torch.tensor(self.token_ids(p), device=self.device)] for p in _as_prompt_list(prompts)]
        return _pad_batch(rows)


# ---------------------------------------------------------------------------------------------- factory
TEXT_ENCODER_KINDS = ("umt5", "precomputed", "random")


def build_text_encoder(
    kind: str,
    path: str | Path | None,
    text_dim: int,
    text_len: int = 512,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """The text encoder a config names: ``"umt5"`` (a model folder), ``"precomputed"`` (an embeddings file),
    ``"random"`` (no path). ``text_dim``/``text_len`` are the DiT's; a mismatching encoder is an error."""
    if kind == "random":
        return RandomTextEncoder(text_dim, text_len, device=device)
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text encoder kind must be one of {TEXT_ENCODER_KINDS}, got {kind!r}")
    if path is None:
        raise ValueError(f"text encoder kind {kind!r} needs a path")
    if kind == "precomputed":
        return PrecomputedTextEncoder(path, text_dim, text_len, device)
    encoder = UMT5TextEncoder(path, text_len, device, dtype)
    if encoder.text_dim != text_dim:
        raise ValueError(f"text encoder: {path} has width {encoder.text_dim}, the model expects text_dim={text_dim}")
    return encoder
