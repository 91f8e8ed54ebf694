"""Image captioning on the embedded scenes, through the real trainer: captions say what the
pixels show, held-out combinations appear only in test, the captioner learns, ``eval`` and
``generate --image`` agree and draw attention maps (MLflow artifacts), resume is exact, two
data-parallel processes under ZeRO give one process's losses, and bad input is one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sacrebleu
from PIL import Image

from tests.conftest import (
    REPO,
    assert_resume_is_exact,
    assert_two_processes_match_one,
    read_metrics,
    run_cli,
    sets,
)
from trainer.config import DataConfig
from trainer.data import scenes
from trainer.errors import DataError
from trainer.evaluation.metrics import text_metrics

TRANSFORMER = str(REPO / "configs/captions/transformer-debug.yaml")
GRU = str(REPO / "configs/captions/gru-attn-debug.yaml")
TINY = ["model.source.cnn_channels=[8,16]", "data.num_pairs=400", "tracking.enabled=false", "train.log_every=1",
        "eval.every=0", "checkpoint.every=0", "train.micro_batch_size=4", "train.global_batch_size=8"]
TINY_TRANSFORMER = [*TINY, "model.d_model=32", "model.n_enc_layers=1", "model.n_dec_layers=1"]

CAPTION = re.compile(r"^(there is )?a (\w+) (\w+) (\w+) (left of|to the left of|right of|to the right of|above|over|"
                     r"below|under) a (\w+) (\w+) (\w+)$")
SIZE = {"small": "small", "little": "small", "large": "large", "big": "large"}
DIRECTION = {"left of": (-1, 0), "to the left of": (-1, 0), "right of": (1, 0), "to the right of": (1, 0),
             "above": (0, -1), "over": (0, -1), "below": (0, 1), "under": (0, 1)}


def _blob(image: np.ndarray, colour: str) -> tuple[np.ndarray, int]:
    """Centroid (x, y) and area of the pixels closest to ``colour`` among the palette."""
    palette = np.array([(0.08, 0.08, 0.08), *scenes.COLOURS.values()])
    nearest = np.linalg.norm(image[:, :, :, None] - palette.T[:, None, None, :], axis=0).argmin(-1)
    ys, xs = np.nonzero(nearest == 1 + list(scenes.COLOURS).index(colour))
    return np.array([xs.mean(), ys.mean()]), len(xs)


def test_every_caption_says_what_the_pixels_show():
    """Each caption of the grammar, parsed here on its own, names the colours, the sizes (by the
    area of each blob) and the direction from the first to the second (by their centroids)."""
    split = scenes.SceneSplit("val", 60, seed=3)
    checked = 0
    for i, s in enumerate(split.scenes):
        if s.a.colour == s.b.colour:
            continue  # one colour: the blobs cannot be told apart by it
        image = split.image(i)
        blobs = {c: _blob(image, c) for c in (s.a.colour, s.b.colour)}
        caps = split.references(i)
        assert split.targets[i] in caps and len(set(caps)) == len(caps) == 32
        for cap in caps:
            m = CAPTION.match(cap)
            assert m, cap
            _, size1, colour1, _, rel, size2, colour2, _ = m.groups()
            (c1, area1), (c2, area2) = blobs[colour1], blobs[colour2]
            dx, dy = DIRECTION[rel]
            assert (c2 - c1) @ np.array([dx, dy]) < -4, (cap, c1, c2)  # the first lies that way of the second
            for size, area in ((size1, area1), (size2, area2)):
                assert (area > 60) == (SIZE[size] == "large"), (cap, area)
        checked += 1
    assert checked > 30


def test_held_out_colour_shape_combinations_appear_only_in_test():
    splits = scenes.read_splits(DataConfig(source="scenes", num_pairs=2000), seed=0)
    combos = {k: {(t.colour, t.shape) for s in v.scenes for t in (s.a, s.b)} for k, v in splits.items()}
    held = set(scenes.HELD_OUT)
    assert not held & (combos["train"] | combos["val"])
    assert all({(s.a.colour, s.a.shape), (s.b.colour, s.b.shape)} & held for s in splits["test"].scenes)
    # Each held-out colour and shape is seen in training, with other partners.
    assert all(any(c == colour for c, _ in combos["train"]) and any(sh == shape for _, sh in combos["train"])
               for colour, shape in held)
    a, b = scenes.read_splits(DataConfig(source="scenes", num_pairs=2000), seed=0)["test"], splits["test"]
    assert np.array_equal(a.image(5), b.image(5)) and not np.array_equal(a.image(5), a.image(6))


def test_metrics_score_against_every_reference():
    refs = [["a red circle above a blue square", "a blue square below a red circle"], ["a green triangle"]]
    hyps = ["a blue square below a red circle", "a green circle"]
    m = text_metrics(hyps, refs)
    assert m["exact_match"] == 50.0
    # sacrebleu's own multi-reference BLEU with the ragged list completed by hand.
    want = sacrebleu.corpus_bleu(hyps, [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][0]]]).score
    assert m["bleu"] == pytest.approx(want)
    # Completing with a copy of the first reference changes nothing (sacrebleu on its own).
    one = sacrebleu.corpus_bleu(hyps[1:], [[refs[0][0]]]).score
    assert one == pytest.approx(sacrebleu.corpus_bleu(hyps[1:], [[refs[0][0]], [refs[0][0]]]).score)
    assert text_metrics(hyps[:1], refs[:1])["bleu"] == pytest.approx(100.0)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("captions")
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["model.d_model=64", "model.source.cnn_channels=[16,32]", "data.num_pairs=2000", "train.steps=300",
            "train.micro_batch_size=32", "train.global_batch_size=32", "train.warmup_steps=30", "train.log_every=50",
            "eval.every=150", "eval.decode_samples=64", "checkpoint.every=300", "tracking.enabled=true",
            f"tracking.uri={uri}"]
    run_cli(["train", TRANSFORMER, "--run-dir", str(root / "run"), *sets(*args)], cache_dir)
    return root / "run", uri


def test_the_captioner_learns_and_generate_reads_an_image_file_as_eval_does(captioner, cache_dir, tmp_path):
    run, uri = captioner
    _, evals = read_metrics(run)
    assert evals[-1]["val_bleu"] > evals[0]["val_bleu"] + 20, evals
    # A run directory with one checkpoint: its row, and the attention maps logged to MLflow.
    res = json.loads(run_cli(["eval", str(run), "--split", "test", "--json", "--limit", "24", "--beam", "3"],
                             cache_dir).stdout)
    assert res["scenes"] == 24 and res["bleu"] > 20 and len(res["attention_pngs"]) == 3
    # The same test scenes as PNG files through generate: the captions eval scored.
    test = scenes.read_splits(DataConfig(source="scenes", num_pairs=2000), seed=1234)["test"]  # the run's seed
    files = []
    for i in range(3):
        files.append(tmp_path / f"scene{i}.png")
        Image.fromarray((test.image(i).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(files[-1])
    p = run_cli(["generate", str(run), "--beam", "3", "--attention-png", str(tmp_path / "att.png"),
                 *(a for f in files for a in ("--image", str(f)))], cache_dir)
    outs = [line.split("\t")[1] for line in p.stdout.splitlines()]
    evaluated = json.loads(run_cli(["eval", str(run), "--split", "test", "--json", "--limit", "3", "--beam", "3"],
                                   cache_dir).stdout)
    assert outs == [s["output"] for s in evaluated["samples"]]
    for k in (1, 2, 3):
        png = Image.open(tmp_path / f"att-{k}.png")
        assert png.width > 300  # one panel per word beside the picture
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (run / "mlflow_run_id").read_text().strip()
    names = [a.path for a in client.list_artifacts(run_id, "eval/attention")]
    assert len(names) >= 3 and all(n.endswith(".png") for n in names)
    assert client.get_metric_history(run_id, "val_bleu")


def test_bad_images_are_one_line_naming_the_file(captioner, cache_dir, tmp_path):
    run, _ = captioner
    (tmp_path / "text.png").write_text("not a picture")
    Image.new("L", (32, 32)).save(tmp_path / "grey.png")
    Image.new("RGB", (40, 32)).save(tmp_path / "wide.png")
    for name, says in (("text.png", "not an image Pillow can decode"), ("grey.png", "1 channel(s) (mode L); the model reads 3"),
                       ("wide.png", "40x32 pixels; the model reads 32x32"), ("none.png", "no such file")):
        with pytest.raises(DataError, match=re.escape(says)) as e:
            scenes.read_image(tmp_path / name, 3, 32)
        assert name in str(e.value)
    # Through the CLI: one line, exit code 2.
    p = run_cli(["generate", str(run), "--image", str(tmp_path / "grey.png")], cache_dir, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "grey.png: 1 channel(s) (mode L); the model reads 3" in p.stderr, p.stderr
    p = run_cli(["train", TRANSFORMER, "--run-dir", str(tmp_path / "r"), *sets(*TINY, "data.source=dates")], cache_dir,
                check=False)
    assert p.returncode == 2 and "data.source='dates': an image source trains on 'scenes'" in p.stderr, p.stderr


def test_recurrent_captioner_resumes_exactly(cache_dir, tmp_path):
    assert_resume_is_exact(GRU, [*TINY, "model.d_hidden=32", "model.d_embed=16", "model.d_attn=16", "train.steps=6"],
                           3, 6, cache_dir, tmp_path)


@pytest.mark.distributed
def test_two_processes_under_zero_or_tensor_parallelism_match_one(cache_dir, tmp_path):
    """Data-parallel under ZeRO-2, and tensor-parallel (the Transformer's plan; the CNN is
    replicated): each gives one process's losses."""
    args = [*TINY_TRANSFORMER, "train.steps=4", "model.dropout=0.0"]
    assert_two_processes_match_one(TRANSFORMER, [*args, "parallel.zero_stage=2"], 4, cache_dir, tmp_path)
    run_cli(["train", TRANSFORMER, "--run-dir", str(tmp_path / "tp"), *sets(*args, "parallel.tp=2")], cache_dir,
            nproc=2)
    one, _ = read_metrics(tmp_path / "one")
    tp, _ = read_metrics(tmp_path / "tp")
    assert [r["loss"] for r in tp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
