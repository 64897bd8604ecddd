"""Tiny random-weight checkpoints that stand in for the real models offline.

Each builder writes a complete Hugging Face checkpoint directory — weights, config,
tokenizer, processor and chat template — that loads through exactly the same code as
the real model (`transformers` `from_pretrained`, and vLLM for the policy). Weights are
random but deterministic in the seed; the tokenizers are trained here on the synthetic
world's vocabulary (`repic_ray.data.vocab`), so no download is ever needed.

Directories are cached under `cache_dir` (default `$REPIC_CACHE/models`, with
`REPIC_CACHE` defaulting to `~/.cache/repic`), named by a hash of everything that
determines their content: the builder's source, the seed, the world vocabulary and the
`transformers`/`tokenizers` versions that serialise them. A build goes into a temporary
directory that is renamed into place, so parallel processes never see a half-written
checkpoint; if two race, the loser's copy is discarded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from repic_ray.data.vocab import NAMES, all_words

# Qwen2.5's added tokens, in Qwen2.5's order (they follow the BPE vocabulary there too,
# at ids 151643...151664). `special` follows Qwen2.5's tokenizer_config.json.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# Qwen2.5-VL-7B-Instruct's chat template, verbatim: images and videos become
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad
# per vision token.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Generic English the tokenizer should also encode compactly: prompt and caption glue
# beyond the world's own template words, digits and JSON punctuation for boxes.
GLUE_TEXT = """
You are a helpful assistant. The user shows reference images of personal concepts
and then a query image. Give a personalized caption of the image. Is it in the image?
Answer yes or no. Where is it? Return the bounding box in JSON format, for example
{"bbox_2d": [12, 34, 56, 78], "label": "dog"}. I think that we should look at what
they have done, because it was not what he or she would like to do with all of them.
Their first one may be just about the same as other ones; some were here before, but
then there will be more. Here we see a small big little large old new good nice cute
happy sad bright dark light round long short tall soft hard warm cold clean running
sitting standing playing sleeping looking holding wearing lying resting facing while
when into onto over under above below behind between around inside outside up down
very quite really only each every both many much few several most other another same
Photo Image Picture Caption Name Names Answer Output Yes No It This There The A An
0 1 2 3 4 5 6 7 8 9 10 100 1000 0.5 . , ; : ! ? ' " ( ) [ ] { } < > - _ / * + = # @ & %
"""

QWEN_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    # head_dim 32 -> 16 rotary frequencies, split over (time, height, width) like the
    # 7B's [16, 24, 24] of 64.
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 4,
    "attention_dropout": 0.0,
}
QWEN_VISION = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
# 28x28 px = one 2x2 group of 14-px patches = exactly one vision token; an 84x84 query
# is 9 tokens. Without `min_pixels=28*28` the processor would upscale references to 56 px.
QWEN_MIN_PIXELS = 28 * 28
QWEN_MAX_PIXELS = 448 * 448
# Random weights at the usual 0.02 give almost flat next-token distributions, where
# greedy decoding hinges on 1e-7 differences between HF and vLLM kernels. A larger
# output head makes the argmax decisive without changing anything else.
QWEN_LM_HEAD_STD = 1.0


def default_cache_dir() -> Path:
    """`$REPIC_CACHE/models`, with `REPIC_CACHE` defaulting to `~/.cache/repic`."""
    root = os.environ.get("REPIC_CACHE") or Path.home() / ".cache" / "repic"
    return Path(root) / "models"


def _cached_build(
    kind: str, seed: int, cache_dir: str | Path | None, write: Callable[[Path], None]
) -> Path:
    """Return `cache_dir/<kind>-seed<seed>-<hash>`, calling `write(tmp_dir)` if absent."""
    recipe = {
        "kind": kind,
        "seed": seed,
        "source": inspect.getsource(sys.modules[__name__]),
        "words": all_words(),
        "names": list(NAMES),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{kind}-seed{seed}-{digest}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            write(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            tmp.rename(final)
        except OSError:
            # Another process renamed its copy into place first; theirs is identical.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tokenizer_corpus() -> list[str]:
    """Lines to train the BPE on: every world word, lower and capitalised, with and
    without a leading space (so each becomes one token), `<Name>` concept identifiers,
    and generic English glue."""
    variants = []
    for word in all_words():
        for form in dict.fromkeys((word, word.capitalize())):
            variants += [f" {form}"] * 20 + [form] * 5
    for name in NAMES:
        variants += [f" <{name}>", f"<{name}>"] * 5
    # Chat roles follow <|im_start|> without a space.
    variants += ["system", "user", "assistant"] * 5
    return variants + GLUE_TEXT.split("\n") * 3


def train_qwen_tokenizer(vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE with Qwen2's normalizer (NFC) and pre-tokenizer, trained on the
    world's words, followed by Qwen2.5's added tokens (`<|image_pad|>` is id `n_bpe + 12`).

    Like Qwen's, it encodes any text without unknown tokens and decodes it back exactly
    once the text is NFC-normalised (the normaliser runs before the byte-level BPE)."""
    # Imported here: the regex is the one piece we take from Qwen2's tokenizer class.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_ADDED_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_tokens(
        [tokenizers.AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS]
    )
    return tok


def _write_qwen2_5_vl(out: Path) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    raw = train_qwen_tokenizer()
    ids = {t: raw.token_to_id(t) for t, _ in QWEN_ADDED_TOKENS}
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=raw,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=QWEN_TEXT["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    pixels = {"min_pixels": QWEN_MIN_PIXELS, "max_pixels": QWEN_MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )

    config = Qwen2_5_VLConfig(
        text_config=dict(
            QWEN_TEXT,
            vocab_size=len(tokenizer),
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(QWEN_VISION, out_hidden_size=QWEN_TEXT["hidden_size"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        dtype="float32",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, QWEN_LM_HEAD_STD / QWEN_TEXT["hidden_size"] ** 0.5)
    # Greedy, plain defaults (the 7B's repetition_penalty and top_k would make HF's
    # `generate` and vLLM disagree unless every caller overrode them).
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_qwen2_5_vl(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """A ~1M-parameter random Qwen2.5-VL checkpoint that loads like the real one.

    Text: hidden 128, 4 layers, 4 heads / 4 KV heads, MLP 512, M-RoPE. Vision: depth 2,
    hidden 64, patch 14, spatial merge 2 (a 28x28 image is one vision token, 84x84 is
    nine). The tokenizer is a byte-level BPE (~1.6k tokens) in which every world word and
    name, with or without a leading space and capitalised, is a single token; Qwen2.5's
    special tokens follow the BPE vocabulary, with `image_token_id` etc. in the config.
    """
    return _cached_build("qwen2.5-vl", seed, cache_dir, _write_qwen2_5_vl)


def _lowercase_words() -> list[str]:
    """The world's words and `GLUE_TEXT`'s, lower-cased, each once, in a stable order:
    the vocabulary of the uncased detector and CLIP tokenizers."""
    glue = (w.strip(".,;:!?'\"()[]{}") for w in GLUE_TEXT.split())
    words = [*all_words(), *(w for w in glue if w.isalpha())]
    return list(dict.fromkeys(w.lower() for w in words))


def _write_grounding_dino(out: Path) -> None:
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    # WordPiece over the world's words (lower-cased: the tokenizer is uncased), with every
    # letter and digit as a word start and a `##` continuation so any text still encodes.
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punct = ".,;:!?'\"()[]{}<>-_/*+=#@&%"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punct, *chars]
    tokens += [f"##{c}" for c in chars] + _lowercase_words()
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": 224, "longest_edge": 320}
        ),
        tokenizer=tokenizer,
    )
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": 224,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 7,
            "out_indices": [2, 3, 4],
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
        },
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        d_model=32,
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        # At least 2: the shared box head ties layer 0's weights to the later layers', and
        # with a single layer building the model fails ("... to tie into []").
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_attention_heads=2,
        num_queries=30,
        max_text_len=256,
        disable_custom_kernels=True,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_grounding_dino(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """A random Grounding DINO (tiny Swin backbone, 1-layer BERT, d_model 32, 30 queries)
    whose uncased WordPiece vocabulary holds every world word, category and name."""
    return _cached_build("grounding-dino", seed, cache_dir, _write_grounding_dino)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE layout (byte-level alphabet, `</w>` marks a word's last symbol) with
    merges that spell every lower-cased world and glue word as one token.

    Built by hand rather than by `BpeTrainer`: with `end_of_word_suffix` the trainer
    numbers the `x</w>` symbols in hash order, so its merges (ties broken by id) differ
    from run to run. Each pass appends, for every word the merges so far leave in
    pieces, the merges joining those pieces left to right; appended merges rank last, so
    they never disturb a word already whole."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    words = _lowercase_words()
    merges: dict[tuple[str, str], None] = {}
    while True:
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        bpe = BPE(vocab=vocab, merges=list(merges), end_of_word_suffix="</w>")
        n_merges = len(merges)
        for word in words:
            pieces = [t.value for t in bpe.tokenize(word)]
            for nxt in pieces[1:]:
                merges.setdefault((pieces[0], nxt))
                pieces[0] += nxt
                tokens.append(pieces[0])
        if len(merges) == n_merges:
            return vocab, list(merges)


def _write_clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    tower = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    CLIPModel(config).eval().save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_clip(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """A random CLIP (1-layer text and vision towers of width 32, 32-px images, 8-px
    patches, 32-d embeddings) with a CLIP-style BPE that spells the world's words."""
    return _cached_build("clip", seed, cache_dir, _write_clip)
