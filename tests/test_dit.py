"""AvatarDiT against diffusers' WanTransformer3DModel, and the behaviour of its causal and reference modes."""
import pytest
import torch
from diffusers import WanTransformer3DModel

from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.rope import RotaryTable

from conftest import randomise, tiny_config


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    """A random diffusers Wan transformer, and AvatarDiT loaded from its save_pretrained folder."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
    )
    randomise(ref)
    folder = tmp_path_factory.mktemp("diffusers_wan")
    ref.save_pretrained(folder)
    return ref.eval(), AvatarDiT.from_pretrained(folder).eval()


def test_equals_diffusers_wan_transformer(diffusers_pair):
    ref, ours = diffusers_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 8, 12, generator=g)
    t = torch.tensor([999.0, 321.0])
    context = torch.randn(2, ours.config.text_len, 32, generator=g)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == x.shape
    assert rel_err(got, expected) < 1e-5


def test_per_frame_timesteps_equal_diffusers_per_token_timesteps(diffusers_pair):
    ref, ours = diffusers_pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 4, 4, generator=g)
    t = torch.tensor([[900.0, 500.0, 20.0]])
    context = torch.randn(1, ours.config.text_len, 32, generator=g)
    with torch.no_grad():
        expected = ref(x, t.repeat_interleave(4, dim=1), context).sample  # 2x2 tokens per frame
        got = ours(x, t, context)
    assert rel_err(got, expected) < 1e-5


def test_short_text_is_zero_padded_to_text_len(tiny_dit):
    model = tiny_dit()
    x = torch.randn(1, 4, 2, 4, 4)
    ctx = torch.randn(1, 3, 32)
    padded = torch.cat([ctx, torch.zeros(1, 5, 32)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([500.0]), ctx), model(x, torch.tensor([500.0]), padded))
    with pytest.raises(ValueError, match="text_len"):
        model(x, torch.tensor([500.0]), torch.randn(1, 9, 32))


def test_causal_blocks_do_not_see_the_future(tiny_dit):
    model = tiny_dit(frames_per_block=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 6, 4, 4, generator=g)
    t = torch.full((1, 6), 600.0)
    ctx = torch.randn(1, 8, 32, generator=g)
    changed = x.clone()
    changed[:, :, 4:] += 1.0  # the last block
    with torch.no_grad():
        a, b = model(x, t, ctx, causal=True), model(changed, t, ctx, causal=True)
        full_a, full_b = model(x, t, ctx), model(changed, t, ctx)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=0, atol=1e-6)
    assert (a[:, :, 4:] - b[:, :, 4:]).abs().max() > 1e-3
    # Without the mask the first blocks do see the change.
    assert (full_a[:, :, :4] - full_b[:, :, :4]).abs().max() > 1e-3


def test_causal_prefix_equals_shorter_video(tiny_dit):
    """Block k of a causal forward depends only on blocks <= k: it equals the forward of the prefix."""
    model = tiny_dit(frames_per_block=2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 6, 4, 4, generator=g)
    t = torch.tensor([[900.0, 900.0, 400.0, 400.0, 100.0, 100.0]])
    ctx = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        full = model(x, t, ctx, causal=True)
        prefix = model(x[:, :, :4], t[:, :4], ctx, causal=True)
        one_block = model(x[:, :, :2], t[:, :2], ctx, causal=False)
    torch.testing.assert_close(full[:, :, :4], prefix, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full[:, :, :2], one_block, rtol=1e-5, atol=1e-6)


def test_reference_sink_conditions_every_frame_and_stays_out_of_the_output(tiny_dit):
    model = tiny_dit(reference="sink")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 4, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 32, generator=g)
    ref1, ref2 = torch.randn(2, 1, 4, 1, 4, 4, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = model(x, t, ctx, causal=True, reference=ref1)
        b = model(x, t, ctx, causal=True, reference=ref2)
        none = model(x, t, ctx, causal=True)
    assert a.shape == x.shape
    per_frame = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert (per_frame > 1e-3).all(), "every frame must see the sink"
    assert (a - none).abs().max() > 1e-3


def test_concat_reference_starts_as_a_no_op_and_is_a_channel_concat(tiny_dit):
    fresh = AvatarDiT(tiny_config(reference="concat"))
    randomise(fresh)
    fresh.init_addition("ref_embedding", fresh.ref_embedding)
    x, ctx, ref = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 8, 32), torch.randn(1, 4, 1, 4, 4)
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx, reference=ref), fresh(x, t, ctx))
        # Adding a second patch embedding equals one patch embedding over channel-concatenated input.
        fresh.ref_embedding.weight.normal_()
        tokens = fresh.embed_video(x, ref)
        conv = torch.nn.Conv3d(8, 48, (1, 2, 2), (1, 2, 2))
        conv.weight.copy_(torch.cat([fresh.patch_embedding.weight, fresh.ref_embedding.weight], dim=1))
        conv.bias.copy_(fresh.patch_embedding.bias + fresh.ref_embedding.bias)
        concat = conv(torch.cat([x, ref.expand(-1, -1, 2, -1, -1)], dim=1)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, concat, rtol=1e-5, atol=1e-5)


def test_rope_has_no_position_ceiling_and_is_relative():
    head_dim = 12
    q, k = torch.randn(2, 1, 36, 1, head_dim).unbind(0)
    near = [torch.tensor([0.0]), torch.tensor([3.0])]
    far = [torch.tensor([1_000_000.0]), torch.tensor([1_000_003.0])]

    def score(pq, pk):
        rq = RotaryTable.for_grid(pq, 6, 6, head_dim).rotate(q)
        rk = RotaryTable.for_grid(pk, 6, 6, head_dim).rotate(k)
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(*near), score(*far), rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise_clear_errors(tiny_dit):
    model = tiny_dit()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 4, 2, 5, 4), torch.tensor([1.0]), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="timesteps of shape"):
        model(torch.randn(1, 4, 2, 4, 4), torch.ones(1, 3), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="text_dim"):
        model(torch.randn(1, 4, 2, 4, 4), torch.ones(1), torch.randn(1, 4, 16))


# The original code's counts: Wan2.2's WanModel built from each original config on the meta device (its t2v /
# ti2v configs; Wan2.1's T2V models are the same architecture). The bases must hold exactly these parameters.
@pytest.mark.parametrize("preset,original", [("wan2.1-1.3b", 1_418_996_800), ("wan2.1-14b", 14_288_491_584),
                                             ("wan2.2-ti2v-5b", 4_999_787_712)])
def test_preset_bases_hold_exactly_the_original_models_parameters(preset, original):
    from liveavatar.models import from_preset

    model = from_preset(preset)
    assert next(model.parameters()).device.type == "meta"
    base = model.num_parameters(base_only=True)
    assert base == original
    assert model.num_parameters() > base  # the audio modules come on top


def test_an_unknown_preset_is_one_line_naming_the_known_ones():
    from liveavatar.models import from_preset

    with pytest.raises(ValueError, match=r"model preset 'wan9' not found; presets: .*wan2.2-ti2v-5b"):
        from_preset("wan9")
