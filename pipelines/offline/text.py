"""Text encoders and tokenizers built in memory: no vocabulary files, no hub.

Every tiny pipeline in vidsparse (and the project's own trained model) encodes prompts with a word-level tokenizer
built from a word list, and a small transformers text encoder built from a config with deterministic weights. The
pipelines call them exactly as they would call a real T5/UMT5/Llama/CLIP pair.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Words the tiny pipelines' tokenizer knows (lower-case); anything else becomes ``<unk>``. Covers the captions of
#: the procedural dataset (shapes, colours, motions, backgrounds) and common prompt words.
DEFAULT_VOCABULARY: tuple[str, ...] = tuple(
    """
    a an the of on in over under with and to from at by is are
    red green blue yellow orange purple pink white black gray grey cyan magenta brown
    circle disc disk square box rectangle triangle star ring ball cube shape shapes
    moves moving move goes slides slide bounces bouncing bounce rotates rotating rotate spins spinning grows growing
    shrinks shrinking falls falling rises rising drifts drifting stays still static
    left right up down diagonally around across slowly quickly fast slow
    background gradient textured striped checkered dark light bright plain noise sky sea grass
    camera pans pan panning zooms zoom
    cat dog bird person car tree house city street forest beach mountain river ocean sunset night day
    walking running flying swimming dancing sitting playing video clip scene photo cinematic realistic
    big small large tiny two three one
    as
    """.split()
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>", "<s>")


def build_word_tokenizer(
    words: Iterable[str] = DEFAULT_VOCABULARY,
    *,
    model_max_length: int = 512,
    bos: bool = False,
    chat_template: str | None = None,
):
    """A ``PreTrainedTokenizerFast`` over a fixed word list (lower-cased, split on whitespace and punctuation).

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``<s>`` 3, then the words in order. The post-processor appends
    ``</s>`` (T5 style), and prepends ``<s>`` when ``bos`` is True (Llama/CLIP style).

    Args:
        words: The vocabulary; duplicates are dropped, order kept.
        model_max_length: Longest sequence the tokenizer reports.
        bos: Also add a beginning-of-sequence token.
        chat_template: Optional Jinja chat template (for pipelines that call ``apply_chat_template``).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def seeded_model(factory, seed: int):
    """Build ``factory()`` under a private RNG seeded with ``seed`` (global RNG untouched), in eval mode, frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.eval().requires_grad_(False)


def _t5_config(config_cls, vocab_size: int, d_model: int, num_layers: int, num_heads: int):
    return config_cls(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=max(4, d_model // num_heads),
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_umt5_encoder(vocab_size: int, d_model: int, *, seed: int = 0, num_layers: int = 2, num_heads: int = 4):
    """A small ``UMT5EncoderModel`` (Wan's and SkyReels' text encoder class) with deterministic weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = _t5_config(UMT5Config, vocab_size, d_model, num_layers, num_heads)
    return seeded_model(lambda: UMT5EncoderModel(config), seed)


def attend_to_neighbouring_words(encoder, strength: float = 4.0) -> None:
    """Make a random (U)T5 encoder's first layer mix every word with the words next to it, in place.

    A T5 encoder has no absolute positions, only a learned relative-position bias, and with random weights that bias
    is near zero: each output vector is then its word's embedding plus a nearly uniform average of the sentence, a
    bag of words. "a red circle ... over a plain blue background" and "a blue circle ... over a plain red background"
    encode to vectors with cosine similarity 0.999 word for word (measured), so a model conditioned on them cannot
    tell which colour is the shape's. Setting the first layer's bias so that heads 0 and 2 attend to the previous
    word and heads 1 and 3 to the next one (``strength`` on those relative positions, 0 elsewhere) makes "red"
    before "circle" and "red" before "background" differ (cosine 0.57) while "red" and "blue" stay apart (0.17).

    Args:
        encoder: ``UMT5EncoderModel`` or ``T5EncoderModel`` with ``relative_attention_num_buckets=8`` (bucket 1 is
            the previous token, bucket ``8 // 2 + 1`` the next one) and at least 2 heads.
        strength: Bias added to the neighbouring word's logit; 4 gives it about 0.9 of the head's attention.
    """
    attention = encoder.encoder.block[0].layer[0].SelfAttention
    buckets = encoder.config.relative_attention_num_buckets
    if buckets != 8 or attention.n_heads < 2:
        raise ValueError(
            f"attend_to_neighbouring_words needs 8 relative-position buckets and >= 2 heads, got {buckets} buckets "
            f"and {attention.n_heads} heads"
        )
    previous_word, next_word = 1, buckets // 2 + 1
    with torch.no_grad():
        bias = attention.relative_attention_bias.weight  # [buckets, heads]
        bias.zero_()
        for head in range(attention.n_heads):
            bias[previous_word if head % 2 == 0 else next_word, head] = strength


def build_t5_encoder(vocab_size: int, d_model: int, *, seed: int = 0, num_layers: int = 2, num_heads: int = 4):
    """A small ``T5EncoderModel`` (CogVideoX, LTX, Mochi, HunyuanVideo 1.5's ByT5) with deterministic weights."""
    from transformers import T5Config, T5EncoderModel

    config = _t5_config(T5Config, vocab_size, d_model, num_layers, num_heads)
    return seeded_model(lambda: T5EncoderModel(config), seed)


def build_llama_encoder(vocab_size: int, hidden_size: int, *, seed: int = 0, num_layers: int = 3):
    """A small ``LlamaModel`` (HunyuanVideo's text encoder; the pipeline reads hidden state -3)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return seeded_model(lambda: LlamaModel(config), seed)


def build_clip_text_encoder(vocab_size: int, hidden_size: int, *, seed: int = 0, max_positions: int = 77):
    """A small ``CLIPTextModel`` (HunyuanVideo's pooled text encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return seeded_model(lambda: CLIPTextModel(config), seed)


def build_qwen25vl_text_encoder(vocab_size: int, hidden_size: int, *, seed: int = 0, num_layers: int = 3):
    """A small ``Qwen2_5_VLTextModel`` (HunyuanVideo 1.5's text encoder; the pipeline reads hidden state -3)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    head_dim = hidden_size // 2
    config = Qwen2_5_VLTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        # mrope sections (t, h, w) must add up to half a head dimension.
        rope_scaling={"mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8], "rope_type": "default"},
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return seeded_model(lambda: Qwen2_5_VLTextModel(config), seed)


def build_clip_vision_encoder(hidden_size: int, image_size: int, *, seed: int = 0):
    """A small ``CLIPVisionModelWithProjection`` and a matching ``CLIPImageProcessor`` (Wan 2.1 I2V).

    Returns:
        ``(image_encoder, image_processor)``.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=image_size // 4,
    )
    encoder = seeded_model(lambda: CLIPVisionModelWithProjection(config), seed)
    processor = CLIPImageProcessor(crop_size=image_size, size={"shortest_edge": image_size})
    return encoder, processor
