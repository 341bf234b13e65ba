"""StreamAvatar's adversarial refinement: the consistency-aware discriminator's shapes, branches and gradients, the
relativistic loss and the R1/R2 penalties against hand computations, and the stage's generator and discriminator
steps (block-wise equal to one-shot; the roles that must not move do not), end to end through distill.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from liveavatar.components import toy_preset
from liveavatar.models import AvatarDiT
from liveavatar.training.adversarial import AdversarialSettings
from liveavatar.training.datamodule import ToyDataset, collate
from liveavatar.training.discriminator import (ConsistencyDiscriminator, Logits, approximate_penalty,
                                               gradient_penalty, relativistic_loss)
from liveavatar.training.distill_launch import build_adversarial_module, check_trainer, distill

from conftest import randomise, tiny_config
from test_dmd import SMALL, checkpoints, compose_distill, generator_grads, sources  # noqa: F401 (fixture)


def small_discriminator(**kw) -> tuple[ConsistencyDiscriminator, dict]:
    cfg = tiny_config(in_dim=4, out_dim=4, reference="sink", num_layers=3, audio_dim=16, audio_feature_dim=8,
                      audio_layers_in=1, audio_blocks=[0], video_frames_per_latent=1)
    backbone = randomise(AvatarDiT(cfg), std=0.1).requires_grad_(False)
    disc = ConsistencyDiscriminator(backbone, [0, 2], **kw)
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(2, 4, 3, 4, 4, generator=g), t=torch.tensor([300.0, 700.0]),
                  context=torch.randn(2, 8, 32, generator=g), audio=torch.randn(2, 3, 1, 1, 8, generator=g),
                  reference=torch.randn(2, 4, 1, 4, 4, generator=g))
    return disc, inputs


def test_discriminator_shapes_branches_and_what_it_trains():
    disc, inp = small_discriminator()
    logits = disc(**inp)
    assert logits.local.shape == (2, 3) and logits.global_.shape == (2,)
    (logits.local.sum() + logits.global_.sum()).backward()
    trained = [n for n, p in disc.named_parameters() if p.grad is not None]
    assert trained and all(not n.startswith("backbone.") for n in trained)  # the frozen backbone takes none
    assert all(p.grad is not None for p in disc.qformers.parameters())
    assert disc.global_head.weight.grad.abs().sum() > 0 and disc.local_head.weight.grad.abs().sum() > 0

    # The global branch reads the reference; the local branch's logits are per frame and follow each frame.
    with torch.no_grad():
        moved = disc(**{**inp, "reference": inp["reference"] + 1.0})
        assert (moved.global_ - logits.global_).abs().max() > 1e-4
    local_only, inp = small_discriminator(global_=False)
    assert local_only(**inp).global_ is None and not hasattr(local_only, "global_head")
    assert small_discriminator(local=False)[0](**inp).local is None
    with pytest.raises(ValueError, match="at least one branch"):
        small_discriminator(local=False, global_=False)
    with pytest.raises(ValueError, match="adversarial.taps"):
        ConsistencyDiscriminator(disc.backbone, [5])
    with pytest.raises(ValueError, match="reference"):
        disc(**{**inp, "reference": None})


def test_taps_default_to_blocks_spread_over_the_depth():
    assert AdversarialSettings(num_qformers=3).tap_blocks(30) == [9, 19, 29]
    assert AdversarialSettings(num_qformers=3).tap_blocks(2) == [0, 1]
    assert AdversarialSettings(taps=[4, 7]).tap_blocks(30) == [4, 7]
    with pytest.raises(ValueError, match="adversarial.penalty"):
        AdversarialSettings(penalty="r3")


def test_relativistic_loss_is_softplus_of_the_negated_difference():
    real = Logits(torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([2.0, -1.0]))
    fake = Logits(torch.tensor([[0.0, 0.0], [1.5, -1.0]]), torch.tensor([0.0, 1.0]))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    local = (sp(-1.0) + sp(2.0) + sp(1.0) + sp(-1.0)) / 4
    glob = (sp(-2.0) + sp(2.0)) / 2
    assert relativistic_loss(real, fake).item() == pytest.approx(local + glob, rel=1e-6)
    # the generator's side swaps the pair
    assert relativistic_loss(fake, real).item() == pytest.approx(
        (sp(1.0) + sp(-2.0) + sp(-1.0) + sp(1.0)) / 4 + (sp(2.0) + sp(-2.0)) / 2, rel=1e-6)
    no_global = Logits(real.local, None)
    assert relativistic_loss(no_global, Logits(fake.local, None)).item() == pytest.approx(local, rel=1e-6)


def toy_logits(x: torch.Tensor, a: torch.Tensor, c: float) -> Logits:
    """A discriminator with a known gradient: local ``[b, f] = sum(a * x[b, :, f])``, global ``[b] = c sum x[b]^2``;
    d total / d x = a / F (in every frame) + 2 c x."""
    return Logits((x * a[None, :, None]).flatten(3).sum(-1).sum(1), c * x.pow(2).flatten(1).sum(1))


def test_gradient_penalties_match_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    a, c = torch.randn(2, 2, 2, generator=g, dtype=torch.float64), 0.3
    logits = toy_logits(x, a, c)
    by_hand = a[None, :, None] / x.shape[2] + 2 * c * x.detach()
    expected = by_hand.pow(2).flatten(1).sum(1).mean()
    penalty = gradient_penalty(logits, x)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-6, atol=0)
    penalty.backward()  # differentiable, so the discriminator can be trained on it: d/dx = 4 c (a / F + 2 c x) / B
    torch.testing.assert_close(x.grad, 4 * c * by_hand / x.shape[0], rtol=1e-6, atol=1e-12)

    # The finite-difference stand-in: its expectation is the same (many copies of one clip average the noise out).
    many = x.detach()[:1].expand(4000, -1, -1, -1, -1).float()
    approx = approximate_penalty(lambda v: toy_logits(v, a.float(), c), many, toy_logits(many, a.float(), c), 1e-3,
                                 torch.Generator().manual_seed(2))
    exact = by_hand[:1].pow(2).sum().item()
    assert approx.item() == pytest.approx(exact, rel=0.06)


# --------------------------------------------------------------------------------------------- the stage
def adversarial_module(*overrides, dtype=torch.float32):
    cfg = compose_distill(*SMALL, "stage=adversarial", "adversarial.gamma=0.5", *overrides)
    module = build_adversarial_module(cfg)
    module.configure_model()
    randomise(module.generator, std=0.05, seed=1)
    randomise(module.critic.backbone, std=0.05, seed=2)
    module.to(dtype)
    data = ToyDataset(10, 6, module.dit_config, preset=toy_preset(module.dit_config, resolution=(16, 16)))
    batch = collate([data[i] for i in range(2)])
    return module, {k: v.to(dtype) for k, v in batch.items()}


def test_discriminator_step_trains_the_heads_and_penalises_gradients():
    module, batch = adversarial_module()
    assert module.teacher is None and module.adversarial.tap_blocks(2) == [0, 1]
    assert all(not p.requires_grad for p in module.critic.backbone.parameters())
    cond = module.conditions(batch)
    loss = module.critic_loss(batch, cond, 0, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.critic.qformers.parameters())
    assert all(p.grad is None for p in module.generator.parameters())
    # The penalty is part of it: without gamma the loss is the relativistic term alone, and smaller.
    module.adversarial.gamma = 0.0
    plain = module.critic_loss(batch, cond, 0, 0)
    assert plain.item() < loss.item()
    module.adversarial.gamma, module.adversarial.penalty = 0.5, "approx"
    approx = module.critic_loss(batch, cond, 0, 0)
    assert approx.item() > plain.item()


def test_generator_step_through_the_discriminator_blockwise_equals_one_shot():
    module, batch = adversarial_module("distill.steps=[1000,750,500]", dtype=torch.float64)
    substep = module.settings.critic_steps_per_generator_step
    step = next(s for s in range(50) if module.exit_step(s, substep) > 0)
    one_shot = generator_grads(module, batch, blockwise=False, step=step)
    blockwise = generator_grads(module, batch, blockwise=True, step=step)
    assert one_shot.keys() == blockwise.keys() and any(g.abs().max() > 0 for g in one_shot.values())
    for name in one_shot:
        torch.testing.assert_close(blockwise[name], one_shot[name], rtol=1e-7, atol=1e-12, msg=name)
    assert all(p.grad is None for p in module.critic.parameters())
    assert all(p.requires_grad for p in module.critic.qformers.parameters())  # held fixed only during the step


def test_the_adversarial_stage_runs_from_distill_py(tmp_path, checkpoints):  # noqa: F811
    run = tmp_path / "adv"
    cfg = compose_distill(*SMALL, *sources(checkpoints), "stage=adversarial", "trainer.max_steps=2",
                          "adversarial.local_branch=false", f"run.dir={run}")
    done = distill(cfg, run)
    assert done["stage"] == "adversarial" and done["steps"] == 2
    exported = AvatarDiT.from_pretrained(run / "model")
    start = AvatarDiT.from_pretrained(checkpoints["generator"])
    moved = max((a - b).abs().max().item() for a, b in zip(exported.state_dict().values(), start.state_dict().values()))
    assert moved > 0  # the generator (its EMA) has been trained
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    backbone = {k[len("critic.backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("critic.backbone.")}
    teacher = AvatarDiT.from_pretrained(checkpoints["teacher"]).state_dict()
    assert backbone.keys() == teacher.keys() and all(torch.equal(backbone[k], teacher[k]) for k in teacher)
    assert not any(k.startswith("critic.local_head") for k in state["state_dict"])
    with pytest.raises(ValueError, match="stage=adversarial with trainer=fsdp"):
        check_trainer(compose_distill("stage=adversarial", "trainer=fsdp", "distill.ema_decay=null"))


@pytest.mark.meta
@pytest.mark.parametrize("penalty", ["exact", "approx"])
def test_adversarial_steps_on_the_meta_device(penalty):
    from test_dmd import meta_batch

    module = build_adversarial_module(compose_distill(*SMALL, "stage=adversarial", "adversarial.gamma=0.5",
                                                      f"adversarial.penalty={penalty}"))
    meta = torch.device("meta")
    with meta:
        module.configure_model()
    batch = meta_batch(module.dit_config)
    cond = module.conditions(batch)
    loss = module.critic_loss(batch, cond, 0, 0)
    loss.backward()
    assert loss.device == meta and all(p.grad is not None and p.grad.device == meta
                                       for p in module.critic.qformers.parameters())
    generator_loss, _ = module.generator_backward(batch, cond, 0)
    assert generator_loss.device == meta
    assert all(p.grad is not None and p.grad.device == meta for p in module.generator.blocks[0].parameters())
