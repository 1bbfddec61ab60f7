"""The built-in demo: prune a small CNN on scikit-learn's digits at initialization, train
it briefly with the masks fixed, and compare with the dense network.

Everything runs offline on the CPU in well under two minutes: the 1797 8x8 digit images
ship with scikit-learn. The pruning follows the paper's protocol on a small scale:
score on a class-balanced subset of the training set (10 images per class), prune
globally with the exponential schedule, then train the surviving weights.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pxkern.pruning import CRITERIA, prune
from pxkern.pruning.masks import density_report

# The official code runs these criteria in one shot; iterating them changes the method.
ONE_SHOT_METHODS = frozenset({"magnitude", "random", "snip", "grasp"})
SCORING_IMAGES_PER_CLASS = 10
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    """Standardized digits: images ``N x 1 x 8 x 8`` float32, labels ``N`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class LayerDensity:
    name: str
    kept: int
    total: int
    density: float


@dataclass(frozen=True)
class DemoResult:
    """What one pruned run measured (accuracies in [0, 1], times in seconds)."""

    method: str
    target_density: float
    rounds: int
    block: tuple[int, int] | None  # None: unstructured
    density: float  # measured: kept / total prunable weights
    accuracy: float
    layers: list[LayerDensity]
    prune_seconds: float
    train_seconds: float
    classifier_kept: bool = True  # px only: False if streams B and C transformed it too

    @property
    def label(self) -> str:
        label = self.method if self.block is None else f"{self.method} {self.block[0]}x{self.block[1]} blocks"
        return label if self.classifier_kept else f"{label}, classifier transformed"


def load_digits(seed: int = 0) -> Digits:
    """The digits, split stratified 80/20 with ``seed`` and standardized with the training
    set's mean and standard deviation (one scalar each: the pixels share one scale)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.images, bunch.target, test_size=TEST_FRACTION, random_state=seed, stratify=bunch.target
    )
    mean, std = x_train.mean(), x_train.std()

    def images(x) -> torch.Tensor:
        return torch.as_tensor((x - mean) / std, dtype=torch.float32).unsqueeze(1)

    def labels(y) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.int64)

    return Digits(images(x_train), labels(y_train), images(x_test), labels(y_test))


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small BN CNN for 1 x 8 x 8 inputs; 56,224 prunable weights."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )


def class_balanced_subset(
    x: torch.Tensor, y: torch.Tensor, per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random samples of every class present in ``y`` (as the paper scores)."""
    chosen = []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        if members.numel() < per_class:
            raise ValueError(f"class {int(label)} has {members.numel()} samples, fewer than {per_class}")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    index = torch.cat(chosen)
    return x[index], y[index]


def train(model: nn.Module, digits: Digits, epochs: int, seed: int, batch_size: int = 64, lr: float = 3e-3) -> None:
    """Adam on the training split; pruned weights stay zero because the
    ``torch.nn.utils.prune`` hook multiplies ``weight_orig`` by the fixed mask."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(digits.y_train.numel(), generator=generator)
        for batch in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(digits.x_train[batch]), digits.y_train[batch]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def rounds_for(method: str, rounds: int) -> int:
    """The official protocol: one shot for :data:`ONE_SHOT_METHODS`, ``rounds`` otherwise."""
    return 1 if method in ONE_SHOT_METHODS else rounds


class Demo:
    """One data split, one initialization and one scoring subset shared by every run, so
    that methods differ only in their masks."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.digits = load_digits(seed)
        torch.manual_seed(seed)
        self.initial = digits_cnn()
        self.scoring_batch = class_balanced_subset(
            self.digits.x_train, self.digits.y_train, SCORING_IMAGES_PER_CLASS,
            torch.Generator().manual_seed(seed),
        )

    def dense_accuracy(self, epochs: int) -> float:
        model = copy.deepcopy(self.initial)
        train(model, self.digits, epochs, self.seed)
        return accuracy(model, self.digits.x_test, self.digits.y_test)

    def run(
        self, method: str, density: float, rounds: int, epochs: int, progress: bool = False,
        block: tuple[int, int] | None = None, keep_classifier: bool = True,
    ) -> DemoResult:
        """Prune a copy of the initial model with ``method`` to ``density`` (``rounds``
        rounds, whole ``block``s if given), train it ``epochs`` epochs and measure it.
        ``keep_classifier=False`` (px only) scores with ``keep=()``: streams B and C
        transform the classifier like every other layer, as an earlier version of the
        authors' code does (docs/px-spec-vs-official-code.md)."""
        if not keep_classifier and method != "px":
            raise ValueError(f"keep_classifier=False is an option of method 'px', not of {method!r}")
        model = copy.deepcopy(self.initial)
        options = {} if keep_classifier else {"keep": ()}
        start = time.perf_counter()
        prune(  # validates method, density and rounds
            model, [self.scoring_batch], density=density, rounds=rounds, method=method,
            generator=torch.Generator().manual_seed(self.seed), progress=progress, block=block,
            **options,
        )
        pruned = time.perf_counter()
        train(model, self.digits, epochs, self.seed)
        trained = time.perf_counter()
        layers = [LayerDensity(*row) for row in density_report(model)]
        return DemoResult(
            method=method,
            target_density=density,
            rounds=rounds,
            block=block,
            density=sum(layer.kept for layer in layers) / sum(layer.total for layer in layers),
            accuracy=accuracy(model, self.digits.x_test, self.digits.y_test),
            layers=layers,
            prune_seconds=pruned - start,
            train_seconds=trained - pruned,
            classifier_kept=keep_classifier,
        )


def plot_layer_densities(results: list[DemoResult], path: Path) -> Path:
    """Grouped bars: density of every prunable layer, one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer.name for layer in results[0].layers]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names)), 4))
    for i, result in enumerate(results):
        positions = [j + (i - (len(results) - 1) / 2) * width for j in range(len(names))]
        densities = [layer.density for layer in result.layers]
        bars = ax.bar(positions, densities, width, label=result.label)
        # A fully pruned layer (layer collapse) has no bar: mark it.
        ax.bar_label(bars, labels=["0" if d == 0 else "" for d in densities], fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("density (kept / total)")
    ax.set_title(f"Density per layer at {results[0].target_density:g} overall")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracies(results: list[DemoResult], dense_accuracy: float, path: Path) -> Path:
    """Test accuracy per method, with the dense network as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([r.label for r in results], [r.accuracy for r in results])
    ax.axhline(dense_accuracy, color="black", linestyle="--", label=f"dense {dense_accuracy:.3f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Digits CNN pruned at initialization to density {results[0].target_density:g}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_json(results: list[DemoResult], dense_accuracy: float, epochs: int, seed: int, path: Path) -> Path:
    """The measurements with the configuration and versions they were taken with."""
    rows = {
        "dataset": "sklearn digits",
        "epochs": epochs,
        "seed": seed,
        "dense_accuracy": dense_accuracy,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(rows, indent=2))
    return path


@dataclass(frozen=True)
class DemoReport:
    """Everything :func:`run_demo` measured and wrote."""

    train_size: int
    test_size: int
    scoring_size: int
    prunable_weights: int
    epochs: int
    dense_accuracy: float
    dense_seconds: float
    results: list[DemoResult]
    files: list[Path]


def run_demo(
    method: str = "px",
    density: float = 0.05,
    rounds: int = 20,
    epochs: int = 10,
    out: str | Path = "results",
    *,
    compare: bool = False,
    seed: int = 0,
    progress: bool = True,
    block: tuple[int, int] | None = None,
    keep_classifier: bool = True,
) -> DemoReport:
    """Train the dense CNN and the CNN pruned with ``method`` (every method of
    :data:`pxkern.pruning.CRITERIA` if ``compare``) to ``density``; write the plots and a
    JSON of the results to ``out``.

    ``rounds`` applies to the iterative methods (px, synflow); the others run one-shot
    as in the official code (:func:`rounds_for`). With ``block=(bm, bn)`` every method also
    runs block-structured (:mod:`pxkern.pruning.blocks`), at the same density, beside its
    unstructured run. ``keep_classifier=False`` scores px with ``keep=()``
    (:meth:`Demo.run`; the other methods do not take it).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    methods = list(CRITERIA) if compare else [method]
    for name in methods:
        if name not in CRITERIA:
            raise ValueError(f"unknown pruning method {name!r}: supported are {sorted(CRITERIA)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    demo = Demo(seed)
    start = time.perf_counter()
    dense = demo.dense_accuracy(epochs)
    dense_seconds = time.perf_counter() - start
    structures = [None] if block is None else [None, block]
    results = [
        demo.run(name, density, rounds_for(name, rounds), epochs, progress, structure,
                 keep_classifier=keep_classifier or name != "px")
        for name in methods
        for structure in structures
    ]

    stem = "compare" if compare else method
    files = [plot_layer_densities(results, out / f"layer_density_{stem}.png")]
    if len(results) > 1:
        files.append(plot_accuracies(results, dense, out / f"accuracy_{stem}.png"))
    files.append(save_json(results, dense, epochs, seed, out / f"results_{stem}.json"))
    return DemoReport(
        train_size=demo.digits.y_train.numel(),
        test_size=demo.digits.y_test.numel(),
        scoring_size=demo.scoring_batch[1].numel(),
        prunable_weights=sum(layer.total for layer in results[0].layers),
        epochs=epochs,
        dense_accuracy=dense,
        dense_seconds=dense_seconds,
        results=results,
        files=files,
    )
