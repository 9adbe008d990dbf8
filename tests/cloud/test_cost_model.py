"""The split-vs-FedAvg byte model against hand computations for digits-mlp."""

from __future__ import annotations

import pytest
import torch

from cloud.cost_model import describe, split_vs_fedavg_bytes

# digits-mlp: fc1 64->64 (4160 values), fc2 64->32 (2080), fc3 32->10 (330): 6570 in all.
MLP_VALUES, FC1, FC3 = 6570, 4160, 330


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_vanilla_digits_mlp_matches_hand_computation():
    cost = split_vs_fedavg_bytes(
        model="digits-mlp", cut="act1", input_shape=(1, 8, 8),
        samples_per_client=[100, 50], epochs=2,
    )  # fmt: skip
    # Per sample: 64 float32 up + int64 label up, 64 float32 gradient down.
    assert cost["bytes_up_per_sample"] == 64 * 4 + 8
    assert cost["bytes_down_per_sample"] == 64 * 4
    assert cost["split_bytes_per_epoch"] == 150 * (64 * 4 + 8 + 64 * 4)  # 78,000
    assert cost["split_bytes"] == 2 * 78_000
    assert cost["split_sync_bytes"] == 2 * FC1 * 4 * 2  # edge half down + up, 2 clients
    assert cost["fedavg_bytes"] == 2 * MLP_VALUES * 4 * 2  # 105,120
    assert cost["split_total_bytes"] == 156_000 + 66_560
    assert cost["cheaper"] == "fedavg"
    assert cost["ratio"] == pytest.approx(222_560 / 105_120)


def test_few_samples_make_split_cheaper_and_codec_scales_activations():
    cost = split_vs_fedavg_bytes(
        model="digits-mlp", cut="act1", input_shape=(1, 8, 8),
        samples_per_client=[3, 3], epochs=1, codec_bytes_per_value=2,
    )  # fmt: skip
    assert cost["split_bytes"] == 6 * (64 * 2 + 8 + 64 * 2)
    assert cost["split_total_bytes"] == 6 * 264 + 2 * FC1 * 4 * 2
    assert cost["cheaper"] == "split"
    assert "split is cheaper" in describe(cost)


def test_ushaped_moves_middle_output_instead_of_labels():
    cost = split_vs_fedavg_bytes(
        model="digits-mlp", cut="act1", head_cut="act2", mode="ushaped",
        input_shape=(1, 8, 8), samples_per_client=[10], epochs=1,
    )  # fmt: skip
    # Up: activation (64) + gradient of the 32-value middle output; down: middle output + grad.
    assert cost["bytes_up_per_sample"] == (64 + 32) * 4
    assert cost["bytes_down_per_sample"] == (32 + 64) * 4
    assert cost["split_sync_bytes"] == 2 * (FC1 + FC3) * 4


def test_accepts_a_module_and_rejects_bad_arguments():
    from split.zoo import build_model

    model, _ = build_model("digits-cnn", seed=0)
    cost = split_vs_fedavg_bytes(
        model=model, cut="pool2", input_shape=(1, 8, 8), samples_per_client=[5], epochs=1
    )
    assert cost["activation_values"] == 16 * 2 * 2
    with pytest.raises(ValueError, match="mode="):
        split_vs_fedavg_bytes(
            model="digits-mlp", cut="act1", input_shape=(1, 8, 8),
            samples_per_client=[1], epochs=1, mode="bogus",
        )  # fmt: skip
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        split_vs_fedavg_bytes(
            model="digits-mlp", cut="act1", input_shape=(1, 8, 8), samples_per_client=[1], epochs=0
        )
