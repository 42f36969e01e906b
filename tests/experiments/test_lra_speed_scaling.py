"""The LRA, speed and scaling experiments: data generators against independent checks, cost formulas against
torch's FLOP counter, and each command end to end at ``--scale smoke`` (resume, reports)."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from openxlstm.cli import main
from openxlstm.experiments import lra, scaling, speed
from openxlstm.experiments.zoo import build_model
from openxlstm.experiments.results import read_results


# ---------------------------------------------------------------------------------------------------------
# LRA data
# ---------------------------------------------------------------------------------------------------------
def _eval_tokens(tokens: list[str]) -> int:
    """ListOps by a stack machine over the flat token stream (no tree): an independent evaluator."""
    stack: list = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            v = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                 "[MED": int(sorted(args)[len(args) // 2] if len(args) % 2 else
                             (sorted(args)[len(args) // 2 - 1] + sorted(args)[len(args) // 2]) / 2)}[op]
            if stack:
                stack[-1].append(v)
            else:
                return v
        else:
            stack[-1].append(int(t)) if stack else stack.append(int(t))
    return stack[0]


def test_listops_generator_lengths_values_and_tokens():
    rng = random.Random(0)
    seen_ops = set()
    for _ in range(300):
        tree = lra.sample_listops(rng, (20, 120), max_depth=10)
        tokens = lra.listops_tokens(tree)
        _, n = (tree, len(tokens))
        assert 20 < n < 120
        assert lra.listops_value(tree) == _eval_tokens(tokens)
        assert tokens.count("]") == sum(t.startswith("[") for t in tokens)
        seen_ops |= {t for t in tokens if t.startswith("[")}
    assert seen_ops == set(lra.LISTOPS_OPERATORS)
    # the generator's own length count is the token count; depth is bounded
    tree, n = lra.listops_tree(random.Random(1), max_depth=3)
    assert n == len(lra.listops_tokens(tree))

    def depth(t):
        return 0 if isinstance(t, int) else 1 + max(depth(a) for a in t[1:])
    assert all(depth(lra.listops_tree(random.Random(s), max_depth=3)[0]) <= 2 for s in range(200))


def test_listops_labels_spread_over_classes():
    task = lra.make_task("listops", lra.SCALES["smoke"])
    _, y = task.batch(400, np.random.default_rng(0))
    counts = np.bincount(y[:, -1].numpy(), minlength=10)
    assert (counts > 0).sum() >= 8 and counts.max() < 0.5 * 400


@pytest.mark.parametrize("side,paddles", [(12, 3), (16, 5), (32, 14)])
def test_pathfinder_markers_sit_on_the_contours_the_label_says(side, paddles):
    rng = np.random.default_rng(side)
    for label in (0, 1) * 5:
        img, ends, (pix_a, pix_b) = lra.pathfinder_image(rng, side, paddles, 2, label)
        assert img.shape == (side, side) and set(np.unique(img).tolist()) <= {0.0, float(np.float32(0.7)), 1.0}
        ends_pix = [int(np.rint(p[1])) * side + int(np.rint(p[0])) for p in np.clip(ends, 1, side - 2)]
        on_a = [e in set(pix_a.tolist()) for e in ends_pix]
        on_b = [e in set(pix_b.tolist()) for e in ends_pix]
        assert sum(on_a) == (2 if label else 1) and sum(on_b) == (0 if label else 1)
        # the two long contours never touch: every pixel of B is 2+ pixels (Chebyshev) from every pixel of A
        ya, xa, yb, xb = pix_a // side, pix_a % side, pix_b // side, pix_b % side
        gap = np.maximum(np.abs(ya[:, None] - yb[None]), np.abs(xa[:, None] - xb[None]))
        assert gap.min() >= 2
        for e in ends_pix:  # markers are drawn at full intensity
            assert img.reshape(-1)[e] == 1.0


def test_pathfinder_batches_are_balanced_and_reproducible():
    task = lra.make_task("pathfinder", lra.SCALES["smoke"])
    x1, y1 = task.batch(64, np.random.default_rng(3), "test")
    x2, y2 = task.batch(64, np.random.default_rng(3), "test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert 16 <= int(y1[:, -1].sum()) <= 48
    assert x1.shape == (64, 144) and int(x1.max()) <= 255


def test_digit_images_gray_and_rgb():
    images, labels = lra.load_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and sorted(set(labels.tolist())) == list(range(10))
    gray = lra.make_task("image", lra.SCALES["cpu"])
    rgb = lra.make_task("rgb_image", lra.SCALES["cpu"])
    assert not set(gray.split["train"]) & set(gray.split["test"])
    x, y = gray.batch(8, np.random.default_rng(0), "test")
    assert x.shape == (8, 256) and int(x.max()) <= 255
    xr, yr = rgb.batch(8, np.random.default_rng(0), "test")
    assert torch.equal(y, yr) and int(xr.max()) < 512
    # the colour ids decode to channels; the digit's strokes follow the grey image (same test digits)
    r, g, b = xr // 64, (xr // 8) % 8, xr % 8
    assert int(r.max()) <= 7 and int(g.max()) <= 7 and int(b.max()) <= 7
    # at the digits' own 8x8 (no resampling) full strokes are one colour and the background another
    x8, _ = lra.make_task("image", lra.SCALES["smoke"]).batch(8, np.random.default_rng(0), "test")
    xr8, _ = lra.make_task("rgb_image", lra.SCALES["smoke"]).batch(8, np.random.default_rng(0), "test")
    colours = set()
    for j in range(8):
        fg, bg = set(xr8[j][x8[j] == 255].tolist()), set(xr8[j][x8[j] == 0].tolist())
        assert len(fg) == 1 and len(bg) == 1 and fg != bg
        colours |= fg
    assert len(colours) > 4  # colours vary between images


def test_retrieval_pairs_come_from_the_documents_the_label_says():
    task = lra.make_task("retrieval", lra.SCALES["smoke"])
    L = task.L
    x, y = task.batch(40, np.random.default_rng(0), "test")
    docs = [bytes(d.tolist()) for d in task.docs["test"]]
    assert x.shape == (40, 2 * L + 1) and (x[:, L] == task.SEP).all()
    for row, label in zip(x.tolist(), y[:, -1].tolist()):
        a, b = bytes(row[:L]), bytes(row[L + 1:])
        with_a = {j for j, d in enumerate(docs) if a in d}
        with_b = {j for j, d in enumerate(docs) if b in d}
        assert with_a and with_b
        if label == 1:
            assert with_a & with_b
        else:
            assert with_a != with_b or len(with_a) > 1  # different documents (unless the text repeats)
    assert not {bytes(d.tolist()) for d in task.docs["train"]} & set(docs)  # test documents are unseen


def test_mean_ranks_with_ties():
    acc = {("a", "t1"): 0.9, ("b", "t1"): 0.5, ("c", "t1"): 0.5, ("a", "t2"): 0.1, ("b", "t2"): 0.3, ("c", "t2"): 0.2}
    ranks = lra.mean_ranks(acc, ["a", "b", "c"], ["t1", "t2"])
    assert ranks == {"a": (1 + 3) / 2, "b": (2.5 + 1) / 2, "c": (2.5 + 2) / 2}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lra_smoke_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "lra"
    args = ["experiment", "lra", "--scale", "smoke", "--out", str(out), "--threads", "1", "--log-every", "100"]
    assert main(args) == 0
    rows = _rows(out / "lra.csv")
    assert len(rows) == 15 and {r["task"] for r in rows} == set(lra.TASK_NAMES)
    assert {r["model"] for r in rows} == set(lra.DEFAULT_MODELS)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["steps_done"]) == 3 for r in rows)
    table = (out / "lra.md").read_text()
    assert "mean rank" in table and "RGB-Image" in table and (out / "lra.png").stat().st_size > 1000
    # a crashed cell (a line cut short) runs again; finished cells are kept
    text = (out / "lra.csv").read_text().splitlines()
    (out / "lra.csv").write_text("\n".join(text[:-1]) + "\n" + text[-1][: len(text[-1]) // 2])
    capsys.readouterr()
    assert main(args) == 0
    assert "14 already in" in capsys.readouterr().out
    assert len(read_results(out / "lra.csv")) == 15


def test_lra_speed_scaling_reject_bad_input(tmp_path, capsys):
    for args, msg in ((["lra", "--tasks", "textclass"], "unknown LRA task 'textclass'"),
                      (["lra", "--steps", "0"], "argument --steps: expected an integer >= 1"),
                      (["speed", "--models", "lstm"], "speed compares"),
                      (["scaling", "--widths", "0,8"], "--widths must be positive")):
        assert main(["experiment", *args, "--scale", "smoke", "--out", str(tmp_path / "x")]) != 0
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------
def test_speed_models_have_equal_size():
    zoo = speed.speed_models(speed.SCALES["cpu"])
    sizes = {n: m.num_params() for n, m in zoo.items()}
    ref = sizes["xlstm[1:0]"]
    assert all(abs(v - ref) / ref < 0.05 for v in sizes.values()), sizes


def test_speed_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "speed"
    args = ["experiment", "speed", "--scale", "smoke", "--out", str(out), "--threads", "1", "--device", "cpu"]
    assert main(args) == 0
    rows = _rows(out / "speed.csv")
    sc = speed.SCALES["smoke"]
    for m in speed.MODELS:
        step = sorted((int(r["length"]), float(r["state_mb"])) for r in rows
                      if r["model"] == m and r["measure"] == "length" and r["path"] == "step")
        assert [L for L, _ in step] == speed.checkpoints(sc.max_length)
        gen = [r for r in rows if r["model"] == m and r["path"] == "generate" and r["measure"] == "length"]
        assert sorted(int(r["length"]) for r in gen) == sorted(sc.generate_lengths)
        bat = [r for r in rows if r["model"] == m and r["measure"] == "batch"]
        assert sorted(int(r["batch"]) for r in bat) == list(sc.batch_sizes)
        assert all(float(r["tokens_per_s"]) > 0 for r in bat)
        if m.startswith("xlstm"):  # a fixed-size state
            assert len({s for _, s in step}) == 1
        else:  # the KV cache grows with the length
            assert step[-1][1] > step[0][1]
    text = (out / "speed.md").read_text()
    assert "CPU" in text and "tokens/s" in text and (out / "speed.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0  # nothing left to measure
    assert len(_rows(out / "speed.csv")) == len(rows)


# ---------------------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------------------
def test_power_law_fit_recovers_exponent():
    x = np.array([1e4, 3e4, 1e5, 3e5])
    a, b = scaling.fit_power_law(x, 7.0 * x ** -0.12)
    assert math.isclose(a, 7.0, rel_tol=1e-9) and math.isclose(b, -0.12, rel_tol=1e-9)


@pytest.mark.parametrize("name", ["transformer", "xlstm[1:0]", "xlstm[7:1]"])
def test_flop_formula_against_torch_flop_counter(name):
    """The dense count is exact for the Transformer (torch counts its matmuls; SDPA's FLOPs, when counted,
    are at most our attention term); the xLSTM count is within 20% of what torch counts."""
    model = build_model(name, 256, 64, 8).eval()
    for S in (1, 16):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.randint(0, 256, (1, S)))
        counted = fc.get_total_flops() / S
        fwd, dec = scaling.flops_per_token(model, S)
        dense = scaling.dense_flops_per_token(model)
        if name == "transformer":
            assert dense <= counted <= dense + scaling.mixing_flops_per_token(model, S) + 1
            assert dec - dense == 4 * 8 * 64 * S  # attention over S keys grows with the context
        else:
            assert 0.8 < counted / fwd < 1.25, (S, counted, fwd)
            assert dec == fwd  # a fixed-size state: the same cost at any context


def test_scaling_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "scaling"
    args = ["experiment", "scaling", "--scale", "smoke", "--out", str(out), "--threads", "1", "--log-every", "100"]
    assert main(args) == 0
    rows = _rows(out / "scaling.csv")
    assert len(rows) == 3 * 4
    for arch in scaling.ARCHS:
        rs = sorted((r for r in rows if r["arch"] == arch), key=lambda r: int(r["width"]))
        assert len(rs) == 4 and len({r["tokens"] for r in rs}) == 1  # the same budget at every size
        assert int(rs[-1]["params"]) > int(rs[0]["params"])
        assert all(math.isfinite(float(r["val_loss"])) and float(r["decode_ms_per_token"]) > 0 for r in rs)
    text = (out / "scaling.md").read_text()
    assert text.count("| xlstm[7:1] |") == 5 and "exponent vs inference FLOPs per token" in text
    assert (out / "scaling.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args) == 0
    assert "12 already in" in capsys.readouterr().out


def test_lra_and_scaling_record_a_diverged_cell_and_go_on(tmp_path):
    """A cell (LRA) or run (scaling) whose training loss becomes nan/inf (a learning rate of 1e10) is a row with
    status "diverged"; the next one runs, the reports say "diverged" (LRA: last on its task; scaling: out of the
    fits), and a rerun does not repeat it. A CSV written before the status column is upgraded when resumed."""
    from dataclasses import replace

    smoke = lra.SCALES["smoke"]
    specs = (lra.lra_specs(["listops"], ["transformer"], [0], smoke, lr=1e10)
             + lra.lra_specs(["listops"], ["lstm"], [0], smoke))
    out = tmp_path / "lra"
    rows = lra.run_lra(specs, out, log=lambda _: None)
    assert [(r["model"], r["status"]) for r in rows] == [("transformer", "diverged"), ("lstm", "ok")]
    saved = read_results(out / "lra.csv")
    assert saved[0]["accuracy"] == "nan" and 0 <= float(saved[1]["accuracy"]) <= 1
    table = (out / "lra.md").read_text()
    assert "| lstm | " in table and "| 1.00 |" in table and "| transformer | diverged |  | 2.00 |" in table
    assert lra.run_lra(specs, out, log=lambda _: None) == []
    # an older lra.csv (no status column) reads as "ok" and is upgraded on resume, nothing rerun
    old = [c for c in lra.CSV_FIELDS if c != "status"]
    with (out / "lra.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({k: saved[1][k] for k in old})
    assert [r["model"] for r in read_results(out / "lra.csv")] == ["lstm"]
    assert lra.run_lra(specs[1:], out, log=lambda _: None) == []
    assert (out / "lra.csv.bak").is_file() and _rows(out / "lra.csv")[0]["status"] == "ok"

    one = replace(scaling.SCALES["smoke"], widths=(16,))
    specs = (scaling.scaling_specs(["transformer"], one, lr=1e10, steps=4)
             + scaling.scaling_specs(["xlstm[1:0]"], replace(one, widths=(16, 24)), steps=4))
    out = tmp_path / "scaling"
    rows = scaling.run_scaling(specs, out, log=lambda _: None, max_bytes=500_000)
    assert [r["status"] for r in rows] == ["diverged", "ok", "ok"]
    assert rows[0]["val_loss"] == "nan" and int(rows[0]["params"]) > 0
    text = (out / "scaling.md").read_text()
    assert "| diverged | diverged |" in text and "| xlstm[1:0] | " in text and "| transformer | " not in text.split(
        "Fitted")[1]  # the transformer's only run diverged: no fit
    assert scaling.run_scaling(specs, out, log=lambda _: None, max_bytes=500_000) == []
