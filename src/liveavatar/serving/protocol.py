"""The WebSocket protocol between the page and the server, checked here; every mistake is a
:class:`ProtocolError` whose message is one line for the client.

Client -> server:

* first, text: ``{"type": "start", "image": NAME}`` (one of ``GET /api/images``) or
  ``{"type": "start", "image_data": "data:image/png;base64,..."}`` (an uploaded png/jpg/webp);
* then binary: the microphone, 16 kHz mono PCM, signed 16-bit little-endian, in chunks of any whole number of
  samples, sent as captured (audio sent while the session waits in the queue is ignored);
* text ``{"type": "stop"}`` ends the session (closing the socket does too).

Server -> client: text ``{"type": "queued", "position": P, "waiting": N}`` while waiting; ``{"type": "started",
"mime": ..., "fps": ..., ...}`` when served; then binary fragmented MP4 (the init segment, then one fragment per
block), each fragment followed by text ``{"type": "block", ...}`` (see :mod:`.session`); at the end
``{"type": "ended", "reason": ...}`` or ``{"type": "error", "message": ...}``, then the server closes the socket.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import media

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_DATA_URL_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class ProtocolError(ValueError):
    """A message the server cannot take; the message is one line for the client."""


def parse_json(text: str, what: str = "message") -> dict:
    """A text message -> its JSON object with a ``type``."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise ProtocolError(f"{what}: not JSON: {text[:60]!r}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(f"{what}: expected a JSON object with a \"type\", got {text[:60]!r}")
    return message


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Signed 16-bit little-endian mono PCM -> float32 ``[samples]`` in [-1, 1)."""
    if len(data) % 2:
        raise ProtocolError(f"audio: {len(data)} bytes is not a whole number of 16-bit samples")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def gallery(folder: str | os.PathLike) -> dict[str, Path]:
    """The reference images the page offers: ``name -> path`` of the image files directly in ``folder``."""
    folder = Path(folder)
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def start_image(message: dict, images: dict[str, Path], size: tuple[int, int], max_bytes: int) -> torch.Tensor:
    """The reference a start message names -> ``[3, H, W]`` float32 in [-1, 1] at ``size`` (centre-cropped and
    resized as :func:`liveavatar.media.read_image` does)."""
    if message.get("type") != "start":
        raise ProtocolError(f"expected a start message first, got type {message.get('type')!r}")
    if message.get("image_data") is not None:
        return _decode_data_url(message["image_data"], size, max_bytes)
    name = message.get("image")
    if not isinstance(name, str) or name not in images:
        raise ProtocolError(f"start: image {name!r} is not one of the server's images ({', '.join(images) or 'none'})"
                            "; or send image_data")
    try:
        return media.read_image(images[name], size=size)
    except media.MediaError as err:
        raise ProtocolError(f"start: {err}") from None


def _decode_data_url(url, size: tuple[int, int], max_bytes: int) -> torch.Tensor:
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise ProtocolError("start: image_data must be a data: URL (data:image/png;base64,...)")
    header, payload = url[5:].split(",", 1)
    kind, _, encoding = header.partition(";")
    if kind not in _DATA_URL_TYPES or encoding != "base64":
        raise ProtocolError(f"start: image_data of type {header[:40]!r}; send a base64 png, jpeg or webp")
    if len(payload) * 3 // 4 > max_bytes:
        raise ProtocolError(f"start: the image is larger than {max_bytes / 2**20:g} MB (server.max_image_mb)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("start: image_data is not valid base64") from None
    # The image readers take files: a temporary one, gone when read.
    with tempfile.TemporaryDirectory(prefix="liveavatar-upload-") as folder:
        path = Path(folder) / f"upload{_DATA_URL_TYPES[kind]}"
        path.write_bytes(data)
        try:
            return media.read_image(path, size=size)
        except media.MediaError:
            raise ProtocolError(f"start: the uploaded {kind} could not be decoded as an image") from None
