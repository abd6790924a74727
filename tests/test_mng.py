"""AT_mng (MNG-AC, Madaan et al. 2021): the noise generator, the generator's and the
classifier's updates, a tiny training run, checkpoints and parameter counts. Real models and
attacks on 8x8 digits-sized images."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SAT_RADII, sat_norm, synthetic
from torch.nn.parallel import DistributedDataParallel

from psat_core.accounting import plain_parameters, trained_parameters
from psat_core.attacks import PGD
from psat_core.checkpoint import MemberSpec, load_member, load_state, save_member
from psat_core.data import ImageArrays
from psat_core.models import NoiseGenerator, count_parameters, create_model
from psat_core.settings import NORMS, attack_defaults
from psat_core.steps import (
    MetaNoiseTraining,
    js_divergence,
    make_optimizer,
    make_scheduler,
    train_epoch,
    train_step,
    training_inputs,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 4
ATTACKS = attack_defaults("digits", "train", {norm: {"steps": 2} for norm in NORMS})


def tiny_resnet(in_channels: int = 1) -> torch.nn.Module:
    return create_model(
        "resnet10", num_classes=CLASSES, in_channels=in_channels, widths=(8, 16, 16, 16)
    )


def adversarial_batch(model, norm: str, n: int = 16, seed: int = 1):
    x, y = synthetic(n, seed, CLASSES)
    pgd = PGD.from_config(ATTACKS[norm])
    return x, pgd.last_iterate(model, x, y), y, pgd.threat


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("channels", [1, 3])
def test_generator_noise_has_the_input_shape_and_ignores_its_values(channels):
    generator = NoiseGenerator(channels)
    x = torch.rand(2, channels, 8, 8)
    torch.manual_seed(0)
    noise = generator(x)
    assert noise.shape == x.shape
    torch.manual_seed(0)
    assert torch.equal(generator(torch.zeros_like(x)), noise)  # input-independent


def test_generator_has_the_reference_size_and_init():
    generator = NoiseGenerator(3)
    assert count_parameters(generator) == 4183
    for conv in generator.convs:
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    conv = generator.convs[1]  # 3x3, 20 -> 20: 3,600 weights ~ N(0, 2 / (9 * 20))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 180), rel=0.1)


@pytest.mark.parametrize("norm", NORMS)
def test_noise_image_lies_in_the_norms_ball_and_the_box(norm):
    method = MetaNoiseTraining(ATTACKS, in_channels=1)
    x, _ = synthetic(16, 0, CLASSES)
    threat = method.attacks[norm].threat
    with torch.no_grad():
        x_noise = method.noise_image(threat, x)
    assert (threat.distance(x_noise - x) <= threat.eps * (1 + 1e-5)).all()
    assert x_noise.min() >= 0 and x_noise.max() <= 1


def test_js_divergence_is_zero_for_equal_predictions_and_positive_otherwise():
    logits = torch.randn(5, CLASSES)
    assert js_divergence([logits, logits, logits]).item() == pytest.approx(0.0, abs=1e-6)
    assert js_divergence([logits, torch.randn(5, CLASSES), logits]).item() > 0


def test_lookahead_gradient_reaches_the_generator_and_not_the_classifier():
    torch.manual_seed(0)
    model = tiny_resnet()
    method = MetaNoiseTraining(ATTACKS, in_channels=1)
    x, x_adv, y, threat = adversarial_batch(model, "l2")  # l2: noise is rescaled, not clipped
    classifier, generator = snapshot(model), snapshot(method.generator)

    model.train()
    method.update_generator(model, x, x_adv, y, threat, lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    for name, tensor in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(tensor, classifier[name]), name
    # x_adv does not depend on the generator: its gradient can only come through theta'
    for name, p in method.generator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p, generator[name]), name
    assert method.optimizer.param_groups[0]["lr"] == 0.1  # the classifier's learning rate

    generator = snapshot(method.generator)
    generator_grads = [p.grad.clone() for p in method.generator.parameters()]
    optimizer = make_optimizer(model.parameters(), lr=0.1)
    method.update_classifier(model, x, x_adv, y, threat, optimizer)
    for name, tensor in method.generator.state_dict().items():
        assert torch.equal(tensor, generator[name]), name
    for p, grad in zip(method.generator.parameters(), generator_grads, strict=True):
        assert torch.equal(p.grad, grad)
    assert any(not torch.equal(t, classifier[n]) for n, t in model.state_dict().items())


def test_tiny_run_lowers_its_loss():
    # radii small enough that a tiny ResNet fits the toy problem robustly in a few steps
    eps = {"linf": 0.05, "l2": 0.3, "l1": 1.0}
    overrides = {n: {"steps": 2, "eps": eps[n], "step_size": eps[n] / 2} for n in NORMS}
    attacks = attack_defaults("digits", "train", overrides)
    torch.manual_seed(0)
    epochs, steps, batch_size = 8, 2, 32
    x, y = synthetic(steps * batch_size, 0, CLASSES)
    data = ImageArrays((x * 255).round().to(torch.uint8), y)
    model = tiny_resnet()
    method = training_inputs("mng", attacks, in_channels=1)
    optimizer = make_optimizer(model.parameters(), lr=0.05)
    scheduler = make_scheduler(optimizer, "cosine", epochs * steps)
    losses = [
        train_epoch(
            model, data, optimizer, scheduler, method, batch_size=batch_size, steps=steps, seed=e
        )["loss"]
        for e in range(epochs)
    ]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in method.generator.parameters())


def test_training_inputs_builds_mng_and_rejects_what_it_cannot_train():
    with pytest.raises(ValueError, match="in_channels"):
        training_inputs("mng", ATTACKS)
    with pytest.raises(ValueError, match="at least one attack"):
        training_inputs("mng", {}, in_channels=1)
    method = training_inputs("mng", ATTACKS, in_channels=1)
    assert isinstance(method, MetaNoiseTraining) and method.norms == NORMS
    hyper = create_model("hyper_resnet10", num_classes=CLASSES, in_channels=1, embedding_dim=4)
    x, y = synthetic(4, 0, CLASSES)
    with pytest.raises(ValueError, match="plain ResNet"):
        train_step(hyper, x, y, make_optimizer(hyper.parameters(), lr=0.1), method)


def test_checkpoint_round_trip_keeps_the_generator(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(CLASSES, (8,))
    model = tiny_resnet(in_channels=3)
    optimizer = make_optimizer(model.parameters(), lr=0.05)
    method = MetaNoiseTraining(ATTACKS, in_channels=3)
    train_step(model, x, y, optimizer, method)  # momentum buffers exist
    spec = MemberSpec(
        arch="resnet10",
        num_classes=CLASSES,
        in_channels=3,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        dataset="cifar10",
        norms=NORMS,
        method="mng",
    )
    state = {"model": model.state_dict(), "epoch": 0}
    save_member(tmp_path, spec, state | {MetaNoiseTraining.CHECKPOINT_KEY: method.state_dict()})

    # resuming reads the training state (load_state); evaluation loads the classifier alone
    restored = MetaNoiseTraining(ATTACKS, in_channels=3)
    restored.load_state_dict(load_state(tmp_path)[MetaNoiseTraining.CHECKPOINT_KEY])
    for name, tensor in method.generator.state_dict().items():
        assert torch.equal(restored.generator.state_dict()[name], tensor), name
    for p, q in zip(method.generator.parameters(), restored.generator.parameters(), strict=True):
        momentum = method.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(restored.optimizer.state[q]["momentum_buffer"], momentum)


def test_checkpoint_evaluates_the_classifier_alone(tmp_path):
    model = create_model("resnet10", num_classes=10, in_channels=1)
    method = MetaNoiseTraining(ATTACKS, in_channels=1)
    spec = MemberSpec("resnet10", 10, 1, (0.0,), (1.0,), "digits", NORMS, method="mng")
    state = {"model": model.state_dict(), "epoch": 0}
    save_member(tmp_path, spec, state | {MetaNoiseTraining.CHECKPOINT_KEY: method.state_dict()})
    loaded = load_member(tmp_path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert count_parameters(loaded) == count_parameters(model)


@pytest.mark.parametrize("channels", [1, 3])
def test_parameter_count_is_classifier_plus_generator(channels):
    dataset = "digits" if channels == 1 else "cifar10"
    stats = (0.0,) * channels, (1.0,) * channels
    spec = MemberSpec("resnet10", 10, channels, *stats, dataset, NORMS, method="max")
    mng = dataclasses.replace(spec, method="mng")
    method = MetaNoiseTraining(ATTACKS, in_channels=channels)
    plain = plain_parameters("resnet10", 10, channels)
    assert trained_parameters(mng) == plain + method.parameters
    assert trained_parameters(spec) == plain
    if channels == 3:
        assert method.parameters == 4183


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # a different generator and norm draw on each rank, unless synced
    model = DistributedDataParallel(tiny_resnet())  # DDP broadcasts rank 0's classifier
    optimizer = make_optimizer(model.module.parameters(), lr=0.05)
    method = MetaNoiseTraining(ATTACKS, in_channels=1)
    x, y = synthetic(8, seed=rank, classes=CLASSES)  # a different batch on each rank
    passes = []
    model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    train_step(model, x, y, optimizer, method)
    # SAT, too, takes rank 0's draw: one norm per global batch (helpers.sat_norm names it)
    sat = training_inputs("sat", {n: dataclasses.replace(ATTACKS[n], eps=SAT_RADII[n])
                                  for n in NORMS})  # fmt: skip
    parameters = {
        "generator": dict(method.generator.named_parameters()),
        "classifier": dict(model.module.named_parameters()),  # BN statistics are per rank
        "wrapped passes": passes,
        "sat norms": [sat_norm(x, *sat(model.module.eval(), x, y)) for _ in range(8)],
    }
    torch.save(parameters, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_train_one_generator_and_draw_one_norm_per_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # one pass per step through the wrapper, which broadcasts the BN buffers in place: a second
    # one would modify what cuDNN's BatchNorm saved for backward (a CUDA-only error)
    assert first["wrapped passes"] == second["wrapped passes"] == [8]
    assert first["sat norms"] == second["sat norms"] and len(set(first["sat norms"])) > 1
    for part in ("generator", "classifier"):
        for name, tensor in first[part].items():
            assert torch.equal(second[part][name], tensor), (part, name)
