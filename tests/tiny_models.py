"""Tiny random models built offline for the tests (no downloads): a umT5 encoder with its tokenizer, and a
wav2vec2 encoder. Each helper writes a folder that the real loaders read with ``local_files_only=True``."""
from __future__ import annotations

import string
from pathlib import Path

import torch

# Special tokens at the ids umT5's sentencepiece model uses: pad 0, eos 1, unk 2.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# A few whole words (so that common prompts are short) plus every lowercase letter and digit, with and
# without the word-start marker, so that any lowercase ASCII text tokenizes without <unk>.
WORDS = ["a", "the", "woman", "man", "is", "talking", "speaking", "smiling", "to", "camera", "portrait", "video"]


def _unigram_vocab() -> list[tuple[str, float]]:
    pieces = SPECIAL_TOKENS + ["\u2581"] + [f"\u2581{w}" for w in WORDS]
    pieces += [c for c in string.ascii_lowercase + string.digits + ".,!?'"]
    pieces += [f"\u2581{c}" for c in string.ascii_lowercase + string.digits]
    seen: dict[str, float] = {}
    for i, p in enumerate(pieces):
        # Whole words score higher than characters so that Unigram prefers them.
        seen.setdefault(p, 0.0 if i < len(SPECIAL_TOKENS) else (-2.0 if len(p) > 2 else -5.0))
    return list(seen.items())


def build_tiny_t5_tokenizer():
    """A sentencepiece-style Unigram tokenizer (Metaspace pre-tokenizer, ``</s>`` appended) over a small
    vocabulary, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    vocab = _unigram_vocab()
    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def save_tiny_umt5(
    folder: str | Path,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_kv: int = 8,
    d_ff: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random ``UMT5EncoderModel`` (umT5-XXL's architecture, tiny widths) and its tokenizer to ``folder``."""
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    tokenizer = build_tiny_t5_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_wav2vec2(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Write a random ``Wav2Vec2Model`` to ``folder``: wav2vec2-base's feature extractor strides and kernels
    (320x downsampling, so 50 Hz output for 16 kHz input) with few channels, and a ``layers``-layer encoder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = Path(folder)
    config = Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
        conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
        do_stable_layer_norm=False, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, apply_spec_augment=False, vocab_size=8,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(folder)
    return folder
