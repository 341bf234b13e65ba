"""Weighted metrics with tiny random weights saved in the real formats: Dino-S through transformers' Dinov2Model
(the reference against itself is 1), its one-line error for a missing folder, GenBench picking it up, and the
Frechet distance of FID/FVD against closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from liveavatar.metrics.frechet import frechet_distance, frechet_from_features
from liveavatar.metrics.weights import MissingWeights


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=32)
    folder = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_dino_s_of_the_reference_against_itself_is_one_and_lower_for_other_frames(dino_folder):
    from liveavatar.metrics.dino import DinoSimilarity

    dino = DinoSimilarity.from_pretrained(dino_folder)
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 32, 32, generator=g) * 2 - 1
    other = torch.rand(3, 32, 32, generator=g) * 2 - 1
    video = torch.stack([reference, other, reference], dim=1)
    scores = dino.score(video, reference)
    assert scores.shape == (3,)
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-6) and float(scores[2]) == pytest.approx(1.0, abs=1e-6)
    assert float(scores[1]) < 0.999


def test_a_missing_dino_folder_is_one_line_and_genbench_scores_without_it(tmp_path, dino_folder, capsys):
    from liveavatar.evaluation.metric_set import general_metrics
    from liveavatar.metrics.dino import DinoSimilarity

    with pytest.raises(MissingWeights, match=r"Dino-S: metrics.dino=.*not found \(download a DINOv2"):
        DinoSimilarity.from_pretrained(tmp_path / "absent")
    without = general_metrics({"dino": str(tmp_path / "absent")})
    assert "warning: Dino-S" in capsys.readouterr().err
    with_dino = general_metrics({"dino": str(dino_folder)})
    assert len(with_dino) == len(without) + 1
    video = torch.rand(3, 4, 32, 32) * 2 - 1
    scores = with_dino[-1](video, video[:, 0], np.zeros(1), 25.0, None)
    assert set(scores) == {"dino_s", "dino_s_trend"} and -1 <= scores["dino_s"] <= 1


def test_frechet_distance_is_zero_for_identical_sets_and_matches_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert abs(frechet_from_features(a, a)) < 1e-8
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 1.0])
    expected = float((mu1 - mu2).pow(2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-10)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert frechet_from_features(a, b) == pytest.approx(frechet_from_features(b, a), rel=1e-9)
    assert frechet_from_features(a, b) > 1.0


class TinyI3D(torch.nn.Module):
    """A stand-in with the call signature of the shared I3D TorchScript."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = True) -> torch.Tensor:
        assert x.shape[1:] == (3, 16, 224, 224)
        return self.conv(x).mean(dim=(2, 3, 4))


def test_i3d_features_from_a_torchscript_file_give_fvd_zero_for_the_same_clips(tmp_path):
    from liveavatar.metrics.i3d import I3DFeatures

    torch.manual_seed(0)
    torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    i3d = I3DFeatures.from_file(tmp_path / "i3d.pt")
    g = torch.Generator().manual_seed(1)
    videos = [torch.rand(3, 10, 32, 32, generator=g) * 2 - 1 for _ in range(12)]   # shorter than 16: last repeated
    feats = i3d(videos)
    assert feats.shape == (12, 8) and feats.dtype == torch.float64
    assert frechet_from_features(feats, i3d(videos)) == pytest.approx(0.0, abs=1e-8)
    brighter = i3d([(v + 0.5).clamp(-1, 1) for v in videos])
    assert frechet_from_features(feats, brighter) > 1e-3
    with pytest.raises(MissingWeights, match="FVD: metrics.i3d=.*not found"):
        I3DFeatures.from_file(tmp_path / "absent.pt")


# ------------------------------------------------------------------------------------------------- FID
def test_fid_inception_has_the_released_architecture_and_loads_its_state_dict_strictly(tmp_path):
    """Parameter count against torchvision's published figure: inception_v3 has 27,161,264 parameters, of which
    its auxiliary head (absent from the FID graph) holds 3,326,696; the FID graph has 1008 classes instead of 1000
    (8 more rows of the 2048-wide classifier)."""
    from liveavatar.metrics.inception import FIDInceptionV3, InceptionFeatures

    torch.manual_seed(0)
    model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}  # older exports
    for k in state:
        if k.endswith("running_var"):
            state[k] = torch.rand_like(state[k]) + 0.5   # non-trivial statistics, so loading them matters
    torch.save(state, tmp_path / "pt_inception.pth")
    fid = InceptionFeatures.from_file(tmp_path / "pt_inception.pth", max_frames=3)
    for k, v in state.items():
        torch.testing.assert_close(fid.model.state_dict()[k], v)

    video = torch.rand(3, 7, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats = fid(video)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64
    with torch.no_grad():
        direct = fid.model(video[:, [0, 3, 6]].transpose(0, 1)).double()   # first, middle and last frames
    torch.testing.assert_close(feats, direct)

    renamed = {k.replace("Mixed_7c", "Mixed_7x"): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "other.pth")
    with pytest.raises(MissingWeights, match="not the FID InceptionV3 state dict"):
        InceptionFeatures.from_file(tmp_path / "other.pth")
    with pytest.raises(MissingWeights, match="FID: metrics.inception=.*not found"):
        InceptionFeatures.from_file(tmp_path / "absent.pth")


def test_fid_pools_as_the_tensorflow_graph_does():
    """The A/C/first-E blocks' average pool leaves the zero padding out (a constant map stays constant, border
    included); the last E block pools with a max."""
    from liveavatar.metrics.inception import InceptionE, _avg_pool

    ones = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(_avg_pool(ones), ones)
    assert torch.nn.functional.avg_pool2d(ones, 3, 1, 1)[0, 0, 0, 0] < 0.5  # torch's default counts the padding
    last, first = InceptionE(4, max_pool=True), InceptionE(4, max_pool=False)
    first.load_state_dict(last.state_dict())
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = last.eval()(x), first.eval()(x)
    torch.testing.assert_close(a[:, :-192], b[:, :-192])       # the conv branches agree
    assert (a[:, -192:] - b[:, -192:]).abs().max() > 1e-4       # the pool branch differs


# ------------------------------------------------------------------------------------------- Q-Align
class BrightnessRater:
    """Stands in for Q-Align's model (8B, GPU; its remote code cannot be built tiny): ``score`` with Q-Align's
    signature, rating each image 1 + 4 * mean brightness for quality and 5 - 4 * brightness for aesthetics."""

    def __init__(self):
        self.calls = []

    def score(self, images, task_="quality", input_="image"):
        self.calls.append((len(images), task_, input_, images[0].mode))
        bright = torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])
        return 1 + 4 * bright if task_ == "quality" else 5 - 4 * bright


def test_qalign_scores_evenly_spread_frames_as_rgb_images_and_averages():
    from liveavatar.metrics.qalign import QAlign

    rater = BrightnessRater()
    video = torch.full((3, 10, 8, 8), -1.0)
    video[:, 5:] = 1.0                       # half black, half white
    scores = QAlign(rater, frames=4)(video)
    assert rater.calls == [(4, "quality", "image", "RGB"), (4, "aesthetics", "image", "RGB")]
    # frames 0, 3, 6, 9: two black, two white -> brightness 0.5
    assert scores == {"iqa": pytest.approx(3.0), "ase": pytest.approx(3.0)}
    assert QAlign(rater, frames=4)(torch.ones(3, 2, 8, 8)) == {"iqa": pytest.approx(5.0), "ase": pytest.approx(1.0)}


def test_qalign_weights_missing_or_unloadable_are_one_line(tmp_path):
    from liveavatar.metrics.qalign import QAlign

    with pytest.raises(MissingWeights, match=r"Q-Align\): metrics.qalign=.*not found"):
        QAlign.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeights, match=r"Q-Align\): metrics.qalign=.*did not load: ") as err:
        QAlign.from_pretrained(tmp_path / "empty")
    assert "\n" not in str(err.value)
