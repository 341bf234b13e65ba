import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from liveavatar.models import AvatarDiT, DiTConfig

ROOT = Path(__file__).resolve().parents[1]

# The machine's two cores, unless OMP_NUM_THREADS says otherwise. Beside other CPU jobs run the suite with
# OMP_NUM_THREADS=1 (its subprocesses inherit it): there two threads per job mostly wait on each other, and the tiny
# models' forwards get 10-20x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2").split(",")[0] or 2))


def tiny_config(**overrides) -> DiTConfig:
    values = dict(
        in_dim=4, out_dim=4, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, text_len=8, num_heads=4, num_layers=2,
        frames_per_block=2, reference="none",
    )
    values.update(overrides)
    return DiTConfig(**values)


def randomise(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (a fresh Wan model has a zero head and predicts zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    def build(**overrides):
        torch.manual_seed(0)
        return randomise(AvatarDiT(tiny_config(**overrides))).eval()

    return build


def tiny_preset() -> DiTConfig:
    """The DiT of ``conf/model/tiny.yaml`` (the preset infer.py streams by default)."""
    return DiTConfig.from_dict(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny.yaml").dit))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny-preset model whose every parameter is random and non-zero, for ``checkpoint=``.

    A freshly built model has a zero output head, so it predicts a zero velocity and two engines that agree on
    it only agree on their noise; this one makes engine comparisons compare the model's computation. The small
    std keeps the streamed latents finite and the decoded frames away from 0 and 255.
    """
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    torch.manual_seed(0)
    randomise(AvatarDiT(tiny_preset()), std=0.05, seed=1).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def one_thread():
    """Run the body on one CPU thread (then restore the count): as the tests' TPP ranks and ``OMP_NUM_THREADS=1``
    subprocesses run. CPU kernels split reductions by thread count, so results compared with theirs to the last
    bit (or to rounding) must come from one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compose_in(config_name: str, overrides) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, as its script's command line composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def infer_in_process(overrides) -> str:
    """Run ``infer.py overrides`` in this process (what its main does on success: ``liveavatar.inference.run`` on
    the composed ``conf/infer.yaml``) on :func:`one_thread`, and return what it printed on stderr. Spares the fresh
    interpreter, which spends about 10 s of CPU importing torch, diffusers and hydra."""
    from liveavatar.inference import run

    cfg, stderr = compose_in("infer", overrides), io.StringIO()
    with one_thread(), contextlib.redirect_stderr(stderr):
        run(cfg)
    return stderr.getvalue()


@pytest.fixture(autouse=True)
def autograd_stays_on():
    """Library entry points (inference, preprocessing, evaluation) run without gradients inside their own call;
    none may switch autograd off for the whole process (the training code run after them would silently get no
    gradients)."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd switched off for the whole process")
