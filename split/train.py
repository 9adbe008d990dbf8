"""Plain centralized SGD training and evaluation: the reference federated runs are judged by."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

_Model = Any  # nn.Module or split.graph.SplitModel: anything with parameters(), train(), call


def _check_data(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("training data must not be empty, got 0 samples")


def _check_hparams(epochs: int, batch_size: int, lr: float, momentum: float, mu: float) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {mu}")


def _dtype(model: _Model) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _as_tensors(model: _Model, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(np.asarray(x), dtype=_dtype(model)),
        torch.as_tensor(np.asarray(y), dtype=torch.long),
    )


def _global_tensors(
    params: list[nn.Parameter], global_params: Iterable[torch.Tensor] | Mapping | None, model
) -> list[torch.Tensor]:
    if global_params is None:
        # FedProx anchors to the model the device received, i.e. its weights before training.
        return [p.detach().clone() for p in params]
    if isinstance(global_params, Mapping):
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        missing = [name for name in names if name not in global_params]
        if missing:
            raise ValueError(f"global_params lacks parameters: {', '.join(missing[:3])}")
        return [torch.as_tensor(global_params[name]).detach() for name in names]
    anchors = [torch.as_tensor(t).detach() for t in global_params]
    if len(anchors) != len(params):
        raise ValueError(
            f"global_params must hold one tensor per parameter ({len(params)}), got {len(anchors)}"
        )
    return anchors


def train_epochs(
    model: _Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    global_params: Iterable[torch.Tensor] | Mapping | None = None,
) -> dict:
    """Local SGD on (x, y) with cross-entropy, optionally with the FedProx proximal term.

    Args:
        model: An nn.Module or a SplitModel; trained in place, left in train mode.
        x: Inputs, shape ``(N, *input_shape)``.
        y: Integer class labels, shape ``(N,)``.
        epochs: Passes over the data (each reshuffled).
        batch_size: Samples per step; the last batch of an epoch may be smaller.
        lr: SGD learning rate.
        seed: Seeds the shuffling and any randomness inside the model (dropout).
        momentum: SGD momentum.
        proximal_mu: FedProx ``mu``: adds ``mu/2 * ||w - w_global||^2`` to the loss.
        global_params: The global weights for FedProx, as tensors in ``parameters()`` order or a
            state dict; defaults to the model's weights before training.

    Returns:
        ``{"loss": mean loss of the last epoch, "samples": N, "steps": optimizer steps}``.
    """
    _check_data(x, y)
    _check_hparams(epochs, batch_size, lr, momentum, proximal_mu)
    xt, yt = _as_tensors(model, x, y)
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = _global_tensors(params, global_params, model) if proximal_mu > 0 else []
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    order_rng = np.random.default_rng(seed)
    model.train()
    steps, last_loss = 0, float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.as_tensor(order_rng.permutation(len(xt)))
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = loss_fn(model(xt[idx]), yt[idx])
                total += float(loss.detach()) * len(idx)
                count += len(idx)
                if proximal_mu > 0:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + 0.5 * proximal_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            last_loss = total / count
    return {"loss": last_loss, "samples": len(xt), "steps": steps}


def train_centralized(
    model: _Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    momentum: float = 0.0,
) -> _Model:
    """Trains ``model`` on all the data in one place (the non-federated baseline).

    Returns:
        The same model, trained in place.
    """
    train_epochs(
        model,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        momentum=momentum,
    )
    return model


def evaluate(
    model: _Model, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on (x, y), in eval mode.

    The model's train/eval mode is restored afterwards.

    Returns:
        (accuracy in [0, 1], mean cross-entropy loss).
    """
    _check_data(x, y)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    xt, yt = _as_tensors(model, x, y)
    was_training = _training(model)
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(xt), batch_size):
                logits = model(xt[start : start + batch_size])
                target = yt[start : start + batch_size]
                loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
                correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return correct / len(xt), loss_sum / len(xt)


def _training(model: _Model) -> bool:
    if isinstance(model, nn.Module):
        return model.training
    return bool(getattr(model, "edge", model).training)
