"""The paper's published numbers (He et al., "Deep Residual Learning", 2015) and how a run's
network and evaluation map onto them; the reports (single run, over seeds) read them here."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import is_cifar


@dataclass(frozen=True)
class PaperResult:
    """One published error rate (percent) of He et al., "Deep Residual Learning" (2015)."""

    model: str  # canonical key, see canonical_model()
    eval: str  # "tencrop" | "multiscale" (ImageNet val) | "test" (CIFAR-10 test set)
    top1: float | None
    top5: float | None
    source: str  # where in the paper
    label: str  # the paper's own name for the network
    note: str = ""


# ImageNet 10-crop: Table 2 (top-1 only; all shortcuts option A) and Table 3 (top-1/top-5).
# ImageNet multi-scale fully-convolutional: Table 4 (single model, validation set).
# CIFAR-10 test error: Table 6 (no numbers for plain nets: the paper shows them in Fig. 6 only).
PAPER_RESULTS: tuple[PaperResult, ...] = (
    PaperResult("plain18", "tencrop", 27.94, None, "Table 2", "plain-18"),
    PaperResult("resnet18_a", "tencrop", 27.88, None, "Table 2", "ResNet-18 (A)"),
    PaperResult("plain34", "tencrop", 28.54, 10.02, "Table 3", "plain-34"),
    PaperResult("resnet34_a", "tencrop", 25.03, 7.76, "Table 3", "ResNet-34 A"),
    PaperResult("resnet34_b", "tencrop", 24.52, 7.46, "Table 3", "ResNet-34 B"),
    PaperResult("resnet34_c", "tencrop", 24.19, 7.40, "Table 3", "ResNet-34 C"),
    PaperResult("resnet50_b", "tencrop", 22.85, 6.71, "Table 3", "ResNet-50"),
    PaperResult("resnet101_b", "tencrop", 21.75, 6.05, "Table 3", "ResNet-101"),
    PaperResult("resnet152_b", "tencrop", 21.43, 5.71, "Table 3", "ResNet-152"),
    PaperResult("resnet34_b", "multiscale", 21.84, 5.71, "Table 4", "ResNet-34 B"),
    PaperResult("resnet34_c", "multiscale", 21.53, 5.60, "Table 4", "ResNet-34 C"),
    PaperResult("resnet50_b", "multiscale", 20.74, 5.25, "Table 4", "ResNet-50"),
    PaperResult("resnet101_b", "multiscale", 19.87, 4.60, "Table 4", "ResNet-101"),
    PaperResult("resnet152_b", "multiscale", 19.38, 4.49, "Table 4", "ResNet-152"),
    PaperResult("cifar_resnet20_a", "test", 8.75, None, "Table 6", "ResNet-20"),
    PaperResult("cifar_resnet32_a", "test", 7.51, None, "Table 6", "ResNet-32"),
    PaperResult("cifar_resnet44_a", "test", 7.17, None, "Table 6", "ResNet-44"),
    PaperResult("cifar_resnet56_a", "test", 6.97, None, "Table 6", "ResNet-56"),
    PaperResult(
        "cifar_resnet110_a", "test", 6.43, None, "Table 6", "ResNet-110", "best of 5; mean 6.61±0.16"
    ),
    PaperResult("cifar_resnet1202_a", "test", 7.93, None, "Table 6", "ResNet-1202"),
    *(
        PaperResult(f"cifar_plain{d}", "test", None, None, "Fig. 6", f"plain-{d}", "curves only")
        for d in (20, 32, 44, 56, 110)
    ),
)


def canonical_model(name: str, shortcut: str | None = None, v1_5: bool | None = None) -> str:
    """The paper-table key of a registered model with its config overrides applied.

    ``resnet34`` (option B by default) -> ``resnet34_b``; ``resnet34`` with ``model.shortcut=A``
    -> ``resnet34_a``; ``cifar_resnet56`` -> ``cifar_resnet56_a``; plain nets keep their name.
    ResNet-50 v1.5 gets a ``_v1_5`` suffix: it is not the paper's network. A name the registry
    does not know is returned as it is (it matches no paper row).

    Args:
        name: ``model.name`` from the config.
        shortcut: ``model.shortcut`` (None: the model's own option).
        v1_5: ``model.v1_5`` (None: the model's own choice).
    """
    from pipeline.models import model_spec

    try:
        spec = model_spec(name)
    except ValueError:
        return name
    prefix = "cifar_" if spec.family == "cifar" else ""
    if spec.plain:
        return f"{prefix}plain{spec.depth}"
    option = (shortcut or spec.shortcut).lower()
    newer = v1_5 if v1_5 is not None else spec.v1_5
    return f"{prefix}resnet{spec.depth}_{option}" + ("_v1_5" if newer else "")


def paper_eval(dataset: str, eval_mode: str | None) -> str | None:
    """The paper's evaluation that a run's final evaluation corresponds to, if any.

    Args:
        dataset: ``data.dataset`` ("imagenet" or "cifar10").
        eval_mode: the final evaluation's mode ("center", "tencrop", "multiscale").
    """
    if is_cifar(dataset):
        return "test"  # one view of the 32x32 image, whatever the mode is called
    return {"tencrop": "tencrop", "multiscale": "multiscale"}.get(eval_mode or "")


def paper_result(model_key: str, evaluation: str | None) -> PaperResult | None:
    """The ``PAPER_RESULTS`` entry for a canonical model and paper evaluation, or None.

    Args:
        model_key: from ``canonical_model``.
        evaluation: from ``paper_eval``.
    """
    for row in PAPER_RESULTS:
        if row.model == model_key and row.eval == evaluation:
            return row
    return None
