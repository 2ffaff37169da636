"""`dist-train data tokenizer`: train a tokenizer on your own corpus, for a model trained from scratch.

Two kinds, with the `tokenizers` library: byte-level BPE (GPT-2 and Llama 3 style, for causal LMs:
every byte is representable, no unknown token) and WordPiece (BERT style, for encoders: [CLS],
[SEP], [MASK]). The result is a Hugging Face tokenizer directory that `data build --tokenizer` and
`model.tokenizer` take. Training reads the corpus once, as `data build` does (the same inputs and
record bound), and is deterministic for the same corpus and options.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from dist_train import owned
from dist_train.data.manifest import DataError

TOKENIZER_KIND = "tokenizer"
KINDS = ("bpe", "wordpiece")


def train_tokenizer(corpus: Iterable[str], vocab_size: int, out_dir: Path,
                    kind: Literal["bpe", "wordpiece"] = "bpe") -> None:
    """Train a tokenizer of `kind` with `vocab_size` entries on `corpus` and save it as an HF
    directory in `out_dir` (written as is: the caller decides where)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(out_dir))


def build_tokenizer(input_spec: str, output: Path, vocab_size: int, kind: str = "bpe", text_field: str = "text",
                    overwrite: bool = False, max_doc_mb: int | None = None) -> dict[str, float]:
    """Train a tokenizer on the corpus PATH_OR_GLOB into `output` (new, empty, or an earlier tokenizer
    with `overwrite`), atomically; returns its size and the tokens per word it gives on the corpus."""
    from dist_train.data.build import MAX_RECORD_MB, check_record_sizes, expand_inputs, read_documents

    if kind not in KINDS:
        raise DataError(f"--kind {kind!r} is not one of {list(KINDS)}")
    least = 258 if kind == "bpe" else 64  # byte-level BPE: 256 bytes and its two special tokens
    if vocab_size < least:
        raise DataError(f"--vocab-size {vocab_size} is too small for {kind}: use at least {least}")
    max_mb = max_doc_mb or MAX_RECORD_MB
    source_kind, files = expand_inputs(input_spec)
    check_record_sizes(source_kind, files, f"--input {input_spec!r}", max_mb)
    inputs = [Path(f) for f in files if "://" not in f]
    try:
        owned.check_output(output, TOKENIZER_KIND, overwrite=overwrite, inputs=inputs, what="--output")
    except owned.OwnershipError as e:
        raise DataError(str(e)) from None
    sample: list[str] = []  # the first documents, to measure the result on; the corpus itself streams
    count = 0

    def documents() -> Iterator[str]:
        nonlocal count
        for doc in read_documents(input_spec, text_field, None):
            count += 1
            if len(sample) < 2000:
                sample.append(doc)
            yield doc

    tmp = owned.temp_beside(output)
    try:
        train_tokenizer(documents(), vocab_size, tmp, kind)  # type: ignore[arg-type]
        if count == 0:
            raise DataError(f"--input {input_spec!r} holds no non-empty documents in field {text_field!r}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp))
        words = sum(len(d.split()) for d in sample)
        tokens = sum(len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"])
        owned.replace(tmp, output, TOKENIZER_KIND, what="--output")
    finally:
        owned.discard(tmp)
    return {"vocab_size": float(len(tok)), "tokens_per_word": tokens / max(words, 1), "documents": float(count)}
