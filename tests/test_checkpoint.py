"""Checkpoint formats: Wan2.1 layout (single file, shards, .pth), diffusers layout, strictness, additions."""
import json

import pytest
import torch

from liveavatar.models import AvatarDiT
from liveavatar.models.checkpoint import CheckpointError, WEIGHTS_NAME

from conftest import randomise, tiny_config


def inputs(seed=0, frames=2, audio=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, 4, 4, generator=g)
    out = dict(x=x, t=torch.tensor([700.0]), context=torch.randn(1, 8, 32, generator=g))
    if audio:
        out["audio"] = torch.randn(1, 1 + 4 * (frames - 1), 2, 16, generator=g)
    return out


def same_output(a, b, **kw):
    with torch.no_grad():
        torch.testing.assert_close(a(**kw), b(**kw), rtol=0, atol=0)


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_wan_layout_roundtrip(tmp_path, shard_bytes):
    model = randomise(AvatarDiT(tiny_config(reference="sink")))
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "WanModel" and config["dim"] == 48
    if shard_bytes:
        index = json.loads((tmp_path / (WEIGHTS_NAME + ".index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1
    else:
        assert (tmp_path / WEIGHTS_NAME).is_file()
    assert not list(tmp_path.glob(".*tmp"))
    loaded = AvatarDiT.from_pretrained(tmp_path)
    assert loaded.initialised_modules == []
    same_output(model, loaded, **inputs())


def test_original_wan_key_names(tmp_path):
    names = set(AvatarDiT(tiny_config()).state_dict())
    for key in [
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.weight", "time_embedding.0.weight",
        "time_embedding.2.weight", "time_projection.1.weight", "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.k.weight", "blocks.0.self_attn.v.weight", "blocks.0.self_attn.o.weight",
        "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight", "blocks.0.cross_attn.q.weight",
        "blocks.0.cross_attn.norm_k.weight", "blocks.0.norm3.weight", "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.weight", "blocks.0.modulation", "head.head.weight", "head.modulation",
    ]:
        assert key in names, key
    assert not any(k.startswith(("blocks.0.norm1.", "blocks.0.norm2.", "head.norm.")) for k in names)


def test_pth_file_loads_with_a_config(tmp_path):
    model = randomise(AvatarDiT(tiny_config()))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="no config.json"):
        AvatarDiT.from_pretrained(tmp_path / "model.pth")
    loaded = AvatarDiT.from_pretrained(tmp_path / "model.pth", config=tiny_config())
    same_output(model, loaded, **inputs())


def test_plain_wan_checkpoint_into_an_audio_model_behaves_as_before(tmp_path):
    base = randomise(AvatarDiT(tiny_config()))
    base.save_pretrained(tmp_path)
    cfg = tiny_config(audio_dim=16, audio_feature_dim=16, audio_layers_in=2, audio_blocks=[1], reference="concat",
                      audio_modulation=True)
    model = AvatarDiT.from_pretrained(tmp_path, config=cfg)
    assert sorted(model.initialised_modules) == ["audio_modulation", "audio_proj", "blocks.1.audio_attn", "ref_embedding"]
    kw = inputs(audio=True)
    with torch.no_grad():
        expected = base(kw["x"], kw["t"], kw["context"])
        got = model(**kw, reference=torch.randn(1, 4, 1, 4, 4))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert all(not p.is_meta for p in model.parameters())
    # The initialised audio branch is trainable: it receives gradient once the output projection moves.
    assert model.audio_proj.proj[0].weight.abs().sum() > 0


def test_mismatches_are_listed_in_one_error(tmp_path):
    model = AvatarDiT(tiny_config())
    state = model.state_dict()
    state["blocks.0.ffn.0.weight"] = torch.zeros(7, 48)
    state["extra.weight"] = torch.zeros(1)
    del state["head.modulation"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        AvatarDiT.from_pretrained(tmp_path / "bad.pth", config=tiny_config())
    message = str(err.value)
    assert "missing keys (1): head.modulation" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "blocks.0.ffn.0.weight: checkpoint (7, 48) vs model (96, 48)" in message


def test_a_config_that_contradicts_the_checkpoints_in_what_shapes_cannot_show_is_refused(tmp_path):
    # Two heads or four over the same width: the same weight shapes, another model. Loading a 2-head checkpoint
    # into the 4-head preset would stream noise without a word.
    saved = randomise(AvatarDiT(tiny_config(num_heads=2, audio_dim=16, audio_feature_dim=8, audio_blocks=[0],
                                            audio_feature_norm="none")))
    saved.save_pretrained(tmp_path)
    preset = tiny_config(num_heads=4, audio_dim=16, audio_feature_dim=8, audio_blocks=[0], audio_feature_norm="layer")
    with pytest.raises(CheckpointError, match=r"num_heads=2, audio_feature_norm='none'.*"
                                              r"pass model.dit.num_heads=2 model.dit.audio_feature_norm=none"):
        AvatarDiT.from_pretrained(tmp_path, config=preset)
    agreeing = tiny_config(num_heads=2, audio_dim=16, audio_feature_dim=8, audio_blocks=[0], audio_feature_norm="none")
    loaded = AvatarDiT.from_pretrained(tmp_path, config=agreeing)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


def test_unreadable_checkpoints_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AvatarDiT.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no"):
        AvatarDiT.from_pretrained(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        AvatarDiT.from_pretrained(tmp_path / "junk.safetensors", config=tiny_config())


def test_diffusers_layout_saved_back_as_wan_layout(tmp_path):
    from diffusers import WanTransformer3DModel

    ref = randomise(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
    ))
    ref.save_pretrained(tmp_path / "diffusers")
    model = AvatarDiT.from_pretrained(tmp_path / "diffusers")
    model.save_pretrained(tmp_path / "wan")
    again = AvatarDiT.from_pretrained(tmp_path / "wan")
    kw = inputs()
    kw["context"] = torch.randn(1, 512, 32)
    same_output(model, again, **kw)


def test_dtype_on_load(tmp_path):
    randomise(AvatarDiT(tiny_config())).save_pretrained(tmp_path)
    model = AvatarDiT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_shards_are_read_one_at_a_time_and_load_exactly(tmp_path, monkeypatch):
    """A sharded checkpoint: each shard's tensors are released before the next shard is read (the host holds the
    model plus about one shard), and the loaded model equals the saved one."""
    import gc
    import weakref

    from liveavatar.models import checkpoint as ckpt

    torch.manual_seed(0)
    model = randomise(AvatarDiT(tiny_config()), std=0.05)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 3

    class Part(dict):
        pass

    read, alive = ckpt._read_file, []

    def tracked(f):
        gc.collect()
        assert all(ref() is None for ref in alive), "a previous shard is still held"
        part = Part(read(f))
        alive.extend(weakref.ref(t) for t in part.values())
        return part

    monkeypatch.setattr(ckpt, "_read_file", tracked)
    loaded = AvatarDiT.from_pretrained(tmp_path, dtype=torch.bfloat16)   # converted: the originals can be freed
    assert len(alive) == len(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.to(torch.bfloat16))
