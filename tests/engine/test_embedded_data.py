"""The embedded default data: the corpus generator is deterministic and matches the shipped
``data/tiny`` files, and the shipped ``tokenizers/tiny`` loads through transformers, round-trips
text and renders ChatML."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "tiny"
TOKENIZER = ROOT / "tokenizers" / "tiny"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_veofast_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_corpus = _load_tool("make_corpus")
make_tokenizer = _load_tool("make_tokenizer")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _head(path: Path, n: int) -> list[str]:
    lines = []
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            lines.append(line)
            if len(lines) == n:
                break
    return lines


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _samples(n: int = 100) -> list[str]:
    texts = [json.loads(line)["text"] for line in _head(DATA / "train.jsonl", n)]
    texts += [json.loads(line)["text"] for line in _head(DATA / "eval.jsonl", n // 4)]
    for line in _head(DATA / "sft.jsonl", n // 4):
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


# ---------------------------------------------------------------------------------------------- corpus


def test_generator_is_deterministic(tmp_path):
    counts = {"train": 40, "eval": 10, "sft": 10}
    a = make_corpus.write_corpus(tmp_path / "a", seed=0, counts=counts)
    b = make_corpus.write_corpus(tmp_path / "b", seed=0, counts=counts)
    c = make_corpus.write_corpus(tmp_path / "c", seed=1, counts=counts)
    for split in counts:
        assert a[split].read_bytes() == b[split].read_bytes(), split
        assert a[split].read_bytes() != c[split].read_bytes(), split
        assert len(a[split].read_text(encoding="utf-8").splitlines()) == counts[split]
    # A record depends on (seed, split, index) only: a slice regenerates without its prefix.
    lines = a["train"].read_text(encoding="utf-8").splitlines(keepends=True)
    tail = [make_corpus.record_line(r) for r in make_corpus.iter_records("train", seed=0, start=30, count=10)]
    assert lines[30:] == tail


def test_shipped_files_start_with_generator_output():
    for split, n in [("train", 64), ("eval", 16), ("sft", 16)]:
        expected = [make_corpus.record_line(make_corpus.make_record(0, split, i)) for i in range(n)]
        assert _head(DATA / f"{split}.jsonl", n) == expected, (
            f"data/tiny/{split}.jsonl: regenerate with tools/make_corpus.py"
        )


@pytest.mark.slow
def test_shipped_files_equal_full_regeneration(tmp_path):
    paths = make_corpus.write_corpus(tmp_path, seed=0)
    for split, path in paths.items():
        assert _sha(path) == _sha(DATA / f"{split}.jsonl"), f"data/tiny/{split}.jsonl differs from the generator"


def test_record_shapes_and_lengths():
    docs = [make_corpus.make_document(0, "train", i) for i in range(300)]
    lengths = [make_corpus.estimate_tokens(d) for d in docs]
    assert min(lengths) >= make_corpus.MIN_TOKENS - 5 and max(lengths) <= make_corpus.MAX_TOKENS
    assert len(set(lengths)) > 50  # lengths vary, so packing is exercised
    for doc in docs:
        assert doc and doc == doc.strip() and "<|" not in doc
    for i in range(50):
        messages = make_corpus.make_conversation(0, i)
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and len(roles) % 2 == 1 and len(roles) >= 3
        assert roles[1:] == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"] for m in messages)


def test_tasks_are_correct():
    import random

    rng = random.Random(0)
    for _ in range(200):
        expr, value = make_corpus.equation(rng)
        a, op, b = expr.split()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == value
        name, items, answer = make_corpus.list_task(rng)
        if name == "sort":
            assert answer.split() == [str(x) for x in sorted(map(int, items.split()))]
        elif name == "reverse":
            assert answer.split() == items.split()[::-1]
        line = make_corpus.recall_line(rng)
        pairs, *queries = line.split(" ? ")
        table = dict(p.split("=") for p in pairs.split())
        for q in queries:
            key, value = q.split(" -> ")
            assert table[key] == value


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_with_special_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    # Special tokens in text are single ids; plain text gets no BOS/EOS added by the tokenizer.
    assert tokenizer.encode("<|im_start|>user<|im_end|><|endoftext|>") == [1, *tokenizer.encode("user"), 2, 0]
    assert 0 not in tokenizer.encode("The cat eats an apple.")


def test_tokenizer_round_trips(tokenizer):
    texts = _samples() + [
        "",
        " leading space",
        "two  spaces\n\nand\ttabs ",
        "caf\u00e9 \u65e5\u672c \U0001f600",
        "k3=apple",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < len(tokenizer) for i in ids)
        assert tokenizer.decode(ids) == text
    # The vocabulary fits the corpus: about one token per word.
    doc = json.loads(_head(DATA / "train.jsonl", 1)[0])["text"]
    assert len(tokenizer.encode(doc)) < 1.5 * make_corpus.estimate_tokens(doc)


def test_chat_template_renders_chatml(tokenizer):
    messages = make_corpus.make_conversation(0, 0)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(1) == ids.count(2) == len(messages)
    assert tokenizer.decode(ids) == text


def test_shipped_tokenizer_matches_training(tmp_path):
    corpus = [DATA / "train.jsonl", DATA / "sft.jsonl"]
    retrained = make_tokenizer.train_tokenizer(corpus, vocab_size=1024)
    make_tokenizer.save(retrained, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert _sha(tmp_path / name) == _sha(TOKENIZER / name), f"tokenizers/tiny/{name}: regenerate it"
