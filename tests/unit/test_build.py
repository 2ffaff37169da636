"""Shard building: real tokenizer, real tar files, read back through webdataset."""

import json
import tarfile

import numpy as np
import pytest

from dist_train.data.build import build_shards, expand_inputs
from dist_train.data.manifest import DataError, read_manifest, sha256_file
from dist_train.data.stream import read_shard
from dist_train.model.build import load_tokenizer


def test_packing_concatenates_with_separator_and_drops_the_tail(tmp_path):
    from dist_train.data import packing

    (tmp_path / "tokens").mkdir()
    np.savez(packing.chunk_path(tmp_path, 0), tokens=np.array([1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 9, 0, 10]),
             lengths=np.array([4, 6, 2, 1]), val=np.array([False, False, False, True]))
    got = list(packing.samples(tmp_path, 1, "train", 4, np.int32, (0, 0, 0)))
    assert [a.tolist() for a, _ in got] == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 9, 0]]
    assert [pos for _, pos in got] == [(0, 0, 4), (0, 1, 4), (0, 2, 2)]
    resumed = list(packing.samples(tmp_path, 1, "train", 4, np.int32, (0, 1, 4)))
    assert [a.tolist() for a, _ in resumed] == [[8, 0, 9, 0]]


def test_manifest_matches_the_shards(shards_dir, tokenizer_dir):
    man = read_manifest(shards_dir)
    assert man.seq_len == 32 and man.dtype == "uint16" and man.vocab_size == len(load_tokenizer(str(tokenizer_dir)))
    assert len(man.train) > 3 and man.validation
    for shard in man.train + man.validation:
        assert sha256_file(man.path(shard)) == shard.sha256
        rows = list(read_shard(man.path(shard), samples=shard.samples, seq_len=32))
        assert len(rows) == shard.samples and shard.tokens == shard.samples * 32
        assert all(r.dtype == np.uint16 and r.shape == (32,) for r in rows)
    with tarfile.open(man.path(man.train[0])) as tf:  # plain npy members, no pickles
        assert all(m.name.endswith(".tokens.npy") for m in tf.getmembers())


def test_packed_tokens_are_the_documents_with_separators(shards_dir, tokenizer_dir, corpus_docs):
    tok = load_tokenizer(str(tokenizer_dir))
    man = read_manifest(shards_dir)
    first = read_shard(man.path(man.train[0]), samples=man.train[0].samples)[0].tolist()
    # the first training sample starts with the first training document (val docs are drawn at random)
    ids = [i for d in corpus_docs[:5] for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert any(first == ids[k:k + 32] for k in range(0, len(ids) - 32))


def test_build_is_reproducible_whatever_the_parallelism(tmp_path, corpus_jsonl, tokenizer_dir):
    kw = dict(input_spec=str(corpus_jsonl), tokenizer_name=str(tokenizer_dir), seq_len=32, samples_per_shard=50,
              progress=False, chunk_docs=64)
    a = build_shards(output=tmp_path / "a", **kw)
    b = build_shards(output=tmp_path / "b", workers=2, **kw)
    assert [s.sha256 for s in a.train + a.validation] == [s.sha256 for s in b.train + b.validation]
    assert sum(a.doc_tokens_histogram.values()) == a.documents == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no work dir left behind


def test_interrupted_build_resumes_and_keeps_finished_shards(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch):
    from dist_train.data import packing

    kw = dict(input_spec=str(corpus_jsonl), tokenizer_name=str(tokenizer_dir), seq_len=32, samples_per_shard=50,
              progress=False, chunk_docs=64)
    reference = build_shards(output=tmp_path / "ref", **kw)
    real = packing.sha256_file
    calls = []

    def stop_after_two(path):  # the machine goes down after the second finished shard
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(packing, "sha256_file", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_shards(output=tmp_path / "out", **kw)
    monkeypatch.setattr(packing, "sha256_file", real)
    work = tmp_path / ".out.partial"
    done = json.loads((work / "progress.json").read_text())["train"]["shards"]
    assert len(done) == 2 and not (tmp_path / "out").exists()
    inode = (work / "shard-000000.tar").stat().st_ino
    man = build_shards(output=tmp_path / "out", **kw)
    assert [s.sha256 for s in man.train + man.validation] == [s.sha256 for s in reference.train + reference.validation]
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_ino == inode  # kept, not rewritten


@pytest.mark.parametrize("kind", ["txt", "parquet", "saved"])
def test_other_input_formats(tmp_path, corpus_docs, tokenizer_dir, kind):
    import datasets

    docs = corpus_docs[:60]
    if kind == "txt":
        for i, d in enumerate(docs):
            (tmp_path / f"doc{i:03d}.txt").write_text(d)
        spec = str(tmp_path / "*.txt")
    elif kind == "parquet":
        datasets.Dataset.from_dict({"body": docs}).to_parquet(tmp_path / "c.parquet")
        spec = str(tmp_path / "c.parquet")
    else:
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(tmp_path / "saved")
        spec = str(tmp_path / "saved")
    man = build_shards(input_spec=spec, output=tmp_path / "out", tokenizer_name=str(tokenizer_dir), seq_len=16,
                       text_field="text" if kind == "txt" else "body", samples_per_shard=100, progress=False)
    assert man.documents == len(docs) and sum(s.samples for s in man.train) > 10


def test_bad_inputs_fail_cleanly(tmp_path, corpus_jsonl, tokenizer_dir):
    kw = dict(tokenizer_name=str(tokenizer_dir), seq_len=32, progress=False)
    with pytest.raises(DataError, match="matches no file"):
        build_shards(input_spec=str(tmp_path / "none-*.jsonl"), output=tmp_path / "o1", **kw)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        build_shards(input_spec=str(tmp_path / "empty.jsonl"), output=tmp_path / "o2", **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        build_shards(input_spec=str(corpus_jsonl), output=tmp_path / "file", **kw)
    with pytest.raises(DataError, match="no field 'body'"):
        build_shards(input_spec=str(corpus_jsonl), output=tmp_path / "o3", text_field="body", **kw)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="shorter than one training sample"):
        build_shards(input_spec=str(tiny), output=tmp_path / "o4", **kw)
    # nothing half-written is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty.jsonl", "file", "tiny.jsonl"] or \
        not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert not any(p.name.startswith((".o", "o1", "o2", "o3", "o4")) for p in tmp_path.iterdir())


def test_expand_inputs_rejects_mixed_and_unknown(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(DataError, match="mixes file kinds"):
        expand_inputs(str(tmp_path / "*"))
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        expand_inputs(str(tmp_path / "c.xlsx"))


def test_damaged_manifest_and_missing_shard(tmp_path, shards_dir):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(shards_dir, copy)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"shard-000001\.tar listed in manifest\.json is missing"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="damaged"):
        read_manifest(copy)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")


def test_encoder_samples_start_with_cls_and_documents_end_with_sep(encoder_shards, minilm_dir):
    tok = load_tokenizer(str(minilm_dir))
    man = read_manifest(encoder_shards)
    assert man.tokenizer["sample_prefix_id"] == tok.cls_token_id and man.tokenizer["separator_id"] == tok.sep_token_id
    rows = [r for s in man.train for r in read_shard(man.path(s), samples=s.samples)]
    assert all(r[0] == tok.cls_token_id for r in rows)
    assert sum(int((r == tok.sep_token_id).sum()) for r in rows) > 0
    # whole documents, never padded or truncated (its tokenizer.json asks for both)
    assert not any((r == tok.pad_token_id).any() for r in rows)
    assert sum(s.samples for s in man.train + man.validation) > 400


def test_huge_documents_are_bounded(tmp_path, corpus_docs, tokenizer_dir):
    """A record over --max-doc-mb is refused before anything is read or created; a tokenizing task is
    bounded in text as well as in documents."""
    from dist_train.data import build

    kw = dict(tokenizer_name=str(tokenizer_dir), seq_len=32, progress=False, max_doc_mb=1)
    big = "\n".join(corpus_docs)
    big = (big * ((1 << 20) // len(big) + 1))[: (1 << 20) + 10]  # a little more than 1 MiB
    (tmp_path / "big.txt").write_text(big)
    with pytest.raises(DataError, match=r"big.txt is one record of 1 MiB, more than the 1 MiB a reader takes at "
                                        r"once: split it into smaller records \(`dist-train data build --max-doc-mb` "
                                        r"raises the bound\)"):
        build_shards(input_spec=str(tmp_path / "big.txt"), output=tmp_path / "o1", **kw)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": big}) + "\n")
    with pytest.raises(DataError, match=r"line 2 of .*big.jsonl is longer than 1 MiB"):
        build_shards(input_spec=str(tmp_path / "big.jsonl"), output=tmp_path / "o2", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "big.txt"]  # nothing created

    assert [len(b) for b in build._batched(["a" * 40, "b" * 70, "c", "d"], 3, chars=100)] == [2, 2]


@pytest.mark.parametrize("which", ["byte-level BPE", "WordPiece"])
def test_long_documents_tokenize_in_pieces_to_the_same_ids(which, tokenizer_dir, corpus_docs, request, monkeypatch):
    """Cut only where the pre-tokenizer splits anyway: blank-line runs, CRLF line ends, trailing and
    doubled spaces, and stretches with no newline at all keep their ids."""
    from dist_train.data import packing

    name = str(tokenizer_dir) if which == "byte-level BPE" else str(request.getfixturevalue("minilm_dir"))
    tok = load_tokenizer(name)
    parts = []
    for i, d in enumerate(corpus_docs[:60]):
        parts.append(d)
        parts.append(["\n\n", "\r\n", " \n", "\n", "  ", " ", "\n\n\n"][i % 7])
    doc = "".join(parts) + " ".join(corpus_docs[60:80]).replace("\n", " ")  # a long stretch without newlines
    monkeypatch.setattr(packing, "PIECE_CHARS", 3000)
    packing.init_encoder(packing.make_encoder(tok))
    assert len(doc) > 10 * 3000
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    short, long = packing.encode_documents(["tiny text", doc])
    assert list(long) == whole
    assert list(short) == tok("tiny text", add_special_tokens=False)["input_ids"]

    def slow(texts):  # like a slow tokenizer: an empty batch is an error
        assert texts, "an empty batch"
        return [[len(t)] for t in texts]

    monkeypatch.setattr(packing, "_ENCODE", slow)  # a chunk of long documents only: no empty batch is sent
    got = packing.encode_documents([doc[:9000], doc[:7000]])
    assert [int(x.sum()) for x in got] == [9000, 7000] and all(len(x) >= 3 for x in got)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_data_tokenizer_trains_on_your_corpus(kind, tmp_path, corpus_jsonl):
    """`dist-train data tokenizer`: a Hugging Face tokenizer of the asked size and kind that data build
    takes; an existing output is replaced only with --overwrite, and only if it is a tokenizer."""
    from dist_train.cli import main
    from dist_train.data.build import sample_prefix_id, separator_id

    out = tmp_path / "tok"
    argv = ["data", "tokenizer", "--input", str(corpus_jsonl), "--output", str(out), "--vocab-size", "600",
            "--kind", kind]
    assert main(argv) == 0
    tok = load_tokenizer(str(out))
    assert len(tok) == 600
    ids = tok("def main(): return 0")["input_ids"]
    if kind == "wordpiece":  # an encoder's tokenizer: [CLS] … [SEP], a mask token, and no unknown pieces in code
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.mask_token == "[MASK]"
        assert sample_prefix_id(tok) == tok.cls_token_id and separator_id(tok) == tok.sep_token_id
    else:
        assert tok.eos_token == "<eos>" and tok.decode(ids) == "def main(): return 0"  # bytes round-trip
    man = build_shards(input_spec=str(corpus_jsonl), output=tmp_path / "shards", tokenizer_name=str(out), seq_len=32,
                       progress=False)
    assert man.vocab_size == 600
    assert main(argv) == 2  # exists: --overwrite replaces it
    assert main([*argv, "--overwrite"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main([*argv[:5], str(tmp_path / "mine"), *argv[6:], "--overwrite"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
