"""One model's training without Ray (`orchestrator.training.fit`), as each worker runs it."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.config import deep_merge, parse_config
from orchestrator.training.fit import Fit, chosen, train_in_process, why_chosen
from orchestrator.training.plan import ModelPlan
from psat_core.accounting import trained_parameters
from psat_core.checkpoint import load_state, save_member
from psat_core.data import ImageArrays, load_dataset
from psat_core.models import NoiseGenerator, count_parameters
from psat_core.steps import MetaNoiseTraining

NORMS = ("linf", "l2", "l1")
PLANS = [
    ModelPlan("linf", "at", ("linf",), 4),  # a PSAT member
    ModelPlan("at_msd", "msd", NORMS, None),
    ModelPlan("at_mng", "mng", NORMS, None),
    ModelPlan("sat_mobilenet_v3_small", "sat", NORMS, None, "mobilenet_v3_small"),  # Table 5
]


@pytest.fixture
def job(tiny_job):
    return parse_config(tiny_job("fit"))


@pytest.fixture
def digits():
    data = load_dataset("digits", "train", "unused")
    return ImageArrays(data.images[:64], data.labels[:64]), data.subset(32, seed=1)


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: plan.name)
def test_a_checkpoint_resumes_the_whole_training_state(job, digits, plan, tmp_path):
    train, _ = digits
    torch.manual_seed(0)
    fit = Fit.build(job, plan, steps_per_epoch=1, device=torch.device("cpu"))
    fit.train_epoch(train, epoch=0)
    save_member(tmp_path, fit.spec, fit.state(epoch=0))
    state = load_state(tmp_path)
    torch.manual_seed(1)  # another initialization, another RNG: restore must replace both
    resumed = Fit.build(job, plan, steps_per_epoch=1, device=torch.device("cpu"))
    assert resumed.restore(state) == 1
    losses = []
    for each in (fit, resumed):  # the next epoch from the same random state
        torch.set_rng_state(state["rng"])
        losses.append(each.train_epoch(train, epoch=1)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(fit.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    if plan.method == "mng":
        generators = [f.method.generator.state_dict() for f in (fit, resumed)]
        for name, tensor in generators[0].items():
            torch.testing.assert_close(tensor, generators[1][name])


def test_at_mng_counts_its_noise_generator(job, digits):
    train, val = digits
    fit = train_in_process(job, PLANS[2], train, val)
    assert isinstance(fit.method, MetaNoiseTraining)
    classifier, generator = count_parameters(fit.net), count_parameters(NoiseGenerator(1))
    assert fit.train_epoch(train, epoch=2)["params"] == classifier + generator
    assert trained_parameters(fit.spec) == classifier + generator


def test_validation_reports_the_sweeps_objective(job, digits):
    train, val = digits
    history = []
    fit = train_in_process(job, PLANS[0], train, val, on_epoch=history.append)
    metrics = fit.validate(val)
    assert metrics["objective"] == metrics["linf"]
    assert [h["epoch"] for h in history] == list(range(job.training.epochs))
    assert history[-1]["val_linf"] == metrics["linf"] and "loss" in history[-1]
    fit = Fit.build(job, PLANS[1], steps_per_epoch=1, device=torch.device("cpu"))
    metrics = fit.validate(val)
    assert metrics["objective"] == metrics["trade_off"]


@pytest.mark.parametrize("generator_out", [None, 0.05])
def test_optimizer_groups_follow_the_config_and_resume(job, digits, tmp_path, generator_out):
    """`training.optimizer`: AdamW with the generator's lr and the embeddings' weight decay
    scaled, and the generator's output matrix a group of its own only when configured (so
    checkpoints from before it resume); a plain ResNet takes `training.baselines`' SGD, all
    "rest". A checkpoint restores every group and its state."""
    train, _ = digits
    changed = {"name": "adamw", "generator": {"lr": 0.2}, "embeddings": {"weight_decay": 0.0}}
    if generator_out:
        changed["generator_out"] = {"lr": generator_out}
    job = parse_config(deep_merge(job.model_dump(), {"training": {"optimizer": changed}}))
    fit = Fit.build(job, PLANS[0], steps_per_epoch=1, device=torch.device("cpu"))
    assert isinstance(fit.optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in fit.optimizer.param_groups}
    lr, decay = job.training.lr, job.training.weight_decay
    expected = {
        "generator": (pytest.approx(0.2 * lr), decay),
        "embeddings": (pytest.approx(lr), 0.0),
        "rest": (pytest.approx(lr), decay),
    }
    generator = fit.net.generator
    if generator_out:
        expected["generator_out"] = (pytest.approx(generator_out * lr), decay)
        assert groups["generator_out"]["params"] == [generator.w_out, generator.b_out]
    assert groups["generator"]["params"][0] is generator.w_in
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == expected
    assert sum(len(g["params"]) for g in groups.values()) == len(list(fit.net.parameters()))
    plain = Fit.build(job, PLANS[1], steps_per_epoch=1, device=torch.device("cpu"))
    assert isinstance(plain.optimizer, torch.optim.SGD)  # `training.baselines`
    (group,) = plain.optimizer.param_groups
    base = job.training.baselines
    settings = ("rest", base.lr, base.momentum, base.weight_decay)
    assert (group["name"], group["lr"], group["momentum"], group["weight_decay"]) == settings

    fit.train_epoch(train, epoch=0)
    save_member(tmp_path, fit.spec, fit.state(epoch=0))
    resumed = Fit.build(job, PLANS[0], steps_per_epoch=1, device=torch.device("cpu"))
    resumed.restore(load_state(tmp_path))
    for a, b in zip(fit.optimizer.param_groups, resumed.optimizer.param_groups, strict=True):
        assert (a["name"], a["lr"], a["weight_decay"]) == (b["name"], b["lr"], b["weight_decay"])
    torch.testing.assert_close(
        fit.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    )


def test_a_plans_seed_is_its_models_initialization_batches_and_attacks(job, digits):
    """`reproduce.seeds`: the same plan and seed train the same weights; another seed (the
    same `training.seed`) others, as `training.seed` + 1 would."""
    train, _ = digits
    nets = {}
    for name, plan, base in (("first", PLANS[0], 0), ("again", PLANS[0], 0),
                             ("seed 1", replace(PLANS[0], seed=1), 0),
                             ("training.seed 1", PLANS[0], 1)):  # fmt: skip
        seeded = parse_config(deep_merge(job.model_dump(), {"training": {"seed": base}}))
        torch.manual_seed(plan.training_seed(seeded))  # as train_in_process and each worker
        fit = Fit.build(seeded, plan, steps_per_epoch=1, device=torch.device("cpu"))
        fit.train_epoch(train, epoch=0)
        nets[name] = list(fit.net.state_dict().values())

    def same(a: str, b: str) -> bool:
        return all(torch.equal(x, y) for x, y in zip(nets[a], nets[b], strict=True))

    assert same("first", "again") and same("seed 1", "training.seed 1")
    assert not same("first", "seed 1")


def test_the_chosen_report_is_the_best_trade_off_the_later_of_a_tie():
    reports = [
        {"epoch": 0, "trade_off": 0.3},
        {"epoch": 1, "trade_off": 0.5},
        {"epoch": 2, "trade_off": 0.5},
        {"epoch": 3, "trade_off": 0.4},
        {"epoch": 4},  # another rank's report: no validation
    ]
    assert chosen(reports, "best")["epoch"] == 2
    assert chosen(reports, "last")["epoch"] == 3
    assert why_chosen(reports[2], "best", 4) == "epoch 3/4: best validation trade_off 0.5000"
    with pytest.raises(ValueError, match="no validated epoch"):
        chosen([{"epoch": 0}], "best")


def test_a_model_trained_in_process_keeps_its_best_epochs_weights(tiny_job, digits):
    """The best epoch's weights, not the last: the same training stopped after the best epoch
    (a constant schedule, so the trajectories agree) ends with the same weights."""
    train, val = digits
    settings = {"epochs": 5, "schedule": "constant", "optimizer": {"name": "adam"}, "lr": 0.02}
    job = parse_config(tiny_job("best", training=settings))
    trade_offs: list[float] = []
    best = train_in_process(
        job, PLANS[0], train, val, on_epoch=lambda m: trade_offs.append(m["val_trade_off"])
    )
    epoch = max(range(len(trade_offs)), key=lambda e: (trade_offs[e], e))
    assert epoch < 4, f"the validation trade-off peaked at the last epoch: {trade_offs}"
    stopped = parse_config(
        tiny_job("best", training=settings | {"epochs": epoch + 1, "checkpoint": "last"})
    )
    last = train_in_process(stopped, PLANS[0], train, val)
    for a, b in zip(best.net.state_dict().values(), last.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_training_run_started_by_psat_0_1_keeps_its_name_and_so_resumes(tiny_job, tmp_path):
    """Ray Train's runs are `<job>-<model>` now; one psat 0.1 started under `<model>` alone (its
    checkpoints on the user's storage) keeps that name, so a relaunch resumes it."""
    from orchestrator.training.trainer import train_run_name

    job = parse_config(tiny_job("legacy"))
    plan = ModelPlan("linf", "at", ("linf",), 4)
    assert train_run_name(job, plan) == "legacy-linf"
    (Path(job.storage.resolved()) / "legacy" / "linf" / "checkpoint_000001").mkdir(parents=True)
    assert train_run_name(job, plan) == "linf"
    assert train_run_name(job, ModelPlan("l2", "at", ("l2",), 4)) == "legacy-l2"
