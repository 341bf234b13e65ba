"""Text encoders (liveavatar.models.text): umT5 offline from a tiny random folder, precomputed files, the
deterministic random encoder, and the factory."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny_umt5, save_tiny_wav2vec2

from liveavatar.models import AvatarDiT, DiTConfig
from liveavatar.models.text import (
    PrecomputedTextEncoder,
    RandomTextEncoder,
    UMT5TextEncoder,
    build_text_encoder,
    load_precomputed,
    save_precomputed,
)

PROMPTS = ["A woman is talking to the camera", "a man smiling"]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return save_tiny_umt5(tmp_path_factory.mktemp("umt5"), d_model=32)


@pytest.fixture(scope="module")
def reference(umt5_dir):
    """The tokenizer and model loaded straight from transformers, to compare against."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(umt5_dir, local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(umt5_dir, local_files_only=True).eval()
    return tok, model


def direct_embeddings(reference, prompt: str, max_length: int | None = None) -> torch.Tensor:
    """One prompt, no padding at all: ``[L, d_model]``."""
    tok, model = reference
    kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
    ids = tok(prompt, return_tensors="pt", **kwargs)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state[0]


def test_umt5_matches_direct_model_and_zero_pads(umt5_dir, reference):
    enc = UMT5TextEncoder(umt5_dir, text_len=64)
    assert enc.text_dim == 32
    emb, lengths = enc(PROMPTS)
    refs = [direct_embeddings(reference, p) for p in PROMPTS]
    assert emb.dtype == torch.float32
    assert lengths.tolist() == [r.shape[0] for r in refs]
    assert lengths[0] != lengths[1]  # the batch really mixes lengths
    assert emb.shape == (2, max(r.shape[0] for r in refs), 32)
    for i, ref in enumerate(refs):
        n = ref.shape[0]
        torch.testing.assert_close(emb[i, :n], ref, rtol=1e-5, atol=1e-5)
        assert torch.all(emb[i, n:] == 0)
    # The last real token is </s>, as umT5's tokenizer appends it.
    ids, mask = enc.tokenize(PROMPTS)
    eos = reference[0].eos_token_id
    assert [ids[i, lengths[i] - 1].item() for i in range(2)] == [eos, eos]
    # A single string is a batch of one, equal to its row of the batch.
    one, n1 = enc(PROMPTS[1])
    assert one.shape == (1, lengths[1], 32) and n1.tolist() == [lengths[1]]
    torch.testing.assert_close(one[0], emb[1, : lengths[1]], rtol=1e-5, atol=1e-5)


def test_umt5_truncates_at_text_len(umt5_dir, reference):
    enc = UMT5TextEncoder(umt5_dir, text_len=8)
    long_prompt = " ".join(["the woman is talking"] * 10)
    emb, lengths = enc([long_prompt, "a man"])
    assert emb.shape == (2, 8, 32)
    assert lengths.tolist()[0] == 8 and lengths[1] < 8
    ids, _ = enc.tokenize([long_prompt])
    assert ids.shape[1] == 8 and ids[0, -1].item() == reference[0].eos_token_id
    torch.testing.assert_close(emb[0], direct_embeddings(reference, long_prompt, max_length=8), rtol=1e-5, atol=1e-5)


def test_umt5_cleans_whitespace_and_html(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir, text_len=64)
    a, _ = enc(["a  man &amp;\n smiling "])
    b, _ = enc(["a man & smiling"])
    torch.testing.assert_close(a, b)


def test_umt5_bad_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        UMT5TextEncoder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        UMT5TextEncoder(empty)
    w2v = save_tiny_wav2vec2(tmp_path / "w2v")
    with pytest.raises(ValueError, match=r"w2v.*'wav2vec2'.*not a umT5"):
        UMT5TextEncoder(w2v)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken"):
        UMT5TextEncoder(broken)


def test_umt5_without_tokenizer_errors(tmp_path, umt5_dir):
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (only_model / name).write_bytes((umt5_dir / name).read_bytes())
    with pytest.raises(ValueError, match="only_model"):
        UMT5TextEncoder(only_model)


def test_umt5_diffusers_pipeline_layout(tmp_path, umt5_dir):
    """Wan2.1's diffusers release keeps the encoder in text_encoder/ and the tokenizer in tokenizer/."""
    for sub, names in (("text_encoder", ("config.json", "model.safetensors")), ("tokenizer", ("tokenizer.json", "tokenizer_config.json"))):
        (tmp_path / sub).mkdir()
        for name in names:
            (tmp_path / sub / name).write_bytes((umt5_dir / name).read_bytes())
    expected, _ = UMT5TextEncoder(umt5_dir)(PROMPTS)
    for path in (tmp_path, tmp_path / "text_encoder"):
        torch.testing.assert_close(UMT5TextEncoder(path)(PROMPTS)[0], expected)
    explicit = UMT5TextEncoder(tmp_path / "text_encoder", tokenizer_path=umt5_dir)
    torch.testing.assert_close(explicit(PROMPTS)[0], expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_precomputed_round_trip(tmp_path, suffix):
    emb = torch.randn(2, 5, 16)
    emb[1, 3:] = 0  # the second prompt is shorter
    path = save_precomputed(tmp_path / "sub" / f"ctx{suffix}", emb)
    torch.testing.assert_close(load_precomputed(path), emb)
    single = save_precomputed(tmp_path / f"one{suffix}", emb[0])  # [L, D] -> [1, L, D]
    torch.testing.assert_close(load_precomputed(single), emb[:1])

    enc = build_text_encoder("precomputed", path, text_dim=16, text_len=8)
    out, lengths = enc(["ignored", "also ignored"])
    torch.testing.assert_close(out, emb)
    assert lengths.tolist() == [5, 3]
    with pytest.raises(ValueError, match="hold 2 prompts"):
        enc(["just one"])
    enc1 = PrecomputedTextEncoder(single, text_dim=16)
    out1, lengths1 = enc1(["x", "y", "z"])
    assert out1.shape == (3, 5, 16) and lengths1.tolist() == [5, 5, 5]


def test_precomputed_other_layouts_and_errors(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(1, 4, 8)
    save_file({"whatever": emb}, str(tmp_path / "only_key.safetensors"))
    torch.testing.assert_close(load_precomputed(tmp_path / "only_key.safetensors"), emb)
    save_file({"a": emb, "b": emb.clone()}, str(tmp_path / "two_keys.safetensors"))
    with pytest.raises(ValueError, match="two_keys.*'context'"):
        load_precomputed(tmp_path / "two_keys.safetensors")
    # What Wan2.1's T5EncoderModel returns: a list of [L_i, D] tensors.
    torch.save([torch.ones(3, 8), torch.ones(2, 8)], tmp_path / "list.pt")
    listed = load_precomputed(tmp_path / "list.pt")
    assert listed.shape == (2, 3, 8) and listed[1, 2].abs().sum() == 0
    torch.save({"context": emb[0]}, tmp_path / "dict.pt")
    torch.testing.assert_close(load_precomputed(tmp_path / "dict.pt"), emb)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_precomputed(tmp_path / "missing.pt")
    (tmp_path / "ctx.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="ctx.npy"):
        load_precomputed(tmp_path / "ctx.npy")
    with pytest.raises(ValueError, match="ctx.txt"):
        save_precomputed(tmp_path / "ctx.txt", emb)
    with pytest.raises(ValueError, match=r"\[L, D\]"):
        save_precomputed(tmp_path / "bad.pt", torch.zeros(8))
    torch.save(torch.zeros(8), tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="vector.pt"):
        load_precomputed(tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="text_dim=16"):
        build_text_encoder("precomputed", tmp_path / "dict.pt", text_dim=16)
    with pytest.raises(ValueError, match="text_len=2"):
        build_text_encoder("precomputed", tmp_path / "dict.pt", text_dim=8, text_len=2)


def test_random_encoder_is_deterministic_and_prompt_dependent():
    a = RandomTextEncoder(text_dim=24, text_len=16)
    b = RandomTextEncoder(text_dim=24, text_len=16)
    emb, lengths = a(["a woman talking", "a man smiling!", "a woman talking"])
    assert emb.shape == (3, 5, 24) and emb.dtype == torch.float32
    assert lengths.tolist() == [4, 5, 4]  # three words + </s>; three words + "!" + </s>
    assert torch.all(emb[0, 4:] == 0)
    torch.testing.assert_close(emb, b(["a woman talking", "a man smiling!", "a woman talking"])[0])
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])
    assert not torch.allclose(RandomTextEncoder(24, 16, seed=1)(["a woman talking"])[0], emb[:1, :4])
    # Shorter prompts are zero past their length; long ones are truncated keeping </s>.
    short, n = a(["hello", "one two three four five"])
    assert n.tolist() == [2, 6] and torch.all(short[0, 2:] == 0)
    torch.testing.assert_close(short[0, 1], short[1, 5])  # both end in </s>
    long_emb, long_n = a(" ".join(f"w{i}" for i in range(40)))
    assert long_emb.shape == (1, 16, 24) and long_n.tolist() == [16]
    torch.testing.assert_close(long_emb[0, -1], short[0, 1])
    with pytest.raises(ValueError, match="no prompts"):
        a([])


def test_factory(umt5_dir):
    assert isinstance(build_text_encoder("random", None, text_dim=8, text_len=4), RandomTextEncoder)
    enc = build_text_encoder("umt5", umt5_dir, text_dim=32, text_len=16, device="cpu", dtype=torch.float32)
    assert isinstance(enc, UMT5TextEncoder) and enc.text_len == 16
    with pytest.raises(ValueError, match="text_dim=64"):
        build_text_encoder("umt5", umt5_dir, text_dim=64, text_len=16)
    with pytest.raises(ValueError, match="needs a path"):
        build_text_encoder("umt5", None, text_dim=32)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_text_encoder("clip", umt5_dir, text_dim=32)


def test_embeddings_feed_the_dit_like_wan(umt5_dir):
    """The DiT zero-pads the context to text_len itself, so the encoder's zero padding past each length and a
    prompt trimmed to its own length give the same output (what Wan2.1 relies on)."""
    cfg = DiTConfig(in_dim=4, out_dim=4, dim=32, ffn_dim=64, freq_dim=32, text_dim=32, text_len=16, num_heads=4,
                    num_layers=1, reference="none")
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    enc = build_text_encoder("umt5", umt5_dir, text_dim=32, text_len=16)
    emb, lengths = enc(PROMPTS)
    x, t = torch.randn(1, 4, 1, 4, 4), torch.tensor([500.0])
    with torch.no_grad():
        batched = model(x, t, emb[1:])
        trimmed = model(x, t, emb[1:, : lengths[1]])
    torch.testing.assert_close(batched, trimmed)
    assert json.loads((umt5_dir / "config.json").read_text())["model_type"] == "umt5"
