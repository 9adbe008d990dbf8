"""Tests for the device-side DP-SGD trainer (Opacus engine persisting across rounds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModule
from sklearn.datasets import load_digits
from torch import nn

from split.errors import PrivacyBudgetExceededError, PrivacyConfigError
from split.privacy import DPConfig, DPTrainer, fix_model

DELTA = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The CI box has 2 shared cores; torch's thread pool spinning against other processes
    # makes these tiny models 10-20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        *norm,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def trainer(model, *, n, rounds=2, epochs=1, batch=64, lr=0.5, seed=0, **cfg) -> DPTrainer:
    cfg = {"mode": "sample", **cfg}
    if "target_epsilon" not in cfg:
        cfg.setdefault("noise_multiplier", 1.0)
    return DPTrainer(
        model,
        config=DPConfig(**cfg),
        sample_size=n,
        batch_size=batch,
        lr=lr,
        epochs_per_round=epochs,
        rounds=rounds,
        seed=seed,
    )


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x)).argmax(1).numpy() == y).mean())


@pytest.mark.parametrize(("name", "oracle_cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_a_fresh_opacus_accountant(digits, name, oracle_cls):
    x, y, _, _ = digits
    t = trainer(cnn(), n=len(x), noise_multiplier=1.1, accountant=name)
    results = [t.train_round(x, y) for _ in range(2)]
    steps = sum(r["steps"] for r in results)
    assert steps == 2 * t.steps_per_epoch
    oracle = oracle_cls()
    for _ in range(steps):
        oracle.step(noise_multiplier=1.1, sample_rate=1 / t.steps_per_epoch)
    assert t.epsilon() == oracle.get_epsilon(DELTA) == results[-1]["epsilon"]
    # One hook on one wrapped module: a double privatization would count every step twice.
    assert t.ledger.steps == steps


def test_run_stops_before_exceeding_its_budget(digits):
    x, y, _, _ = digits
    t = trainer(cnn(), n=len(x), target_epsilon=1.5, rounds=2, epochs=1)
    epsilons = [t.train_round(x, y)["epsilon"] for _ in range(2)]
    assert epsilons[0] < epsilons[1] <= 1.5
    params, ledger = t.state_dict(), t.ledger_state()
    with pytest.raises(PrivacyBudgetExceededError, match="> target_epsilon=1.5"):
        t.train_round(x, y)
    # Nothing was spent or changed by the refused round.
    assert t.epsilon() == epsilons[1] <= 1.5
    assert t.ledger_state() == ledger
    assert all(torch.equal(params[k], v) for k, v in t.state_dict().items())


def test_state_dict_keys_and_two_rounds_with_load_state(digits):
    x, y, _, _ = digits
    model = cnn()
    keys = list(model.state_dict())
    t = trainer(model, n=len(x))
    assert list(t.state_dict()) == keys
    assert t.fix_report == []
    t.train_round(x, y)
    assert list(t.state_dict()) == keys
    assert not any(k.startswith("_module.") for k in t.state_dict())
    # The cloud sends a new global model (here: as NumPy arrays) between rounds.
    torch.manual_seed(1)
    new_global = {
        k: v.numpy() + 0.01 * np.random.randn(*v.shape) for k, v in cnn(3).state_dict().items()
    }
    t.load_state(new_global)
    loaded = t.state_dict()
    for k, v in new_global.items():
        assert torch.equal(loaded[k], torch.as_tensor(v.astype(np.float32)))
    t.train_round(x, y)
    assert isinstance(t._module, GradSampleModule)
    assert not isinstance(t._module._module, GradSampleModule)
    assert t._module._module is t.model
    assert t.ledger.steps == 2 * t.steps_per_epoch
    # The caller's model was copied, never wrapped or trained in place.
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), cnn().state_dict().values(), strict=True)
    )


def test_batchnorm_model_is_fixed_with_a_report(digits):
    x, y, _, _ = digits
    model = cnn(batchnorm=True)
    t = trainer(model, n=len(x))
    assert t.fix_report == ["BatchNorm2d(1) -> GroupNorm"]
    fixed_keys = list(fix_model(model)[0].state_dict())
    assert list(t.state_dict()) == fixed_keys
    assert "1.running_mean" not in fixed_keys and "1.weight" in fixed_keys
    t.train_round(x, y)
    with pytest.raises(PrivacyConfigError, match=r"unexpected: \['1.num_batches_tracked'"):
        t.load_state(model.state_dict())


class _Scaled(nn.Module):
    """A trainable layer with a buffer Opacus cannot keep private."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        return x * self.scale


def test_unfixable_model_lists_offending_modules():
    model = nn.Sequential(nn.Flatten(), _Scaled(), nn.Linear(64, 10), _Scaled())
    with pytest.raises(PrivacyConfigError) as info:
        fix_model(model)
    assert str(info.value).endswith(
        "offending modules: 1 (_Scaled): has non-private buffers; "
        "3 (_Scaled): has non-private buffers"
    )


def test_noiseless_step_equals_per_sample_clipping_oracle(digits):
    """With sigma=0 and q=1 one DP-SGD step is plain per-sample clipping, computed by hand."""
    x, y, _, _ = digits
    x, y = x[:32], y[:32]
    model = cnn(seed=4)
    clip, lr = 0.05, 0.5
    t = DPTrainer(
        model,
        config=DPConfig(mode="sample", noise_multiplier=0.0, max_grad_norm=clip, delta=1e-3),
        sample_size=32,
        batch_size=32,
        lr=lr,
        epochs_per_round=1,
        rounds=None,
        seed=0,
    )
    assert t.steps_per_epoch == 1 and t.sample_rate == 1.0
    ref = cnn(seed=4)
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(32):
        ref.zero_grad()
        nn.functional.cross_entropy(
            ref(torch.as_tensor(x[i : i + 1])), torch.as_tensor(y[i : i + 1])
        ).backward()
        grads = [p.grad.detach().clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [a + factor * g for a, g in zip(total, grads, strict=True)]
    expected = [p.detach() - lr * g / 32 for p, g in zip(ref.parameters(), total, strict=True)]
    out = t.train_round(x, y)
    assert out["samples"] == 32 and out["steps"] == 1
    for got, want in zip(t.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_same_seed_reproduces_and_other_seed_differs(digits):
    x, y, _, _ = digits
    a, b, c = (trainer(cnn(), n=len(x), seed=s) for s in (7, 7, 8))
    for t in (a, b, c):
        t.train_round(x, y)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_ledger_state_resumes_on_a_new_trainer(digits):
    x, y, _, _ = digits
    t = trainer(cnn(), n=len(x), noise_multiplier=0.9)
    t.train_round(x, y)
    saved = t.ledger_state()
    restarted = trainer(cnn(), n=len(x), noise_multiplier=0.9)
    restarted.load_ledger_state(saved)
    restarted.load_state(t.state_dict())
    t.train_round(x, y)
    restarted.train_round(x, y)
    assert restarted.epsilon() == t.epsilon()


def test_bad_trainer_settings_raise_one_line_errors(digits):
    x, y, _, _ = digits
    with pytest.raises(PrivacyConfigError, match=r"delta must be < 1/N = 0.01 for N=100 records"):
        trainer(cnn(), n=100, delta=0.05, batch=10)
    with pytest.raises(PrivacyConfigError, match="rounds must be set when target_epsilon"):
        trainer(cnn(), n=len(x), target_epsilon=2.0, rounds=None)
    with pytest.raises(PrivacyConfigError, match="target_epsilon=0.05 is infeasible"):
        trainer(cnn(), n=len(x), target_epsilon=0.05, rounds=100, epochs=5)
    t = trainer(cnn(), n=len(x))
    with pytest.raises(PrivacyConfigError, match=r"sample_size=1400 rows .* got len\(x\)=10"):
        t.train_round(x[:10], y[:10])
    with pytest.raises(PrivacyConfigError, match="DPTrainer needs config.mode='sample'"):
        DPTrainer(
            cnn(),
            config=DPConfig(mode="user", noise_multiplier=1.0),
            sample_size=len(x),
            batch_size=64,
            lr=0.1,
            epochs_per_round=1,
            rounds=1,
            seed=0,
        )


def _digits_accuracy(digits, *, epochs: int, batch: int, lr: float) -> tuple[float, float]:
    x, y, xt, yt = digits
    t = trainer(cnn(), n=len(x), target_epsilon=3.0, rounds=1, epochs=epochs, batch=batch, lr=lr)
    out = t.train_round(x, y)
    return accuracy(t.model, xt, yt), out["epsilon"]


def test_dpsgd_learns_digits_at_epsilon_3(digits):
    acc, eps = _digits_accuracy(digits, epochs=4, batch=64, lr=1.0)
    print(f"digits DP-SGD, 4 epochs: held-out accuracy {acc:.3f} at epsilon {eps:.3f}")
    assert eps <= 3.0
    # Chance is 0.1; this small CNN gets ~0.89 at (3, 1e-5)-DP in 4 epochs.
    assert acc > 0.8


@pytest.mark.slow
def test_dpsgd_digits_longer_run(digits):
    acc, eps = _digits_accuracy(digits, epochs=15, batch=256, lr=2.0)
    print(f"digits DP-SGD, 15 epochs: held-out accuracy {acc:.3f} at epsilon {eps:.3f}")
    assert eps <= 3.0
    assert acc > 0.88


def test_empty_poisson_batches_still_step_and_stay_finite():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=100)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    # q = 1/100: about a third of the Poisson batches are empty.
    t = trainer(model, n=100, batch=1, delta=1e-3)
    out = t.train_round(x, y)
    assert out["steps"] == t.ledger.steps == 100
    assert out["samples"] < 100 and np.isfinite(out["loss"])
    assert all(torch.isfinite(v).all() for v in t.state_dict().values())


def test_steps_per_epoch_mirror_opacus_float_rounding():
    # 1 / (1 / 93) == 92.99999999999999: Opacus' sampler runs 92 batches per epoch.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(93, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=93)
    t = trainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), n=93, batch=1, delta=1e-3)
    assert t.sample_rate == 1 / 93 and t.steps_per_epoch == 92
    assert t.train_round(x, y)["steps"] == t.ledger.steps == 92


def test_momentum_applies_to_the_privatized_gradient(digits):
    """sigma=0, q=1, two steps: SGD momentum on per-sample-clipped gradients, computed by hand."""
    x, y, _, _ = digits
    x, y = x[:16], y[:16]
    clip, lr, mom = 0.05, 0.5, 0.7

    def clipped_mean(model):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(16):
            model.zero_grad()
            nn.functional.cross_entropy(
                model(torch.as_tensor(x[i : i + 1])), torch.as_tensor(y[i : i + 1])
            ).backward()
            grads = [p.grad.detach().clone() for p in model.parameters()]
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            factor = min(1.0, clip / (float(norm) + 1e-6))
            total = [a + factor * g for a, g in zip(total, grads, strict=True)]
        return [g / 16 for g in total]

    t = DPTrainer(
        cnn(seed=5),
        config=DPConfig(mode="sample", noise_multiplier=0.0, max_grad_norm=clip, delta=1e-3),
        sample_size=16,
        batch_size=16,
        lr=lr,
        epochs_per_round=2,
        rounds=None,
        seed=0,
        momentum=mom,
    )
    ref = cnn(seed=5)
    velocity = None
    for _ in range(2):
        g = clipped_mean(ref)
        velocity = (
            g if velocity is None else [mom * v + gi for v, gi in zip(velocity, g, strict=True)]
        )
        with torch.no_grad():
            for p, v in zip(ref.parameters(), velocity, strict=True):
                p -= lr * v
    t.train_round(x, y)
    for got, want in zip(t.model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(PrivacyConfigError, match=r"momentum must be in \[0, 1\), got 1.0"):
        DPTrainer(
            cnn(),
            config=DPConfig(mode="sample", noise_multiplier=1.0),
            sample_size=16,
            batch_size=16,
            lr=0.1,
            epochs_per_round=1,
            rounds=None,
            seed=0,
            momentum=1.0,
        )
