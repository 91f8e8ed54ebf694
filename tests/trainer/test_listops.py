"""ListOps: values by the operators' definitions, the generator's settings, parsing and its
errors, the flat batch a recursive network reads."""

from __future__ import annotations

import pytest

from trainer.data.listops import (
    MAX_ARGS,
    MAX_DEPTH,
    VOCAB,
    batch_of,
    generate,
    parse,
    read_file,
    split_of,
)
from trainer.errors import DataError


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[MIN 3 [MAX 1 8 ] 5 ]", 3), ("[MED 1 4 ]", 2), ("[MED 7 1 5 ]", 5),
    ("[SM 5 6 7 ]", 8), ("[SM [MED 9 9 0 ] [MAX 3 ] 2 ]", 4),
])
def test_values_follow_the_operators(text, value):
    tree = parse(text)
    assert tree.value() == value and tree.text() == text


def test_generation_is_deterministic_and_within_the_settings():
    a, b = generate(300, seed=11), generate(300, seed=11)
    assert [t.text() for t in a] == [t.text() for t in b]
    assert [t.text() for t in generate(300, seed=12)] != [t.text() for t in a]

    def walk(node, depth):
        if node.children:
            assert 2 <= len(node.children) <= MAX_ARGS
        assert depth <= MAX_DEPTH
        for c in node.children:
            walk(c, depth + 1)

    for t in a:
        assert t.children and len(t.text().split()) <= 100
        walk(t, 1)
    values = [t.value() for t in a]
    assert len(set(values)) == 10  # every class occurs
    splits = [split_of(t.text(), 0.1, 0.1) for t in a]
    assert {"train", "val", "test"} == set(splits) and splits.count("train") > 200


@pytest.mark.parametrize("text, message", [
    ("[MAX 2 9 ", "1 list(s) left open ([MAX is missing its ']')"),
    ("[MAX 2 ] ]", "unbalanced ']' at token 4"),
    ("[MAX 2 x ]", "unknown token 'x' at token 3"),
    ("3 [MAX 2 ]", "digit '3' at token 1 outside any list"),
    ("[MAX 2 ] [MIN 1 ]", "a second expression starts at token 4"),
    ("[SM ]", "[SM at token 2 closes with no arguments"),
])
def test_malformed_expressions_are_one_line_naming_where(text, message, tmp_path):
    f = tmp_path / "l.tsv"
    f.write_text(f"9\t[MAX 2 9 ]\n\n{text}\n")
    with pytest.raises(DataError) as e:
        list(read_file(f))
    assert str(e.value).startswith(f"{f}:3: {message}"), e.value
    with pytest.raises(DataError, match="^expression: no expression$"):
        parse(" ")


def test_a_wrong_label_is_refused_and_batches_are_consistent(tmp_path):
    f = tmp_path / "l.tsv"
    f.write_text("[MIN 4 7 ]\n3\t[MAX 2 3 ]\n5\t[MAX 2 3 ]\n")
    with pytest.raises(DataError, match=r"l.tsv:3: label '5' is not the expression's value 3"):
        list(read_file(f))
    trees = [parse("[MAX 2 9 [MIN 4 7 ] 0 ]"), parse("[SM 1 2 ]")]
    b = batch_of(trees)
    assert b["roots"].tolist() == [0, 7] and b["labels"].tolist() == [9, 3]
    assert [VOCAB[i] for i in b["tokens"].tolist()] == ["[MAX", "2", "9", "[MIN", "4", "7", "0", "[SM", "1", "2"]
    assert b["parent"].tolist() == [-1, 0, 0, 0, 3, 3, 0, -1, 7, 7]
    assert b["level"].tolist() == [2, 0, 0, 1, 0, 0, 0, 1, 0, 0]
