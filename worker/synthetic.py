"""Random-weight cross-encoders with real BGE architectures, for tests and benchmarks.

No hub is needed: the tokenizer is trained on text you supply and the weights are random,
so scores mean nothing, but shapes, code paths and compute cost are those of the real models.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import (
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizer,
)


@dataclass(frozen=True)
class Shape:
    """Transformer dimensions of a cross-encoder."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    positions: int = 514


SHAPES = {
    "tiny": Shape(layers=2, hidden=32, heads=2, intermediate=64),
    "minilm": Shape(layers=6, hidden=384, heads=12, intermediate=1536),
    "bge-reranker-base": Shape(layers=12, hidden=768, heads=12, intermediate=3072),
    "bge-reranker-v2-m3": Shape(layers=24, hidden=1024, heads=16, intermediate=4096, positions=8194),
}
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(lines: Iterable[str], vocab_size: int = 1000) -> XLMRobertaTokenizer:
    """Train an XLM-RoBERTa-style SentencePiece (unigram) tokenizer on `lines`."""
    trained = Tokenizer(models.Unigram())
    trained.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trained.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Slower shrinking than the default keeps whole words on small corpora instead of single letters.
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", shrinking_factor=0.95, n_sub_iterations=4
    )
    trained.train_from_iterator(list(lines), trainer=trainer)
    return XLMRobertaTokenizer(tokenizer_object=trained)


def initializer_range(dims: Shape) -> float:
    """Weight std that keeps a random network's attention neither uniform nor one-hot.

    Trained checkpoints use 0.02, but random weights that small make every output the same;
    0.2 on a wide, deep model makes attention one-hot and the network chaotic, so that any
    rounding (bf16, fp16) reorders the ranking, which trained models do not do. Scaling by
    the width keeps each linear layer's gain near 1.5.
    """
    return min(0.2, 1.5 / dims.hidden**0.5)


def build_cross_encoder(
    directory: str | Path, lines: Iterable[str], shape: str | Shape = "tiny", vocab_size: int = 1000, seed: int = 0
) -> Path:
    """Save a random-weight `XLMRobertaForSequenceClassification` (one label) and its tokenizer."""
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    texts = list(lines)
    path = Path(directory)
    train_tokenizer(texts, vocab_size).save_pretrained(path)
    tokenizer = XLMRobertaTokenizer.from_pretrained(path)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        intermediate_size=dims.intermediate,
        max_position_embeddings=dims.positions,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        num_labels=1,
        initializer_range=initializer_range(dims),
    )
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(config).eval()
    _spread_scores(model, tokenizer, texts[:32])
    model.save_pretrained(path)
    return path


@torch.no_grad()
def _spread_scores(model: XLMRobertaForSequenceClassification, tokenizer: XLMRobertaTokenizer, texts: list[str]) -> None:
    """Rescale the head so logits on `texts` have mean 0 and std 3: random weights bunch them up."""
    pairs = [[texts[0], text] for text in texts]
    logits = model(**tokenizer(pairs, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits[:, 0]
    head = model.classifier.out_proj
    scale = 3.0 / max(logits.std().item(), 1e-6)
    head.weight.mul_(scale)
    head.bias.copy_((head.bias - logits.mean()) * scale)


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.synthetic DIR [--shape S] [--text FILE]`: save a stand-in model for offline use."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m worker.synthetic", description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--text", type=Path, required=True, help="Text to train the tokenizer on, one passage per line.")
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    lines = [line for line in args.text.read_text().splitlines() if line.strip()]
    path = build_cross_encoder(args.directory, lines, args.shape, args.vocab_size)
    print(f"saved a random-weight {args.shape} cross-encoder to {path}")


if __name__ == "__main__":
    main()
