"""Optimizer groups and learning-rate schedules."""

import pytest
import torch

from veofast.optim import build_lr_scheduler, build_optimizer, lr_multiplier


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.input_layernorm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_norms_and_biases():
    model = Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # proj.bias, norm weight and bias
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


def test_fused_switch_of_veomni():
    """``fused`` (VeOmni's argument): None and True keep veofast's own step, False takes torch's foreach step."""
    assert build_optimizer(Tiny(), fused=True).defaults["foreach"] is None
    foreach = build_optimizer(Tiny(), fused=False)
    assert foreach.backend == "torch" and all(g["foreach"] for g in foreach.param_groups)


@pytest.mark.parametrize("kwargs, message", [({"lr": 0}, "lr must be > 0"), ({"optimizer_type": "sgd"}, "adamw"),
                                             ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
                                             ({"fused": False, "backend": "triton"}, "fused=False")])
def test_optimizer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(Tiny(), **kwargs)


def schedule(style, steps=10, warmup=0.2, lr_min=0.1, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, train_steps=steps, lr=1.0, lr_min=lr_min, lr_warmup_ratio=warmup,
                               lr_decay_style=style, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_decay_shapes():
    cosine = schedule("cosine")
    assert cosine[:2] == pytest.approx([0.5, 1.0])  # 2 warm-up steps
    assert cosine[2] == pytest.approx(1.0) and cosine[-1] > 0.1 and all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    linear = schedule("linear", warmup=0.0)
    assert linear[0] == 1.0 and linear[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule("constant", warmup=0.0) == [1.0] * 10
    assert lr_multiplier(100, train_steps=10, warmup_steps=0, decay_steps=10, style="cosine", min_ratio=0.1) == 0.1


@pytest.mark.parametrize(
    "style, steps, warmup, kwargs, expected",
    [("cosine", 1, 0.0, {}, [1.0]), ("cosine", 1, 1.0, {}, [1.0]), ("linear", 4, 1.0, {}, [0.25, 0.5, 0.75, 1.0]),
     ("linear", 10, 0.0, {"lr_decay_ratio": 0.5, "lr_min": 0.2}, [1.0, 0.84, 0.68, 0.52, 0.36] + [0.2] * 5),
     ("constant", 4, 0.5, {}, [0.5, 1.0, 1.0, 1.0])],
)
def test_schedule_edges(style, steps, warmup, kwargs, expected):
    """One step, warm-up over all steps, decay over half of them then lr_min, warm-up then constant."""
    assert schedule(style, steps, warmup, **{"lr_min": 0.1, **kwargs}) == pytest.approx(expected)


def test_scheduler_state_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, train_steps=10, lr_warmup_ratio=0.1)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_lr_scheduler(opt2, train_steps=10, lr_warmup_ratio=0.1)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr_decay_style": "step"}, "lr_decay_style"), ({"train_steps": 0}, "train_steps"),
     ({"lr_warmup_ratio": 2.0}, "lr_warmup_ratio"), ({"lr_min": 5.0}, "lr_min"),
     ({"lr_min": -0.5}, "lr_min must be >= 0"), ({"lr_decay_ratio": 0.0}, "lr_decay_ratio must be in"),
     ({"lr_decay_ratio": -1.0}, "lr_decay_ratio must be in"), ({"train_steps": 2.5}, "train_steps must be an int"),
     ({"lr": -1.0, "lr_min": -2.0}, "peak lr must be > 0")],
)
def test_scheduler_errors(kwargs, message):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        build_lr_scheduler(opt, **{"train_steps": 10, **kwargs})


def test_resume_follows_the_new_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    short = build_lr_scheduler(opt, train_steps=4, lr_decay_style="linear")
    for _ in range(2):
        opt.step()
        short.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = build_lr_scheduler(opt2, train_steps=10, lr_decay_style="linear")
    longer.load_state_dict(short.state_dict())
    opt2.step()
    longer.step()
    assert longer.last_epoch == 3 and longer.get_last_lr()[0] == pytest.approx(0.7)


@pytest.mark.parametrize("peak", [1.0, 2.0])
def test_resume_sets_the_new_lr_before_the_first_step(peak):
    """After the optimizer's state (which carries the old lr) and the scheduler's are loaded, the next step already
    runs at the new schedule's lr, peak lr included."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    short = build_lr_scheduler(opt, train_steps=4, lr_decay_style="linear")
    for _ in range(2):
        opt.step()
        short.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    longer = build_lr_scheduler(opt2, train_steps=10, lr_decay_style="linear")
    opt2.load_state_dict(opt.state_dict())
    longer.load_state_dict(short.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.8 * peak)
    assert longer.get_last_lr() == [opt2.param_groups[0]["lr"]]
