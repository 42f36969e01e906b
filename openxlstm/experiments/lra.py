"""Long Range Arena (Tay et al. 2021) with data that needs no download: the five tasks of the xLSTM paper.

Every task is a sequence classification answered at the last token (a causal model reads the whole input,
then its head, cut to the task's classes, gives the label):

    tokens  = PAD .. PAD  x_1 .. x_n            (B, S)   left-padded to the batch's longest input
    targets = IGNORE * (S - 1)  y               (B, S)

  listops     the published generator (Nangia & Bowman 2018 as LRA configures it: operators MIN, MAX, MED,
              SUM_MOD, values 0-9, depth <= 10, <= 10 arguments, an operator with probability 0.25, lengths
              drawn by rejection inside the scale's range); parentheses dropped as LRA's loaders do;
              10 classes.
  pathfinder  generated after Linsley et al. 2018: dashed curved contours (paddles with gaps, a bounded turn
              between paddles), two long ones in every image plus shorter distractors, two markers at the
              ends of one contour (label 1) or at one end of each long contour (label 0); pixels as 256
              grey levels, row by row; 2 classes.
  image       (LRA's "Image", the paper's G-Image) scikit-learn's bundled digits (1,797 handwritten 8x8
              digits, 17 grey levels; UCI, CC BY 4.0), resized to the scale's side, 256 grey levels; 10 classes.
  rgb_image   the same digits drawn in a random foreground colour on a random background colour (at least
              0.4 apart per image), one token per pixel: its three channels at 8 levels each (512 ids).
  retrieval   byte-level document matching on the built-in corpus (pydoc topics and stdlib sources,
              ``openxlstm/data/corpus.py``): two byte windows joined by a separator; label 1 when both come
              from the same document, 0 when from two documents (LRA: two papers of the ACL Anthology Network
              linked by a citation); documents are split between training and test; 2 classes.

``SCALES`` holds the sizes: ``smoke`` (seconds, CI), ``cpu`` (the default, about an hour on 2 cores, shorter
sequences), ``paper`` (LRA's lengths: ListOps 500-2000, 32x32 images, 2 x 4000 bytes; for a GPU).
``run_lra`` trains every (task, model, seed) cell through the training engine, appends each to
``lra.csv`` at once (a rerun skips finished cells), and writes ``lra.md`` (accuracies, mean, mean rank)
and ``lra.png``.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..errors import UserError
from ..train.engine import Engine
from .formal import IGNORE
from .zoo import build_model, canonical_name
from .results import DIVERGED, OK, STATUS, append_row, is_diverged, markdown, pending, pyplot, read_results
from .runner import RunOptions, classifier_head, fit_or_diverge, lr_schedule

TASK_NAMES = ("retrieval", "listops", "pathfinder", "image", "rgb_image")
TASK_LABELS = {"retrieval": "Retrieval", "listops": "ListOps", "pathfinder": "Pathfinder", "image": "G-Image",
               "rgb_image": "RGB-Image"}
DEFAULT_MODELS = ("xlstm[1:1]", "transformer", "lstm")


# ---------------------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRAScale:
    """Data sizes, model size and training budget of one scale (the same for every model)."""

    name: str
    listops_lengths: tuple[int, int]  # min, max tokens (exclusive, as the published generator)
    listops_depth: int
    pathfinder_side: int  # image side in pixels
    pathfinder_paddles: int  # paddles per long contour
    pathfinder_distractors: int  # short contours per image
    pathfinder_pool: int  # training images, generated once (LRA's Pathfinder is a fixed set too)
    image_side: int  # digits resized to side x side
    retrieval_bytes: int  # bytes per document window (the input is 2 windows + a separator)
    width: int
    num_blocks: int
    steps: int
    batch_size: int
    lr: float
    test_examples: int


SCALES = {
    "smoke": LRAScale("smoke", (6, 24), 4, 12, 3, 1, 32, 8, 16, width=16, num_blocks=2, steps=3, batch_size=8,
                      lr=3e-3, test_examples=16),
    "cpu": LRAScale("cpu", (32, 160), 10, 16, 5, 2, 4096, 16, 96, width=64, num_blocks=2, steps=400, batch_size=32,
                    lr=3e-3, test_examples=512),
    "paper": LRAScale("paper", (500, 2000), 10, 32, 14, 4, 20000, 32, 4000, width=128, num_blocks=4, steps=5000,
                      batch_size=32, lr=1e-3, test_examples=2000),
}


# ---------------------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------------------
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_VOCAB = tuple(str(v) for v in range(10)) + LISTOPS_OPERATORS + ("]",)  # ids 0..14; PAD = 15
LISTOPS_VALUE_P = 0.25  # the published generator: a node is an operator when random() <= VALUE_P


def listops_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10, depth: int = 1):
    """A random ListOps expression as the published generator draws it -> (tree, length in tokens).

    A tree is an int (a value) or a list [operator, arg_1, .., arg_k] (k in 2..max_args); its tokens are the
    operator, the arguments' tokens and "]"."""
    if depth >= max_depth or rng.random() > LISTOPS_VALUE_P:
        return rng.randrange(10), 1
    op = rng.choice(LISTOPS_OPERATORS)
    args, length = [], 2
    for _ in range(rng.randint(2, max_args)):
        sub, n = listops_tree(rng, max_depth, max_args, depth + 1)
        args.append(sub)
        length += n
    return [op, *args], length


def listops_value(tree) -> int:
    """The value of a ListOps tree: MIN, MAX, MED (int of the median, as numpy's) and SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, values = tree[0], [listops_value(a) for a in tree[1:]]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def listops_tokens(tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    return [tree[0]] + [t for a in tree[1:] for t in listops_tokens(a)] + ["]"]


def sample_listops(rng: random.Random, lengths: tuple[int, int], max_depth: int = 10):
    """A tree whose length lies strictly between ``lengths`` (rejection sampling, as published)."""
    lo, hi = lengths
    while True:
        tree, n = listops_tree(rng, max_depth)
        if lo < n < hi:
            return tree


# ---------------------------------------------------------------------------------------------------------
# Pathfinder
# ---------------------------------------------------------------------------------------------------------
def _pixels(points: np.ndarray, side: int) -> np.ndarray:
    """Unique flat pixel indices under the points (k, 2) (x = column, y = row)."""
    ij = np.clip(np.rint(points).astype(np.int64), 0, side - 1)
    return np.unique(ij[:, 1] * side + ij[:, 0])


def _dilate(mask: np.ndarray) -> np.ndarray:
    """A boolean (side, side) mask grown by one pixel in the 8 directions."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _contour(rng: np.random.Generator, side: int, paddles: int, paddle_len: float, gap: float, max_turn: float,
             forbidden: Optional[np.ndarray] = None, margin: float = 1.5) -> Optional[list[np.ndarray]]:
    """A dashed contour: ``paddles`` segments (each an array of points (k, 2) along it) of length
    ``paddle_len`` separated by ``gap``, the direction turning by at most ``max_turn`` radians between
    paddles. A paddle that would leave the canvas or touch ``forbidden`` (a flat boolean mask) draws its
    turn again, up to 20 times; None when stuck."""
    t = np.linspace(0.0, paddle_len, max(2, int(paddle_len * 4) + 1))[:, None]
    lo, hi = margin, side - 1 - margin
    pos, angle = rng.uniform(lo, hi, size=2), rng.uniform(0, 2 * math.pi)
    segments = []
    for j in range(paddles):
        for _ in range(20):
            a = rng.uniform(0, 2 * math.pi) if j == 0 else angle + rng.uniform(-max_turn, max_turn)
            d = np.array([math.cos(a), math.sin(a)])
            seg = pos + t * d  # (k, 2)
            if seg.min() >= lo and seg.max() <= hi and (forbidden is None or not forbidden[_pixels(seg, side)].any()):
                break
        else:
            return None
        segments.append(seg)
        pos, angle = pos + (paddle_len + gap) * d, a
    return segments


def pathfinder_image(rng: np.random.Generator, side: int, paddles: int, distractors: int, label: int):
    """One Pathfinder image -> (image (side, side) float32 in [0, 1], marker positions (2, 2), the pixels of
    the long contours A and B (two arrays of flat indices)).

    Two long contours A and B that do not touch (B keeps one pixel away from A); ``distractors`` contours
    of half the paddles, drawn anywhere; markers (3x3 squares of full intensity; contours are drawn at
    0.7) at both ends of A (label 1) or at one end of A and one of B (label 0)."""
    paddle_len, gap, max_turn = 1.5, 1.0, math.pi / 3
    for _ in range(1000):
        a = _contour(rng, side, paddles, paddle_len, gap, max_turn)
        if a is None:
            continue
        pix_a = _pixels(np.concatenate(a), side)
        mask_a = np.zeros((side, side), dtype=bool)
        mask_a.reshape(-1)[pix_a] = True
        b = _contour(rng, side, paddles, paddle_len, gap, max_turn, forbidden=_dilate(mask_a).reshape(-1))
        if b is None:
            continue
        image = np.zeros(side * side, dtype=np.float32)
        for c in [a, b] + [_contour(rng, side, max(1, paddles // 2), paddle_len, gap, max_turn)
                           for _ in range(distractors)]:
            if c is not None:
                image[_pixels(np.concatenate(c), side)] = 0.7
        ends = (a[0][0], a[-1][-1]) if label == 1 else (a[0][0] if rng.random() < 0.5 else a[-1][-1],
                                                         b[0][0] if rng.random() < 0.5 else b[-1][-1])
        img = image.reshape(side, side)
        for p in ends:
            x, y = np.clip(np.rint(p).astype(int), 1, side - 2)
            img[y - 1:y + 2, x - 1:x + 2] = 1.0
        return img, np.array(ends), (pix_a, _pixels(np.concatenate(b), side))
    raise RuntimeError(f"could not place the contours of a {side}x{side} Pathfinder image; use fewer paddles")


# ---------------------------------------------------------------------------------------------------------
# images: scikit-learn's digits
# ---------------------------------------------------------------------------------------------------------
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 in 0..16, labels (1797,)) read from scikit-learn's bundled
    ``datasets/data/digits.csv.gz`` without importing scikit-learn (and SciPy)."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path is None or not path.exists():
        raise UserError("the image tasks read scikit-learn's bundled digits: pip install 'openxlstm[experiments]' "
                        "(or scikit-learn)")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (1797, 65): 64 pixels, label
    return data[:, :64].reshape(-1, 8, 8).astype(np.uint8), data[:, 64]


def _resize(images: np.ndarray, side: int) -> np.ndarray:
    """(N, 8, 8) in 0..16 -> (N, side, side) float32 in [0, 1] (bilinear)."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    if side != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(0, 1).numpy()


def colorize(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) in [0, 1] -> (N, H, W) ids in 0..511: a random foreground and background colour per image
    (channels at least 0.4 apart on average), each channel quantized to 8 levels, id = 64 r + 8 g + b."""
    n = len(images)
    fg, bg = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    for _ in range(100):
        close = np.abs(fg - bg).mean(1) < 0.4
        if not close.any():
            break
        fg[close], bg[close] = rng.uniform(0, 1, (int(close.sum()), 3)), rng.uniform(0, 1, (int(close.sum()), 3))
    rgb = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * images[..., None]  # (N, H, W, 3)
    q = np.clip(np.rint(rgb * 7), 0, 7).astype(np.int64)
    return q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]


# ---------------------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------------------
class LRATask:
    """One LRA task at one scale: ``batch(n, rng, split)`` -> (tokens, targets), each (n, S) int64.

    ``rng`` is a numpy Generator (train: the cell's; test: a fixed one, so that every model and seed is
    tested on the same examples). ``pad`` is the id that left-pads shorter inputs."""

    name: str
    vocab_size: int
    num_classes: int
    pad: int

    def examples(self, n: int, rng: np.random.Generator, split: str) -> tuple[list[list[int]], list[int]]:
        raise NotImplementedError

    def batch(self, n: int, rng: np.random.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        seqs, labels = self.examples(n, rng, split)
        S = max(len(s) for s in seqs)
        tokens = torch.full((n, S), self.pad, dtype=torch.long)
        for j, s in enumerate(seqs):
            tokens[j, S - len(s):] = torch.tensor(s, dtype=torch.long)
        targets = torch.full((n, S), IGNORE, dtype=torch.long)
        targets[:, -1] = torch.tensor(labels, dtype=torch.long)
        return tokens, targets

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


class ListOps(LRATask):
    name, vocab_size, num_classes, pad = "listops", len(LISTOPS_VOCAB) + 1, 10, len(LISTOPS_VOCAB)

    def __init__(self, scale: LRAScale):
        self.lengths, self.depth = scale.listops_lengths, scale.listops_depth
        self.ids = {t: j for j, t in enumerate(LISTOPS_VOCAB)}

    def examples(self, n, rng, split):
        r = random.Random(int(rng.integers(2**62)))
        trees = [sample_listops(r, self.lengths, self.depth) for _ in range(n)]
        return [[self.ids[t] for t in listops_tokens(tr)] for tr in trees], [listops_value(tr) for tr in trees]


class Pathfinder(LRATask):
    """Training batches are drawn from a pool of ``pathfinder_pool`` images made once (seed 1); test images
    are made from the test generator."""

    name, vocab_size, num_classes, pad = "pathfinder", 257, 2, 256

    def __init__(self, scale: LRAScale):
        self.side, self.paddles, self.distractors = scale.pathfinder_side, scale.pathfinder_paddles, \
            scale.pathfinder_distractors
        self.pool_size, self.pool = scale.pathfinder_pool, None

    def _make(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        images = np.stack([pathfinder_image(rng, self.side, self.paddles, self.distractors, int(y))[0].reshape(-1)
                           for y in labels])  # (n, side * side)
        return np.rint(images * 255).astype(np.int64), labels

    def examples(self, n, rng, split):
        if split == "test":
            x, y = self._make(n, rng)
        else:
            if self.pool is None:
                self.pool = self._make(self.pool_size, np.random.default_rng(1))
            idx = rng.integers(0, self.pool_size, n)
            x, y = self.pool[0][idx], self.pool[1][idx]
        return x.tolist(), y.tolist()


class DigitImages(LRATask):
    """G-Image (``rgb=False``) or RGB-Image: 80% of the digits train, a fixed 20% test (split with seed 0)."""

    num_classes = 10

    def __init__(self, scale: LRAScale, rgb: bool):
        images, labels = load_digits()
        order = np.random.default_rng(0).permutation(len(labels))
        cut = int(0.8 * len(labels))
        self.split = {"train": order[:cut], "test": order[cut:]}
        self.images, self.labels, self.rgb = _resize(images, scale.image_side), labels, rgb
        self.name = "rgb_image" if rgb else "image"
        self.vocab_size, self.pad = (513, 512) if rgb else (257, 256)

    def examples(self, n, rng, split):
        pick = self.split[split]
        idx = pick[rng.integers(0, len(pick), n)] if split == "train" else pick[np.arange(n) % len(pick)]
        x = self.images[idx]
        ids = colorize(x, rng) if self.rgb else np.rint(x * 255).astype(np.int64)
        return [row.reshape(-1).tolist() for row in ids], self.labels[idx].tolist()


class Retrieval(LRATask):
    """Two windows of ``retrieval_bytes`` bytes, SEP (256) between; distinct documents long enough for two
    disjoint windows, every fifth (in name order) kept for the test."""

    name, vocab_size, num_classes, pad = "retrieval", 258, 2, 257
    SEP = 256

    def __init__(self, scale: LRAScale):
        from ..data import default_corpus

        self.L = scale.retrieval_bytes
        texts = dict.fromkeys(d.text.encode("utf-8") for d in default_corpus())  # distinct texts (pydoc repeats some)
        docs = [np.frombuffer(t, dtype=np.uint8) for t in texts if len(t) >= 2 * self.L]
        if len(docs) < 10:
            raise UserError(f"the default corpus has {len(docs)} documents of >= {2 * self.L} bytes; need 10")
        self.docs = {"train": [d for j, d in enumerate(docs) if j % 5], "test": docs[::5]}

    def examples(self, n, rng, split):
        docs, L = self.docs[split], self.L
        seqs, labels = [], [int(v) for v in rng.integers(0, 2, n)]
        for y in labels:
            i = int(rng.integers(len(docs)))
            a = docs[i]
            if y:  # two disjoint windows of the same document, in either order
                s = int(rng.integers(0, len(a) - 2 * L + 1))
                b, t = a, int(rng.integers(s + L, len(a) - L + 1))
                if rng.random() < 0.5:
                    s, t = t, s
            else:
                j = int(rng.integers(len(docs) - 1))
                b = docs[j + (j >= i)]
                s, t = int(rng.integers(0, len(a) - L + 1)), int(rng.integers(0, len(b) - L + 1))
            seqs.append(a[s:s + L].tolist() + [self.SEP] + b[t:t + L].tolist())
        return seqs, labels


def make_task(name: str, scale: LRAScale) -> LRATask:
    if name == "listops":
        return ListOps(scale)
    if name == "pathfinder":
        return Pathfinder(scale)
    if name in ("image", "rgb_image"):
        return DigitImages(scale, rgb=name == "rgb_image")
    if name == "retrieval":
        return Retrieval(scale)
    raise ValueError(f"unknown LRA task {name!r}; choose from {', '.join(TASK_NAMES)}")


# ---------------------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRASpec:
    """What determines one cell's result (the CSV key)."""

    task: str
    model: str
    seed: int
    scale: str
    width: int
    num_blocks: int
    steps: int
    batch_size: int
    lr: float
    test_examples: int


KEY_FIELDS = [f.name for f in fields(LRASpec)]
CSV_FIELDS = KEY_FIELDS + ["seq_len", "params", "steps_done", "final_loss", "accuracy", "chance", "seconds",
                           "finished_at", STATUS]
TEST_SEED = 20_240_507  # the test examples of every cell


def lra_specs(tasks, models, seeds, scale: LRAScale, **overrides) -> list[LRASpec]:
    """The cells, task-major; ``overrides`` replace the scale's width, num_blocks, steps, batch_size, lr,
    test_examples."""
    for t in tasks:
        if t not in TASK_NAMES:
            raise ValueError(f"unknown LRA task {t!r}; choose from {', '.join(TASK_NAMES)}")
    s = replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    return [LRASpec(t, canonical_name(m), seed, s.name, s.width, s.num_blocks, s.steps, s.batch_size, s.lr,
                    s.test_examples) for t in tasks for m in models for seed in seeds]


def run_lra_cell(spec: LRASpec, task: LRATask, max_seconds: Optional[float] = None,
                 log: Callable[[str], None] = print, log_every: int = 50, options: RunOptions = RunOptions()) -> dict:
    """Train one model on one task (AdamW (0.9, 0.98), weight decay 0.1, 5% warm-up then cosine to 10%,
    clipping 1.0) and return its CSV row with the test accuracy (``status`` "diverged", accuracy nan, when the
    training loss or a weight became nan or inf)."""
    rng = np.random.default_rng(spec.seed)
    test_rng = np.random.default_rng(TEST_SEED)
    test_bs = min(spec.test_examples, 2 * spec.batch_size)
    test = [task.batch(min(test_bs, spec.test_examples - j), test_rng, "test")
            for j in range(0, spec.test_examples, test_bs)]
    seq_len = max(x.shape[1] for x, _ in test)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, task.vocab_size, spec.width, spec.num_blocks, context_length=seq_len)
    classifier_head(model, task.num_classes)
    engine = Engine(model, lr_schedule(spec.lr, spec.steps, "cosine"),
                    options.engine_config(weight_decay=0.1, betas=(0.9, 0.98), grad_clip=1.0))
    start = time.time()
    run = fit_or_diverge(engine, lambda step: task.batch(spec.batch_size, rng, "train"), spec.steps,
                         max_seconds=max_seconds, log_every=log_every, log=lambda msg: log(f"    {msg}"))
    row = asdict(spec)
    if run is None:
        row.update(seq_len=seq_len, params=model.num_params(), steps_done=engine.step, accuracy="nan",
                   chance=round(task.chance, 4), seconds=round(time.time() - start, 1),
                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=DIVERGED)
        return row
    tail = run.losses[-max(1, len(run.losses) // 10):]
    acc = engine.evaluate(test, accuracy=True).accuracy
    log(f"    test accuracy {acc:.4f} (chance {task.chance:.2f}), {time.time() - start:.0f}s")
    row.update(seq_len=seq_len, params=model.num_params(), steps_done=run.step,
               final_loss=round(sum(tail) / len(tail), 4) if tail else "", accuracy=round(acc, 4),
               chance=round(task.chance, 4), seconds=round(time.time() - start, 1),
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status=OK)
    return row


def run_lra(specs: list[LRASpec], out_dir: Union[str, Path], max_seconds: Optional[float] = None,
            log: Callable[[str], None] = print, log_every: int = 50, options: RunOptions = RunOptions()) -> list[dict]:
    """Run the cells not yet in ``out_dir/lra.csv`` (each appended when it finishes, a diverged one too), then
    write the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "lra.csv"
    todo = pending(specs, csv_path, CSV_FIELDS, KEY_FIELDS)
    log(f"LRA: {len(specs)} cells, {len(specs) - len(todo)} already in {csv_path}, {len(todo)} to run")
    tasks: dict = {}
    rows, start = [], time.time()
    for j, spec in enumerate(todo):
        eta = "" if j == 0 else f", ~{(time.time() - start) / j * (len(todo) - j) / 60:.0f} min left"
        log(f"[{j + 1}/{len(todo)}] {TASK_LABELS[spec.task]} {spec.model} seed {spec.seed}{eta}")
        if spec.task not in tasks:
            tasks[spec.task] = make_task(spec.task, SCALES[spec.scale])
        row = run_lra_cell(spec, tasks[spec.task], max_seconds, log, log_every, options)
        append_row(csv_path, row, CSV_FIELDS)
        rows.append(row)
        write_lra_report(out_dir, log=lambda _: None, plot=False)  # the PNG at the end
    write_lra_report(out_dir, log=log)
    return rows


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def mean_ranks(acc: dict, models: list[str], tasks: list[str]) -> dict:
    """{model: mean over tasks of its rank (1 = best accuracy; ties share the mean of their ranks)};
    only tasks that every model has are ranked."""
    ranks = {m: [] for m in models}
    for t in tasks:
        if any((m, t) not in acc for m in models):
            continue
        for m in models:
            better = sum(acc[(o, t)] > acc[(m, t)] for o in models)
            ties = sum(acc[(o, t)] == acc[(m, t)] for o in models)
            ranks[m].append(better + (ties + 1) / 2)
    return {m: (sum(r) / len(r) if r else float("nan")) for m, r in ranks.items()}


def summarize(rows: list[dict]) -> tuple[list[str], list[str], dict, dict, dict]:
    """-> (models, tasks, {(model, task): mean accuracy over the seeds that did not diverge}, {(model, task): those
    seeds}, {(model, task): diverged seeds}); a cell whose every seed diverged has no accuracy."""
    models, tasks, cells, diverged = [], [], {}, {}
    for r in rows:
        m = r["model"] if len({x["scale"] for x in rows}) == 1 else f"{r['model']} ({r['scale']})"
        models += [m] if m not in models else []
        tasks += [r["task"]] if r["task"] not in tasks else []
        if is_diverged(r):
            diverged[(m, r["task"])] = diverged.get((m, r["task"]), 0) + 1
        else:
            cells.setdefault((m, r["task"]), []).append(float(r["accuracy"]))
    tasks.sort(key=TASK_NAMES.index)
    return (models, tasks, {k: sum(v) / len(v) for k, v in cells.items()}, {k: len(v) for k, v in cells.items()},
            diverged)


def lra_table(rows: list[dict]) -> str:
    """Models (best mean rank first) x tasks: test accuracy (mean over seeds), their mean, the mean rank.
    Diverged seeds are left out and counted; a cell whose every seed diverged says "diverged", ranks last on its
    task and is left out of the model's mean accuracy."""
    models, tasks, acc, n, diverged = summarize(rows)
    ranks = mean_ranks({**{k: -math.inf for k in diverged if k not in acc}, **acc}, models, tasks)
    models.sort(key=lambda m: (math.isnan(ranks[m]), ranks[m]))

    def cell(m, t) -> str:
        d = diverged.get((m, t), 0)
        if (m, t) not in acc:
            return "" if not d else DIVERGED if d == 1 else f"{DIVERGED} (n={d})"
        notes = ([f"n={n[(m, t)]}"] if n[(m, t)] > 1 else []) + ([f"{d} {DIVERGED}"] if d else [])
        return f"{acc[(m, t)]:.3f}" + (f" ({', '.join(notes)})" if notes else "")

    body = []
    for m in models:
        cells = [cell(m, t) for t in tasks]
        have = [acc[(m, t)] for t in tasks if (m, t) in acc]
        body.append([m, *cells, f"{sum(have) / len(have):.3f}" if have else "", f"{ranks[m]:.2f}"])
    return markdown(["model", *[TASK_LABELS[t] for t in tasks], "mean acc.", "mean rank"], body)


def lra_plot(rows: list[dict], path: Union[str, Path]) -> None:
    """Grouped bars: test accuracy per task and model, chance as a dashed line per task."""
    plt = pyplot()
    models, tasks, acc, _, diverged = summarize(rows)
    chance = {r["task"]: float(r["chance"]) for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.6))
    w = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * w for j in range(len(tasks))]
        ax.bar(xs, [acc.get((m, t), 0.0) for t in tasks], width=w, label=m)
        for x, t in zip(xs, tasks):
            if (m, t) in diverged and (m, t) not in acc:  # every seed diverged: no bar
                ax.text(x, 0.01, DIVERGED, rotation=90, ha="center", va="bottom", fontsize=6)
    for j, t in enumerate(tasks):
        ax.hlines(chance[t], j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), [TASK_LABELS[t] for t in tasks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    scale = sorted({r["scale"] for r in rows})
    ax.set_title(f"Long Range Arena ({', '.join(scale)} scale; dashed: chance)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(models), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_lra_report(out_dir: Union[str, Path], log: Callable[[str], None] = print, plot: bool = True) -> Optional[str]:
    """``lra.md`` and ``lra.png`` from ``out_dir/lra.csv``; returns the table (None when empty)."""
    out_dir = Path(out_dir)
    rows = read_results(out_dir / "lra.csv")
    if not rows:
        log(f"no results in {out_dir / 'lra.csv'}")
        return None
    table = lra_table(rows)
    settings = sorted({f"scale {r['scale']}: width {r['width']}, {r['num_blocks']} blocks, {r['steps']} steps x "
                       f"{r['batch_size']}, lr {r['lr']}, {r['test_examples']} test examples" for r in rows})
    lengths = sorted({f"{TASK_LABELS[r['task']]} {r['seq_len']}" for r in rows}, key=str)
    (out_dir / "lra.md").write_text("# Long Range Arena (test accuracy)\n\n" + table + "\n\nSettings: "
                                    + "; ".join(settings) + ".\nLongest test input (tokens): " + ", ".join(lengths)
                                    + ".\n" + ("\"diverged\": the training loss became nan or inf; such a cell ranks "
                                               "last on its task and is left out of the mean accuracy.\n"
                                               if any(is_diverged(r) for r in rows) else ""))
    if plot:
        lra_plot(rows, out_dir / "lra.png")
    log(table)
    log(f"wrote {out_dir / 'lra.md'} and {out_dir / 'lra.png'}")
    return table


__all__ = ["SCALES", "LRAScale", "TASK_NAMES", "DEFAULT_MODELS", "LRASpec", "make_task", "lra_specs", "run_lra", "run_lra_cell",
           "write_lra_report", "lra_table", "mean_ranks", "listops_tree", "listops_value", "listops_tokens",
           "sample_listops", "pathfinder_image", "load_digits", "colorize"]
