"""GenBench suites: the cases a benchmark streams, from a manifest file or built in.

A case is a reference image, an audio track (played once, or looped to ``seconds``), a prompt, a duration, an
optional ground-truth video and optional tags (style, view, framing, ...) that results are also grouped by.

- Manifests are YAML (a list of cases, or ``{cases: [...]}``) or JSONL (one case per line); relative paths are read
  from the manifest's folder. :func:`manifest_from_folder` writes one for a folder of images, audio and prompts
  (``scripts/make_genbench_manifest.py``). The paper's GenBench-Short (~100 cases of ~10 s) and GenBench-Long (15
  cases of > 5 min, audio looped) are such manifests, supplied by the user.
- ``toy``: held-out clips of the toy world made on the fly (exact lip-sync and identity measures, ground truth).
- ``toy_long``: toy clips whose audio is looped to minutes, scored over time windows (the long-horizon stress
  test at a scale a CPU can stream).
- ``toy_interactive``: toy conversations (the avatar talks in its turns, nods to the other voice in the
  other's), streamed with both voices and the turns, for a listening model (``model.dit.listening``); scored for
  motion while listening and while speaking, nodding in time with the other voice, and lip sync while speaking.
  Manifest cases carry a conversation as ``listen_audio`` (the other voice) and ``audio_mask`` (speaking labels).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..components import SAMPLE_RATE
from ..data import toy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".ogg")
CASE_KEYS = {"id", "image", "audio", "prompt", "seconds", "loop_audio", "truth", "tags", "toy_seed", "conversation",
             "listen_audio", "audio_mask"}


class SuiteError(ValueError):
    """A manifest or suite that cannot be used (one line for the user)."""


@dataclass
class Case:
    """One benchmark case. ``toy_seed`` set: the toy world renders the image, audio and ground truth."""

    id: str
    image: str | None = None
    audio: str | None = None
    prompt: str = "a person talking to the camera"
    seconds: float | None = None        # None: the audio's own length
    loop_audio: bool = False            # repeat the audio until ``seconds``
    truth: str | None = None            # a ground-truth video file
    tags: dict[str, str] = field(default_factory=dict)
    toy_seed: int | None = None
    conversation: bool = False          # toy: a conversation (two voices, turns) instead of a monologue
    listen_audio: str | None = None     # the interlocutor's voice (a listening model's second stream)
    audio_mask: str | None = None       # speaking labels (models/interaction.py's formats)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaseInputs:
    """What a case streams from: ``image [3, H, W]`` in [-1, 1] (or a path), ``wav`` mono 16 kHz, and the
    ground-truth video ``[3, T, H, W]`` when known."""

    image: torch.Tensor | str
    wav: np.ndarray
    truth: torch.Tensor | None
    listen_wav: np.ndarray | None = None      # the interlocutor's voice
    speaking: np.ndarray | str | None = None  # who holds the turn per video frame (or a labels file)


def _case(entry: dict, base: Path, where: str) -> Case:
    if not isinstance(entry, dict):
        raise SuiteError(f"{where}: a case must be a mapping, got {type(entry).__name__}")
    unknown = set(entry) - CASE_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(CASE_KEYS)})")
    if "id" not in entry:
        raise SuiteError(f"{where}: every case needs an id")
    case = Case(**{k: v for k, v in entry.items()})
    case.id = str(case.id)
    if case.toy_seed is None:
        for key in ("image", "audio"):
            value = getattr(case, key)
            if not value:
                raise SuiteError(f"{where} (case {case.id}): needs {key}")
            path = (base / value) if not Path(value).is_absolute() else Path(value)
            if not path.exists():
                raise SuiteError(f"{where} (case {case.id}): {key} {path} not found")
            setattr(case, key, str(path))
        if case.truth:
            case.truth = str(base / case.truth) if not Path(case.truth).is_absolute() else case.truth
        for key in ("listen_audio", "audio_mask"):
            value = getattr(case, key)
            if value:
                path = (base / value) if not Path(value).is_absolute() else Path(value)
                if not path.exists():
                    raise SuiteError(f"{where} (case {case.id}): {key} {path} not found")
                setattr(case, key, str(path))
    if case.loop_audio and not case.seconds:
        raise SuiteError(f"{where} (case {case.id}): loop_audio needs seconds")
    case.tags = {str(k): str(v) for k, v in (case.tags or {}).items()}
    return case


def load_manifest(path: str | Path) -> list[Case]:
    """The cases of a YAML or JSONL manifest (paths relative to its folder); one-line errors."""
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"bench={path}: manifest not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        try:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise SuiteError(f"bench={path}: not JSONL ({err})") from err
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SuiteError(f"bench={path}: not YAML ({str(err).splitlines()[0]})") from err
        entries = data.get("cases") if isinstance(data, dict) else data
    else:
        raise SuiteError(f"bench={path}: a manifest is .yaml, .yml or .jsonl")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"bench={path}: no cases")
    cases = [_case(e, path.parent, f"bench={path} case {i}") for i, e in enumerate(entries)]
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"bench={path}: case ids must be unique")
    return cases


def toy_suite(clips: int, seconds: float, seed: int) -> list[Case]:
    """Held-out toy clips, one case each, with ground truth."""
    return [Case(id=f"toy_{seed + i}", seconds=seconds, toy_seed=seed + i, tags={"suite": "toy"})
            for i in range(clips)]


def toy_long_suite(clips: int, seconds: float, seed: int, loop_seconds: float) -> list[Case]:
    """Toy clips of ``loop_seconds`` whose audio is looped to ``seconds`` (no ground truth past the first loop)."""
    return [Case(id=f"toy_long_{seed + i}", seconds=seconds, loop_audio=True, toy_seed=seed + i,
                 tags={"suite": "toy_long", "loop_s": f"{loop_seconds:g}"}) for i in range(clips)]


def toy_interactive_suite(clips: int, seconds: float, seed: int) -> list[Case]:
    """Held-out toy conversations, one case each, with ground truth."""
    return [Case(id=f"toy_interactive_{seed + i}", seconds=seconds, toy_seed=seed + i, conversation=True,
                 tags={"suite": "toy_interactive"}) for i in range(clips)]


def looped(wav: np.ndarray, samples: int) -> np.ndarray:
    """``wav`` repeated (and cut) to ``samples`` samples."""
    reps = -(-samples // max(len(wav), 1))
    return np.tile(wav, reps)[:samples]


def case_inputs(case: Case, resolution: tuple[int, int], fps: float, loop_seconds: float | None = None) -> CaseInputs:
    """Render (toy) or read the case's inputs; audio looped or cut to ``case.seconds``."""
    if case.toy_seed is not None:
        base = loop_seconds if case.loop_audio and loop_seconds else case.seconds or 4.0
        clip = toy.make_clip(case.toy_seed, int(round(base * fps)), size=tuple(resolution), fps=fps,
                             sample_rate=SAMPLE_RATE, conversation=case.conversation)
        wav, truth = clip.wav, None if case.loop_audio else clip.video
        image: torch.Tensor | str = clip.reference
        listen, speaking = clip.listen_wav, clip.speaking
    else:
        from ..media import read_audio

        wav, truth, image = read_audio(case.audio, SAMPLE_RATE), None, case.image
        listen = read_audio(case.listen_audio, SAMPLE_RATE) if case.listen_audio else None
        speaking = case.audio_mask
        if case.truth:
            from ..media import iter_video_frames

            truth = torch.stack(list(iter_video_frames(case.truth, fps, tuple(resolution))), dim=1)
    if case.seconds:
        samples = int(round(case.seconds * SAMPLE_RATE))
        wav = looped(wav, samples) if case.loop_audio else wav[:samples]
        if listen is not None:
            listen = looped(listen, samples) if case.loop_audio else listen[:samples]
        if isinstance(speaking, np.ndarray) and case.loop_audio:
            speaking = looped(speaking, int(round(case.seconds * fps)))
    return CaseInputs(image, np.asarray(wav, dtype=np.float32), truth,
                      None if listen is None else np.asarray(listen, dtype=np.float32), speaking)


def manifest_from_folder(folder: str | Path, out: str | Path, seconds: float | None = None,
                         loop_audio: bool = False, prompt: str = "a person talking to the camera") -> list[Case]:
    """A manifest for every image in ``folder`` with an audio file of the same stem (and, optionally, a ``.txt``
    prompt of the same stem); written as JSONL (``out`` ending in .jsonl) or YAML. Returns the cases."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise SuiteError(f"{folder}: not a folder")
    cases = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        audio = next((image.with_suffix(s) for s in AUDIO_SUFFIXES if image.with_suffix(s).exists()), None)
        if audio is None:
            continue
        text = image.with_suffix(".txt")
        cases.append(Case(id=image.stem, image=str(image.relative_to(folder)) if out.parent == folder else str(image),
                          audio=str(audio.relative_to(folder)) if out.parent == folder else str(audio),
                          prompt=text.read_text().strip() if text.exists() else prompt, seconds=seconds,
                          loop_audio=loop_audio))
    if not cases:
        raise SuiteError(f"{folder}: no image with an audio file of the same name")
    rows = [{k: v for k, v in c.to_dict().items() if v not in (None, {}, False) and k != "toy_seed"} for c in cases]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import yaml

        out.write_text(yaml.safe_dump({"cases": rows}, sort_keys=False))
    return cases
