"""Tests for router/detokenize.py with a byte-level BPE tokenizer trained in-test."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenize import IncrementalDetokenizer, StopStringMatcher

CORPUS = [
    "héllo wörld 日本語 emoji 🙂",
    "The quick brown fox jumps over the lazy dog. 日本語のテキストです。",
    "Grüße aus Köln, ça va? naïve café — «quotes» and 🙂🙃🚀 emoji.",
    "hello world, hello tokens; 東京 大阪 京都 and Ελληνικά text.",
]
SAMPLES = CORPUS + [
    "   leading spaces and  double  spaces\nnew line\ttab",
    "unseen: 🦄 龍 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ω≈ç√ ﬁ",
    "héllo<|endoftext|>wörld",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def stream(tokenizer, ids, chunk_sizes=None, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas, i, n = [], 0, 0
    while i < len(ids):
        step = 1 if chunk_sizes is None else chunk_sizes[n % len(chunk_sizes)]
        deltas.append(detok.push(ids[i:i + step]))
        i, n = i + step, n + 1
    deltas.append(detok.flush())
    return detok, deltas


def test_multibyte_chars_are_split_across_tokens(tokenizer):
    # Guard that the test exercises the hard case: some token is not valid UTF-8 alone.
    ids = tokenizer.encode("日本語 🙂 🦄", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("skip_special", [True, False])
def test_one_by_one_matches_full_decode(tokenizer, text, skip_special):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, skip_special_tokens=skip_special)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special)
    assert "\ufffd" not in expected
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert deltas[-1] == ""  # nothing left for flush on complete text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("chunks", [[2], [3, 1], [5, 2, 1]])
def test_multi_token_pushes_match_full_decode(tokenizer, chunks):
    text = " ".join(SAMPLES)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, chunk_sizes=chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


def test_prefixes_never_emit_replacement_mid_character(tokenizer):
    ids = tokenizer.encode("日本語 🙂🙃🚀 龍🦄𝔘𝔫 ünïcödé", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for n, t in enumerate(ids, 1):
        detok.push([t])
        full = tokenizer.decode(ids[:n])
        assert "\ufffd" not in detok.text
        assert full.startswith(detok.text) or full.rstrip("\ufffd").startswith(detok.text)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ids_flush_reproduces_decode(tokenizer, data):
    # Arbitrary (possibly invalid UTF-8) sequences: pushes + flush == decode.
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=30))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    _, deltas = stream(tokenizer, ids, chunk_sizes=chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_empty_push_and_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push([]) == ""
    assert detok.flush() == ""
    assert detok.text == ""


# ---------------------------------------------------------------- stop strings


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the stop occurrence that completes first (ties: longest stop)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[:end - max(len(s) for s in hits)], True
    return text, False


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


ALPHABET = "ab c\n🙂é"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=ALPHABET, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_stop_matcher_matches_reference(text, stops, cuts):
    matcher = StopStringMatcher(stops)
    emitted, stopped = [], False
    for delta in split_at(text, cuts):
        out, stopped = matcher.feed(delta)
        emitted.append(out)
        for s in stops:
            if s:
                assert s not in "".join(emitted)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    expected, expect_stop = reference_stop(text, stops)
    assert stopped == expect_stop
    assert "".join(emitted) == expected


def test_stop_matcher_holds_back_possible_prefix():
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("x more") == ("</enx more", False)
    assert m.feed(" </e") == (" ", False)
    assert m.feed("nd> tail") == ("", True)
    assert m.feed("ignored") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_flush_releases_tail():
    m = StopStringMatcher(["STOP", ""])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.flush() == "ST"
    assert StopStringMatcher([]).feed("anything") == ("anything", False)
