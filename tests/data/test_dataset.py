"""Datasets: file discovery, JSONL/Parquet reading, bad records, sharding and exact resume of shard streams."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pytest
from conftest import write_jsonl, write_parquet

from veofast.data.data_transform import process_pretrain_example
from veofast.data.dataset import MappingShardStream, build_iterative_dataset, build_mapping_dataset
from veofast.data.records import resolve_data_files


def records(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"d{i:04d}" + "z" * (i % 13)} for i in range(start, start + n)]


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", records(23))
    write_parquet(tmp_path / "sub_b.parquet", records(30, start=23), row_group_size=7)
    write_jsonl(tmp_path / "c.jsonl", records(10, start=53))
    return tmp_path


@pytest.fixture
def transform(tokenizer):
    return partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=64)


def doc_id(tokenizer, sample) -> str:
    return tokenizer.decode(sample["input_ids"][:5])


def test_resolve_data_files(data_dir, tmp_path):
    files = resolve_data_files(data_dir)
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "c.jsonl", "sub_b.parquet"]
    assert resolve_data_files(str(data_dir / "*.jsonl")) == files[:2]
    assert resolve_data_files(str(data_dir / "a.jsonl")) == files[:1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_data_files(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jsonl or .parquet files"):
        resolve_data_files(tmp_path / "empty")
    (tmp_path / "run[1]").mkdir()  # glob characters in a path that exists: the path itself
    write_jsonl(tmp_path / "run[1]" / "x.jsonl", records(1))
    assert resolve_data_files(str(tmp_path / "run[1]")) == [str(tmp_path / "run[1]" / "x.jsonl")]
    assert resolve_data_files(str(tmp_path / "run[1]" / "x.jsonl")) == [str(tmp_path / "run[1]" / "x.jsonl")]


def test_directories_skip_hidden_entries(data_dir):
    # as a glob does: notebook checkpoints would train a file twice, macOS "._" files are not JSON
    (data_dir / ".ipynb_checkpoints").mkdir()
    write_jsonl(data_dir / ".ipynb_checkpoints" / "a-checkpoint.jsonl", records(23))
    (data_dir / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07")
    files = resolve_data_files(data_dir)
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "c.jsonl", "sub_b.parquet"]
    assert resolve_data_files(data_dir / "._a.jsonl") == [str(data_dir / "._a.jsonl")]  # named: read as asked


def test_directories_follow_symlinked_subdirectories(data_dir, tmp_path_factory):
    # a data directory assembled from links to other places is read whole; a link back up is read once
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_jsonl(elsewhere / "linked.jsonl", records(3))
    (data_dir / "web").symlink_to(elsewhere, target_is_directory=True)
    (data_dir / "loop").symlink_to(data_dir, target_is_directory=True)
    files = resolve_data_files(data_dir)
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "c.jsonl", "sub_b.parquet", "linked.jsonl"]


def test_unreadable_parquet_files(data_dir, transform, tokenizer):
    (data_dir / "empty.parquet").write_bytes(b"")  # no records, as an empty .jsonl file
    assert len(build_mapping_dataset(data_dir, transform)) == 63
    stream = build_iterative_dataset(data_dir, transform, shuffle_buffer_size=1).shard_stream(0, 1)
    assert sorted(doc_id(tokenizer, next(stream)) for _ in range(63)) == [f"d{i:04d}" for i in range(63)]
    (data_dir / "corrupt.parquet").write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(ValueError, match=r"corrupt.parquet: not a readable Parquet file"):
        build_mapping_dataset(data_dir, transform)


def test_unpaired_surrogates_are_bad_records(tmp_path, transform, caplog):
    # valid JSON whose string no tokenizer can encode (half an emoji); a full surrogate pair is fine
    lines = ['{"text": "ok"}', '{"text": "half \\ud83d emoji"}', '{"text": "pair \\ud83d\\ude00 \\u00e9"}']
    path = write_jsonl(tmp_path / "surrogates.jsonl", lines)
    with pytest.raises(ValueError, match=r"surrogates.jsonl:2: a string holds an unpaired UTF-16 surrogate"):
        build_mapping_dataset(path, transform)
    with caplog.at_level(logging.WARNING):
        dataset = build_mapping_dataset(path, transform, on_bad_record="skip")
    assert dataset.policy.skipped == 1 and "surrogates.jsonl:2" in caplog.text
    assert [len(dataset[i]) for i in range(len(dataset))] == [1, 1]
    assert "pair \U0001f600 \u00e9" in transform.keywords["tokenizer"].decode(dataset[1][0]["input_ids"])


def test_mapping_dataset(data_dir, transform, tokenizer):
    dataset = build_mapping_dataset(data_dir, transform)
    assert len(dataset) == 63
    ids = sorted(doc_id(tokenizer, dataset[i][0]) for i in range(len(dataset)))
    assert ids == sorted(f"d{i:04d}" for i in range(63))
    assert isinstance(dataset[0][0]["input_ids"], list)


def test_bad_records(tmp_path, transform, caplog):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", "", "[1, 2]", {"title": "x"}, {"text": "y"}]
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        build_mapping_dataset(path, transform)
    with caplog.at_level(logging.WARNING):
        dataset = build_mapping_dataset(path, transform, on_bad_record="skip")
    assert len(dataset) == 3  # line 2 and line 4 skipped at load (line 3 is blank)
    assert "bad.jsonl:4: expected a JSON object" in caplog.text and "(2 skipped so far" in caplog.text
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "a"}, {"title": "x"}])
    with pytest.raises(ValueError, match=r"missing.jsonl:2: record has none of the keys \['text'\]"):
        build_mapping_dataset(missing, transform)[1]
    assert dataset[1] == []  # the record without "text", skipped and counted
    stream = build_iterative_dataset(path, transform, on_bad_record="skip").shard_stream(0, 1)
    texts = [next(stream) for _ in range(2)]
    assert len(texts) == 2 and stream.policy.skipped == 3
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        next(build_iterative_dataset(path, transform).shard_stream(0, 1))
    with pytest.raises(ValueError, match="on_bad_record"):
        build_iterative_dataset(path, transform, on_bad_record="ignore")


def test_empty_inputs(tmp_path, transform):
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="dataset is empty"):
        build_mapping_dataset(tmp_path / "empty.jsonl", transform)
    with pytest.raises(ValueError, match="dataset is empty"):
        build_iterative_dataset(tmp_path / "empty.jsonl", transform)
    write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
    stream = build_iterative_dataset(tmp_path / "two.jsonl", transform).shard_stream(2, 3)
    with pytest.raises(ValueError, match="got no sample in a whole epoch"):
        next(stream)


@pytest.mark.parametrize("kind", ["iterable", "mapping"])
def test_shards_partition_each_epoch(data_dir, transform, tokenizer, kind):
    n = 4
    if kind == "iterable":
        dataset = build_iterative_dataset(data_dir, transform, seed=3, shuffle_buffer_size=5)
        streams = [dataset.shard_stream(s, n) for s in range(n)]
    else:
        dataset = build_mapping_dataset(data_dir, transform)
        streams = [MappingShardStream(dataset, s, n, seed=3) for s in range(n)]
    orders = []
    for _epoch in range(2):
        seen = []
        for stream in streams:
            seen.append(doc_id(tokenizer, next(stream)))
            while not stream.epoch_finished:
                seen.append(doc_id(tokenizer, next(stream)))
        assert sorted(seen) == sorted(f"d{i:04d}" for i in range(63))  # every record once per epoch
        orders.append(seen)
    assert orders[0] != orders[1]  # re-shuffled by epoch


@pytest.mark.parametrize("kind", ["iterable", "mapping"])
def test_shard_stream_exact_resume(data_dir, transform, tokenizer, kind):
    def make(shard):
        if kind == "iterable":
            return build_iterative_dataset(data_dir, transform, seed=5, shuffle_buffer_size=6).shard_stream(shard, 3)
        return MappingShardStream(build_mapping_dataset(data_dir, transform), shard, 3, seed=5)

    for shard in range(3):
        reference = make(shard)
        expected = [doc_id(tokenizer, next(reference)) for _ in range(70)]  # > 3 epochs of this shard
        for cut in (1, 9, 21, 40):
            first = make(shard)
            for _ in range(cut):
                next(first)
            resumed = make(shard)
            resumed.load_state_dict(first.state_dict())
            assert [doc_id(tokenizer, next(resumed)) for _ in range(70 - cut)] == expected[cut:]


def test_iterative_dataset_iter_and_state(data_dir, transform, tokenizer):
    dataset = build_iterative_dataset(data_dir, transform, seed=1, shuffle_buffer_size=4)
    epoch = [doc_id(tokenizer, s) for s in dataset]
    assert sorted(epoch) == sorted(f"d{i:04d}" for i in range(63))
    assert isinstance(next(iter(dataset))["input_ids"], list)
    again = build_iterative_dataset(data_dir, transform, seed=1, shuffle_buffer_size=4)
    iterator = iter(again)
    head = [doc_id(tokenizer, next(iterator)) for _ in range(10)]
    state = again.state_dict()
    fresh = build_iterative_dataset(data_dir, transform, seed=1, shuffle_buffer_size=4)
    fresh.load_state_dict(state)
    assert head + [doc_id(tokenizer, s) for s in fresh] == epoch
    assert np.all(np.asarray(state["buffer"][0]["input_ids"]) >= 0)
