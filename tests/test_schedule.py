"""The paper's lr rules drawn as curves and compared with the paper's numbers."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.train.schedule import ScheduleState, learning_rate, plateau_update, warmup_update


def lr_at(cfg, it, ipe=391, state=None, base=0.1, total=64_000):
    state = state or ScheduleState()
    return learning_rate(
        cfg.schedule, base_lr=base, it=it, iters_per_epoch=ipe, total_iters=total, state=state
    )


def test_cifar_step_schedule_matches_the_paper():
    cfg = load_config(None, ["schedule.milestones=[32000, 48000]", "schedule.milestone_unit=iter"])
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 31_999) == pytest.approx(0.1)
    assert lr_at(cfg, 32_000) == pytest.approx(0.01)
    assert lr_at(cfg, 47_999) == pytest.approx(0.01)
    assert lr_at(cfg, 48_000) == pytest.approx(0.001)
    assert lr_at(cfg, 63_999) == pytest.approx(0.001)


def test_cifar_training_ends_at_64k():
    from pipeline.train.derived import derive

    cfg = load_config(
        None,
        ["optim.batch_size=128", "optim.scale_lr=false", "schedule.epochs=1000", "schedule.max_iters=64000"],
    )
    assert derive(cfg, 50_000).total_iters == 64_000


def test_imagenet_epoch_milestones():
    cfg = load_config(None, ["schedule.milestones=[30, 60, 90]"])
    ipe = 5004
    assert lr_at(cfg, 30 * ipe - 1, ipe) == pytest.approx(0.1)
    assert lr_at(cfg, 30 * ipe, ipe) == pytest.approx(0.01)
    assert lr_at(cfg, 60 * ipe, ipe) == pytest.approx(0.001)
    assert lr_at(cfg, 90 * ipe, ipe) == pytest.approx(0.0001)


def test_linear_warmup_ramps_then_hands_over():
    cfg = load_config(
        None, ["schedule.warmup_epochs=5", "schedule.warmup_lr=0.0", "schedule.milestones=[30]"]
    )
    ipe = 100
    assert lr_at(cfg, 0, ipe, base=0.4) == 0.0
    assert lr_at(cfg, 250, ipe, base=0.4) == pytest.approx(0.2)
    assert lr_at(cfg, 500, ipe, base=0.4) == pytest.approx(0.4)


def test_plateau_decisions_on_a_scripted_error_sequence():
    cfg = load_config(
        None, ["schedule.kind=plateau", "schedule.plateau_patience=2", "schedule.plateau_threshold=0.5"]
    )
    state = ScheduleState()
    lrs = []
    # improves, improves, stalls (within threshold), stalls -> /10, improves, stalls, stalls -> /10
    for err in [60.0, 50.0, 49.8, 49.9, 40.0, 39.9, 40.2]:
        state = plateau_update(cfg.schedule, state, err, base_lr=0.1)
        lrs.append(lr_at(cfg, 0, state=state))
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])
    assert state.plateau_reductions == 2


def test_plateau_respects_min_lr():
    cfg = load_config(None, ["schedule.kind=plateau", "schedule.plateau_patience=1", "schedule.min_lr=0.001"])
    state = ScheduleState()
    for _ in range(10):
        state = plateau_update(cfg.schedule, state, 50.0, base_lr=0.1)
    assert lr_at(cfg, 0, state=state) == pytest.approx(0.001)


def test_resnet110_warmup_rule():
    cfg = load_config(
        None,
        [
            "schedule.warmup_until_train_err=80",
            "schedule.warmup_lr=0.01",
            "schedule.milestones=[32000, 48000]",
            "schedule.milestone_unit=iter",
        ],
    )
    state = ScheduleState()
    assert lr_at(cfg, 0, state=state) == pytest.approx(0.01)
    state = warmup_update(cfg.schedule, state, train_err=85.0)
    assert lr_at(cfg, 300, state=state) == pytest.approx(0.01)
    state = warmup_update(cfg.schedule, state, train_err=79.0)
    assert state.warmup_done
    assert lr_at(cfg, 400, state=state) == pytest.approx(0.1)
    # once done it stays done, even if the error bounces back
    assert warmup_update(cfg.schedule, state, train_err=90.0).warmup_done
    assert lr_at(cfg, 32_000, state=state) == pytest.approx(0.01)


def test_goyal_large_batch_config_follows_their_recipe():
    """configs/imagenet/resnet50_8k.yaml: lr 0.1 x 8192/256 = 3.2, linear warm-up from 0.1 over
    5 epochs, /10 at 30, 60, 80 of 90, zero-init last BN gamma (Goyal et al. 2017)."""
    from pipeline.train.derived import derive
    from pipeline.train.schedule import ScheduleState, learning_rate

    cfg = load_config(
        "configs/imagenet/resnet50_8k.yaml", ["cluster.num_workers=32", "optim.max_worker_batch=128"]
    )
    d = derive(cfg, 1_281_167, 32)
    assert (d.global_batch, d.lr, d.per_worker_batch, d.micro_batch, d.accum_steps) == (
        8192,
        3.2,
        256,
        128,
        2,
    )
    assert d.epochs == 90 and cfg.model.zero_init_residual and cfg.optim.no_wd_bn_bias

    def lr_at(epoch: float) -> float:
        it = int(epoch * d.iters_per_epoch)
        return learning_rate(
            cfg.schedule,
            base_lr=d.lr,
            it=it,
            iters_per_epoch=d.iters_per_epoch,
            total_iters=d.total_iters,
            state=ScheduleState(),
        )

    assert lr_at(0) == pytest.approx(0.1)
    assert lr_at(2.5) == pytest.approx(0.1 + (3.2 - 0.1) / 2, rel=0.01)
    for epoch, lr in ((5, 3.2), (29.9, 3.2), (30, 0.32), (60, 0.032), (80, 0.0032), (89.9, 0.0032)):
        assert lr_at(epoch) == pytest.approx(lr), epoch


@pytest.mark.parametrize("every", [1, 2, 3])
def test_plateau_patience_counts_epochs_not_evaluations(every):
    """Patience 4 epochs: with validation every `every` epochs the lr drops at the first
    evaluation that has seen 4 or more epochs without improvement."""
    cfg = load_config(None, ["schedule.kind=plateau", "schedule.plateau_patience=4"])
    state = plateau_update(cfg.schedule, ScheduleState(), 50.0, base_lr=0.1, epochs=every)
    drop_epoch, epoch = None, every
    while drop_epoch is None and epoch < 20:
        epoch += every
        state = plateau_update(cfg.schedule, state, 50.0, base_lr=0.1, epochs=every)
        if state.plateau_reductions:
            drop_epoch = epoch
    # The best was set at epoch `every`; 4 flat epochs later is epoch every + 4, rounded up to
    # the next evaluation.
    assert drop_epoch == every + every * -(-4 // every)
    assert {1: 5, 2: 6, 3: 9}[every] == drop_epoch


def test_plateau_rejects_zero_epochs():
    cfg = load_config(None, ["schedule.kind=plateau"])
    with pytest.raises(ValueError, match="epochs since the last evaluation"):
        plateau_update(cfg.schedule, ScheduleState(), 50.0, base_lr=0.1, epochs=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_step_free_schedules_decay_from_the_end_of_warm_up_to_zero(kind):
    """FFCV's triangular shape (linear) and torchvision's cosine: warm-up from warmup_lr over 2
    epochs of 10 iterations, then one value per iteration down to 0 at iteration 100."""
    import math

    cfg = load_config(None, [f"schedule.kind={kind}", "schedule.warmup_epochs=2", "schedule.warmup_lr=0.0"])

    def at(it: int) -> float:
        return lr_at(cfg, it, ipe=10, base=0.8, total=100)

    assert at(0) == 0.0 and at(10) == pytest.approx(0.4)  # warm-up, linear from 0
    assert at(20) == pytest.approx(0.8)  # the peak: warm-up's end, the decay's start
    for it in (20, 30, 47, 60, 85, 99, 100):
        done = (it - 20) / 80
        want = 0.8 * (1 - done if kind == "linear" else 0.5 * (1 + math.cos(math.pi * done)))
        assert at(it) == pytest.approx(want, abs=1e-12), it
    assert at(60) == pytest.approx(0.4)  # halfway down for both shapes
    assert all(at(i) > at(i + 1) for i in range(20, 100))  # no steps, no plateau
    assert at(100) == pytest.approx(0.0, abs=1e-12)
