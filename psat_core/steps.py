"""One adversarial training step for every method of Table 1.

    nat  natural training
    at   adversarial training for one norm (a PSAT member, eq. 9; AT_linf / AT_l2 / AT_l1)
    max  worst case over the norms (eq. 5)
    avg  mean loss over the norms (eq. 6)
    msd  multi steepest descent (eq. 7)
    mng  meta noise generation with adversarial consistency (AT_mng; Madaan et al. 2021)
    sat  stochastic adversarial training: one norm's PGD drawn per batch (Table 5's
         lightweight networks, as in Madaan et al. 2021)

A hypernetwork member generates its conv weights once per parameter update: the attack
iterations reuse them detached, and the training forward uses the same tensors with their graph.

Most methods are a `TrainingInputs` function, the inputs a cross-entropy is averaged over; AT_mng
also trains a noise generator, so it is a `MetaNoiseTraining` object that owns the generator and
makes its own updates. `train_step` takes either (a `Method`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from psat_core.attacks.multi import MSD, WorstCase
from psat_core.attacks.pgd import PGD, adversarial_examples
from psat_core.attacks.threat import ThreatModel
from psat_core.data import ImageArrays, random_crop_flip
from psat_core.models import HyperResNet, NoiseGenerator, count_parameters
from psat_core.settings import SCHEDULES, AttackConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
PARAM_GROUPS = ("generator", "generator_out", "embeddings", "rest")  # `param_groups`
GENERATOR_OUT = ("generator.w_out", "generator.b_out")  # eq. 11's second layer

# (model, x, y) -> the inputs the loss is averaged over
TrainingInputs = Callable[[nn.Module, Tensor, Tensor], list[Tensor]]


@dataclass(frozen=True)
class TrainingMethod:
    """A registered training method: `build(attacks, in_channels=, device=)` returns its
    `Method`; `multi_norm`: trained against every norm at once; `table1`: one of Table 1's
    multi-norm baselines (SAT is Table 5's)."""

    name: str
    build: Callable[..., Method]
    multi_norm: bool
    table1: bool


# name -> method, in registration order: the reproduction trains every multi-norm one (Table 1)
METHODS: dict[str, TrainingMethod] = {}


def register_method(name: str, multi_norm: bool = False, table1: bool = True):
    """Register a training method under `name` (timm's `register_model`, for methods)."""

    def register(build: Callable[..., Method]) -> Callable[..., Method]:
        METHODS[name] = TrainingMethod(name, build, multi_norm, multi_norm and table1)
        return build

    return register


def training_inputs(
    method: str,
    attacks: Mapping[str, AttackConfig],
    *,
    in_channels: int | None = None,
    device: torch.device | str = "cpu",
) -> Method:
    """The training method named `method`, built from its attack configs (keyed by norm).

    `in_channels` and `device` are those of AT_mng's noise generator ("mng" only; required there).
    """
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; allowed: {', '.join(METHODS)}")
    if method != "nat" and not attacks:
        raise ValueError(f"method {method!r} needs at least one attack config")
    return METHODS[method].build(attacks, in_channels=in_channels, device=device)


def _pgds(attacks: Mapping[str, AttackConfig]) -> dict[str, PGD]:
    return {norm: PGD.from_config(cfg) for norm, cfg in attacks.items()}


@register_method("nat")
def natural(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """NAT: the clean inputs."""
    return lambda model, x, y: [x]


@register_method("at")
def adversarial(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """AT for one norm: PGD's last iterate (eq. 9's inner max)."""
    pgds = _pgds(attacks)
    if len(pgds) != 1:
        raise ValueError(f"method 'at' trains against one norm, got {sorted(pgds)}")
    (pgd,) = pgds.values()
    return lambda model, x, y: [pgd.last_iterate(model, x, y)]


@register_method("max", multi_norm=True)
def worst_case(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """AT_max (eq. 5): the worst norm's example per input."""
    worst = WorstCase(_pgds(attacks))
    return lambda model, x, y: [worst(model, x, y)]


@register_method("avg", multi_norm=True)
def average(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """AT_avg (eq. 6): every norm's example, the loss averaged over them."""
    pgds = _pgds(attacks)
    return lambda model, x, y: list(adversarial_examples(pgds, model, x, y).values())


@register_method("msd", multi_norm=True)
def steepest_descent(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """AT_msd (eq. 7): one attack taking, per step, the highest-loss norm's step."""
    msd = MSD(
        {norm: pgd.threat for norm, pgd in _pgds(attacks).items()},
        steps=max(cfg.steps for cfg in attacks.values()),
        step_sizes={norm: cfg.step_size for norm, cfg in attacks.items()},
    )
    return lambda model, x, y: [msd(model, x, y)]


def drawn_norm(count: int, device: torch.device) -> int:
    """One of ``count`` norms, drawn uniformly (torch's global generator, seeded by the training
    loop); under DistributedDataParallel every rank takes rank 0's draw: one norm per global
    batch, as on one device."""
    choice = torch.randint(count, (1,))
    if dist.is_available() and dist.is_initialized():
        choice = choice.to(device)
        dist.broadcast(choice, src=0)
    return int(choice)


@register_method("sat", multi_norm=True, table1=False)
def stochastic(attacks: Mapping[str, AttackConfig], **_) -> TrainingInputs:
    """SAT: each batch against one norm's PGD (`drawn_norm`): one attack's cost per batch for
    any number of norms."""
    pgds = list(_pgds(attacks).values())
    return lambda model, x, y: [pgds[drawn_norm(len(pgds), x.device)].last_iterate(model, x, y)]


ATTACK_BN = ("running", "batch")  # `crafted_on`


class _BatchStatistics(nn.Module):
    """A model whose mode an attack cannot change: its `eval()` (the attacks' `eval_mode`)
    leaves the wrapped model as `crafted_on` set it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> _BatchStatistics:
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@contextlib.contextmanager
def crafted_on(model: nn.Module, attack_bn: str) -> Iterator[nn.Module]:
    """The model a training attack crafts on. ``"running"`` (the paper's, Madry et al.'s):
    ``model`` itself, which the attack puts in eval mode, its BatchNorm normalising with the
    running statistics. ``"batch"`` (beyond the paper): ``model`` in train mode, BatchNorm
    normalising with each batch's statistics while its running statistics stay frozen (momentum
    0), whatever mode the attack asks for; every flag, momentum and count restored after."""
    if attack_bn not in ATTACK_BN:
        raise ValueError(f"unknown attack_bn {attack_bn!r}; allowed: {', '.join(ATTACK_BN)}")
    if attack_bn == "running":
        yield model
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    kept = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    model.train()
    for m in norms:
        m.momentum = 0.0
    try:
        yield _BatchStatistics(model)
    finally:
        for m, mode in modes:
            m.training = mode
        for m, momentum, tracked in kept:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def js_divergence(logits: Sequence[Tensor]) -> Tensor:
    """MNG-AC's adversarial consistency loss: the Jensen-Shannon divergence of the predictions.

    ``mean_i KL(p_i || M)`` with ``p_i = softmax(logits_i)`` and
    ``M = clamp(mean_i p_i, 1e-7, 1)``, each KL averaged over the batch (the reference's
    `train_MNG.py`). Shapes: each logits ``(B, K)``; returns a scalar.
    """
    probs = [F.softmax(z.float(), dim=1) for z in logits]
    log_mixture = torch.stack(probs).mean(dim=0).clamp(1e-7, 1.0).log()
    kls = [F.kl_div(log_mixture, p, reduction="batchmean") for p in probs]  # KL(p || M)
    return torch.stack(kls).mean()


class MetaNoiseTraining:
    """AT_mng: meta noise generation with adversarial consistency (MNG-AC; Madaan, Shin & Hwang,
    ICML 2021, Algorithm 1), as the reference code does it (divyam3897/MNG_AC `train_MNG.py`).

    `step` makes one update of the noise generator g_phi and one of the classifier f_theta:

    1. stochastic adversarial training: one norm drawn uniformly among `attacks`, and ``x_adv``
       from that norm's training PGD (its last iterate) on the classifier;
    2. noise image ``x_noise = x + proj(g_phi(x))``, projected onto the same norm's ball and
       the image box (`noise_image`);
    3. lookahead ``theta' = theta - lr * grad_theta CE(f_theta(x_noise), y)``: one plain SGD
       step at the classifier's current learning rate, differentiable in phi (second order);
    4. generator update: an SGD step of phi on ``CE(f_theta'(x_adv), y)`` (`update_generator`);
    5. classifier update on ``CE(f(x_adv), y) + js_weight * JS(f(x), f(x_adv), f(x_noise))``
       with fresh noise drawn without gradient (`update_classifier`).

    The classifier is in training mode for the passes of steps 3-5; the lookahead's passes
    update copies of its BatchNorm buffers (the reference runs them on a deep copy). Only
    plain ResNets are supported: a `HyperResNet`'s convs are generated, not parameters.

    The generator has its own SGD (momentum 0.9, weight decay 5e-4, as the reference); its
    learning rate is set to the classifier optimizer's before each update, so it follows the
    classifier's schedule (the reference sets both from one schedule every step).

    Under DistributedDataParallel every rank trains one generator, as on one device: rank 0's
    initial generator and norm draws are broadcast, and generator gradients are averaged.

    A checkpoint's state holds `state_dict()`, ``{"generator": ..., "optimizer": ...}``, under
    `CHECKPOINT_KEY`; the classifier alone is the evaluated model.

    Args:
        attacks: norm -> training attack config; each step trains against one of them.
        in_channels: image channels C of the generator's noise.
        js_weight: beta, the weight of the consistency loss (default 12, the reference's).
        device: where the generator lives (the classifier's device).

    Example::

        >>> method = MetaNoiseTraining(attack_defaults("cifar10", "train"), in_channels=3)
        >>> stats = method.step(model, x, y, optimizer)  # {"loss", "accuracy", "generator_loss"}
    """

    CHECKPOINT_KEY = "noise_generator"

    def __init__(
        self,
        attacks: Mapping[str, AttackConfig],
        in_channels: int,
        *,
        js_weight: float = 12.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not attacks:
            raise ValueError("method 'mng' needs at least one attack config")
        self.attacks = {norm: PGD.from_config(cfg) for norm, cfg in attacks.items()}
        self.norms = tuple(self.attacks)
        self.js_weight = float(js_weight)
        self.generator = NoiseGenerator(in_channels).to(device)
        # lr 0 until the first update copies the classifier's
        self.optimizer = make_optimizer(self.generator.parameters(), lr=0.0)
        self._ranks_synced = False

    @property
    def parameters(self) -> int:
        """Trainable parameters the method adds to the classifier's (the generator's)."""
        return count_parameters(self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def noise_image(self, threat: ThreatModel, x: Tensor) -> Tensor:
        """``x`` plus generated noise projected onto ``threat``'s ball and the image box."""
        return x + threat.project(self.generator(x), x)

    def step(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        optimizer: torch.optim.Optimizer,
        amp: bool = False,
        attack_bn: str = "running",
    ) -> dict[str, float]:
        """One generator and one classifier update on a batch (steps 1-5 above); the attack
        crafted with the BatchNorm statistics `attack_bn` says (`crafted_on`).

        `model` may be wrapped in DistributedDataParallel: the attack and the lookahead run on
        the bare model, the classifier update's clean pass through the wrapper (its other two
        on the bare model). Returns the classifier's loss, its accuracy on ``x_adv``, and the
        generator's loss.
        """
        net = unwrap(model)
        if isinstance(net, HyperResNet):
            raise ValueError(
                "AT_mng trains a plain ResNet; got a HyperResNet, whose convs are generated "
                "rather than parameters (build the model without embedding_dim)"
            )
        distributed = isinstance(model, nn.parallel.DistributedDataParallel)
        if distributed and not self._ranks_synced:  # as DDP does with the model's parameters
            for tensor in self.generator.state_dict().values():
                dist.broadcast(tensor, src=0)
            self._ranks_synced = True
        pgd = self.attacks[self.norms[drawn_norm(len(self.norms), x.device)]]
        with autocast(x.device, amp), crafted_on(net, attack_bn) as target:
            x_adv = pgd.last_iterate(target, x, y)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        generator_loss = self.update_generator(model, x, x_adv, y, pgd.threat, lr, amp)
        stats = self.update_classifier(model, x, x_adv, y, pgd.threat, optimizer, amp)
        return stats | {"generator_loss": generator_loss}

    def update_generator(
        self,
        model: nn.Module,
        x: Tensor,
        x_adv: Tensor,
        y: Tensor,
        threat: ThreatModel,
        lr: float,
        amp: bool = False,
    ) -> float:
        """Steps 2-4: the lookahead on noise images, then the generator's SGD step on the
        lookahead classifier's loss on ``x_adv``. Touches no classifier parameter or gradient.

        Returns the generator's loss ``CE(f_theta'(x_adv), y)``.
        """
        net = unwrap(model)
        params = dict(net.named_parameters())
        buffers = {name: b.clone() for name, b in net.named_buffers()}  # BN stats stay put
        x_noise = self.noise_image(threat, x)
        with autocast(x.device, amp):
            logits = functional_call(net, (params, buffers), x_noise)
            inner_loss = F.cross_entropy(logits.float(), y)
        grads = torch.autograd.grad(inner_loss, list(params.values()), create_graph=True)
        lookahead = {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
        with autocast(x.device, amp):
            logits = functional_call(net, (lookahead, buffers), x_adv)
            generator_loss = F.cross_entropy(logits.float(), y)
        generator_params = list(self.generator.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        generator_loss.backward(inputs=generator_params)  # into phi only
        if isinstance(model, nn.parallel.DistributedDataParallel):
            for p in generator_params:
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return generator_loss.item()

    def update_classifier(
        self,
        model: nn.Module,
        x: Tensor,
        x_adv: Tensor,
        y: Tensor,
        threat: ThreatModel,
        optimizer: torch.optim.Optimizer,
        amp: bool = False,
    ) -> dict[str, float]:
        """Step 5: the classifier's update on the adversarial loss plus the consistency loss
        over clean, adversarial and fresh noise images (no cross-entropy on clean or noise
        images, as the reference). Touches no generator parameter or gradient."""
        net = unwrap(model)
        with torch.no_grad():
            x_noise = self.noise_image(threat, x)
        with autocast(x.device, amp):
            # three passes in the reference's order, one of them through the DDP wrapper: each
            # wrapped pass broadcasts the BN buffers in place, which cuDNN saved for backward
            logits_clean = model(x)
            logits_noise, logits_adv = net(x_noise), net(x_adv)
            consistency = js_divergence([logits_clean, logits_adv, logits_noise])
            loss = F.cross_entropy(logits_adv.float(), y) + self.js_weight * consistency
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits_adv.argmax(1) == y).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}


# a training method: the inputs a cross-entropy is averaged over, or AT_mng
Method = TrainingInputs | MetaNoiseTraining


@register_method("mng", multi_norm=True)
def meta_noise(
    attacks: Mapping[str, AttackConfig], *, in_channels: int | None, device: torch.device | str
) -> MetaNoiseTraining:
    """AT_mng (MNG-AC): a noise generator trained by a lookahead, with adversarial consistency."""
    if in_channels is None:
        raise ValueError("method 'mng' needs in_channels, its noise generator's input channels")
    return MetaNoiseTraining(attacks, in_channels, device=device)


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    inputs: Method,
    amp: bool = False,
    attack_bn: str = "running",
) -> dict[str, float]:
    """One parameter update on a batch; returns the loss and the accuracy on the trained inputs.

    `model` may be wrapped in DistributedDataParallel; attacks run on the bare model so that
    their gradient computations never touch DDP's reducer, with the BatchNorm statistics
    `attack_bn` says (`crafted_on`). AT_mng makes its own updates (`MetaNoiseTraining.step`).
    """
    if isinstance(inputs, MetaNoiseTraining):
        return inputs.step(model, x, y, optimizer, amp, attack_bn)
    net = unwrap(model)
    with autocast(x.device, amp):
        if isinstance(net, HyperResNet):
            weights = net.generate()
            with net.pinned([w.detach() for w in weights]), crafted_on(net, attack_bn) as target:
                xs = inputs(target, x, y)
            with net.pinned(weights):
                model.train()
                logits = model(torch.cat(xs))
        else:
            with crafted_on(net, attack_bn) as target:
                xs = inputs(target, x, y)
            model.train()
            logits = model(torch.cat(xs))
        targets = y.repeat(len(xs))
        loss = F.cross_entropy(logits.float(), targets)  # equal-size batches: mean of eq. 6 terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = (logits.argmax(1) == targets).float().mean()
    return {"loss": loss.item(), "accuracy": accuracy.item()}


def train_epoch(
    model: nn.Module,
    data: ImageArrays,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    inputs: Method,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    augment: bool = False,
    amp: bool = False,
    attack_bn: str = "running",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """`steps` updates over a `seed`-shuffled pass of `data`; mean loss and accuracy."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    losses, accuracies = [], []
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = data.images[idx].to(device).float().div_(255)
        y = data.labels[idx].to(device)
        if augment:
            x = random_crop_flip(x)
        stats = train_step(model, x, y, optimizer, inputs, amp, attack_bn)
        scheduler.step()
        losses.append(stats["loss"])
        accuracies.append(stats["accuracy"])
    return {"loss": sum(losses) / steps, "train_accuracy": sum(accuracies) / steps}


def param_groups(model: nn.Module, generator_out: bool = False) -> dict[str, list[nn.Parameter]]:
    """A model's parameters by role: a hypernetwork's shared generator (H_p, eq. 11; with
    `generator_out`, its output matrix W_out, B_out apart), its layer embeddings (z, eq. 9), and
    the rest (stem, BatchNorm, head; all of a plain ResNet). Empty groups are left out."""
    groups: dict[str, list[nn.Parameter]] = {group: [] for group in PARAM_GROUPS}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        if generator_out and name in GENERATOR_OUT:
            top = "generator_out"
        groups[top if top in groups else "rest"].append(param)
    return {group: params for group, params in groups.items() if params}


def make_optimizer(
    params: Iterable[nn.Parameter] | Mapping[str, Iterable[nn.Parameter]],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    name: str = "sgd",
    scales: Mapping[str, tuple[float, float]] | None = None,
) -> torch.optim.Optimizer:
    """SGD (with `momentum`), Adam or AdamW over `params`: parameters, or named groups
    (`param_groups`) whose lr and weight decay are `lr` and `weight_decay` times
    ``scales[group] = (lr multiplier, weight-decay multiplier)``.

    Adam's weight decay is an L2 term in the gradient, AdamW's is decoupled; both keep their
    default betas.
    """
    named = dict(params) if isinstance(params, Mapping) else {"rest": params}
    scales = scales or {}
    groups = []
    for group, members in named.items():
        members = list(members)
        if members:
            lr_scale, decay_scale = scales.get(group, (1.0, 1.0))
            groups.append({
                "params": members, "name": group,
                "lr": lr * lr_scale, "weight_decay": weight_decay * decay_scale,
            })  # fmt: skip
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: cosine decay, multistep (x0.1 at 50% and 75%) or constant."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if name == "multistep":
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"unknown lr schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
