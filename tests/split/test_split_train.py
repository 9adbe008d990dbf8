"""Centralized training on sklearn digits, evaluation oracle, determinism and FedProx."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split

from split.graph import split_model
from split.train import evaluate, train_centralized, train_epochs
from split.zoo import build_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)


def test_digits_cnn_reaches_90_percent_held_out(digits):
    x_tr, x_te, y_tr, y_te = digits
    model, _ = build_model("digits-cnn", seed=0)
    untrained, _ = evaluate(model, x_te, y_te)
    start = time.perf_counter()
    train_centralized(model, x_tr, y_tr, epochs=12, lr=0.05, momentum=0.9, seed=0)
    seconds = time.perf_counter() - start
    accuracy, loss = evaluate(model, x_te, y_te)
    assert untrained < 0.3
    assert accuracy >= 0.9, accuracy
    assert seconds < 30, seconds


def test_evaluate_matches_sklearn_metrics(digits, rng):
    _, x_te, _, y_te = digits
    model, _ = build_model("digits-mlp", seed=1)
    model.train()
    accuracy, loss = evaluate(model, x_te, y_te, batch_size=37)  # uneven batches
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        probs = torch.softmax(model(torch.from_numpy(x_te)).double(), dim=1).numpy()
    assert accuracy == pytest.approx(accuracy_score(y_te, probs.argmax(1)))
    assert loss == pytest.approx(log_loss(y_te, probs, labels=list(range(10))), rel=1e-4)


def test_training_is_deterministic_per_seed(digits):
    x_tr, _, y_tr, _ = digits
    states = []
    for seed in (3, 3, 4):
        model, _ = build_model("digits-mlp", seed=0)
        train_epochs(model, x_tr[:300], y_tr[:300], epochs=2, batch_size=16, lr=0.1, seed=seed)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_training_split_model_equals_training_unsplit(digits):
    x_tr, _, y_tr, _ = digits
    model, spec = build_model("digits-cnn", seed=0)
    twin = copy.deepcopy(model)
    sm = split_model(twin, cut="pool2", example_input=torch.zeros(1, *spec.input_shape))
    kw = dict(epochs=1, batch_size=32, lr=0.05, seed=7, momentum=0.9)
    r1 = train_epochs(model, x_tr[:256], y_tr[:256], **kw)
    r2 = train_epochs(sm, x_tr[:256], y_tr[:256], **kw)
    assert r1 == r2 and r1["samples"] == 256 and r1["steps"] == 8
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_proximal_term_matches_manual_gradient():
    """One full-batch step with FedProx equals SGD on CE plus mu * (w - w_global)."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(16, 1, 8, 8)).astype(np.float32)
    y = gen.integers(0, 10, size=16)
    model, _ = build_model("digits-mlp", seed=0)
    anchor, _ = build_model("digits-mlp", seed=1)
    oracle = copy.deepcopy(model)
    mu, lr = 0.7, 0.1
    prox = dict(proximal_mu=mu, global_params=anchor.state_dict())
    train_epochs(model, x, y, epochs=1, batch_size=16, lr=lr, seed=0, **prox)
    loss = torch.nn.functional.cross_entropy(oracle(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    with torch.no_grad():
        for (name, p), a in zip(oracle.named_parameters(), anchor.parameters(), strict=True):
            expected = p - lr * (p.grad + mu * (p - a))
            torch.testing.assert_close(dict(model.named_parameters())[name], expected)


def test_proximal_default_anchor_is_starting_weights(digits):
    x_tr, _, y_tr, _ = digits
    free, _ = build_model("digits-mlp", seed=0)
    held, _ = build_model("digits-mlp", seed=0)
    start = [p.detach().clone() for p in held.parameters()]
    kw = dict(epochs=2, batch_size=32, lr=0.1, seed=0)
    train_epochs(free, x_tr, y_tr, **kw)
    train_epochs(held, x_tr, y_tr, proximal_mu=5.0, **kw)

    def drift(m):
        return sum(
            float((p.detach() - s).norm()) for p, s in zip(m.parameters(), start, strict=True)
        )

    assert drift(held) < 0.5 * drift(free)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(epochs=-1), "epochs must be >= 0, got -1"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(proximal_mu=-0.5), "proximal_mu must be >= 0, got -0.5"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(kwargs, message):
    model, _ = build_model("digits-mlp", seed=0)
    args = dict(epochs=1, batch_size=8, lr=0.1, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        train_epochs(model, np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, int), **args)
