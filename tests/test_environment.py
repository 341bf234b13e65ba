"""The install must never pull torchvision, torchaudio or torchcodec: on CPU machines their wheels need CUDA
libraries and break `import diffusers` / `import transformers`."""
import importlib.metadata as md
import importlib.util

import pytest


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_forbidden_package_is_absent(name):
    with pytest.raises(md.PackageNotFoundError):
        md.version(name)
    assert importlib.util.find_spec(name) is None


def test_declared_dependencies_do_not_name_them():
    requires = md.requires("liveavatar") or []
    assert not [r for r in requires if r.split()[0].lower().startswith(("torchvision", "torchaudio", "torchcodec"))]


def test_diffusers_is_pinned_for_the_streaming_vae():
    import diffusers

    pins = [r for r in md.requires("liveavatar") if r.startswith("diffusers")]
    assert pins == [f"diffusers=={diffusers.__version__}"]
