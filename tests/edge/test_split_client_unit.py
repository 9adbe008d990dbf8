"""SplitClient without a broker: torch-free import, step bookkeeping, option validation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from converters.mqtt import MqttConfig
from converters.tensor_codec import encode_tensors
from converters.wire import Envelope, MsgType, encode
from edge.split_client import SplitClient, SplitClientOptions, device_seed, round_seed


def _client() -> SplitClient:
    return SplitClient(
        options=SplitClientOptions(device_id="pi-01", prefix="t"),
        mqtt=MqttConfig(client_id="pi-01", port=1),  # never connected
        x=np.zeros((4, 1, 8, 8), np.float32),
        y=np.arange(4),
    )


def _grad(step, round_=1, run_id="r", kind=MsgType.GRADIENT) -> bytes:
    env = Envelope(
        type=kind, run_id=run_id, round=round_, sender="cloud", seq=1,
        meta={"step": step}, body=encode_tensors({"grad": np.zeros((4, 64), np.float32)}),
    )  # fmt: skip
    return encode(env)


def test_split_client_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; import edge.split_client; "
        "print(sys.modules.get('torch', 'absent') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_gradient_for_unknown_step_is_rejected_with_reason():
    c = _client()
    try:
        c._on_down("t/down/pi-01", "cloud", _grad(7))
        assert c.rejected == 1
        assert "GRADIENT for unknown step 7" in c.reasons[0] and "pending: none" in c.reasons[0]
        c._pending = ("r", 1, 8, MsgType.GRADIENT)
        c._on_down("t/down/pi-01", "cloud", _grad(7))  # old step
        c._on_down("t/down/pi-01", "cloud", _grad(8, round_=2))  # right step, wrong round
        c._on_down("t/down/pi-01", "cloud", _grad(8, run_id="other"))  # wrong run
        # U-shaped: a repeated LOGITS for this step (its ACTIVATION was resent) is not the
        # GRADIENT the device now awaits.
        c._on_down("t/down/pi-01", "cloud", _grad(8, kind=MsgType.LOGITS))
        assert c.rejected == 5 and "\n" not in "".join(c.reasons)
        assert "which awaits GRADIENT: a repeated reply" in c.reasons[-1]
        c._on_down("t/down/pi-01", "cloud", _grad(8))  # the awaited one is taken
        assert c.rejected == 5
        assert c._replies.get_nowait().meta["step"] == 8
    finally:
        c.endpoint.close()


def test_options_are_validated_and_seeds_are_stable():
    with pytest.raises(ValueError, match="vanish_prob must be in"):
        SplitClientOptions(device_id="pi-01", vanish_prob=2.0)
    with pytest.raises(ValueError, match="step_timeout must be > 0"):
        SplitClientOptions(device_id="pi-01", step_timeout=0)
    with pytest.raises(ValueError, match="device_id"):
        SplitClientOptions(device_id="bad/id")
    assert device_seed("dev-0000") == device_seed("dev-0000") != device_seed("dev-0001")
    assert round_seed("dev-0000", 2) == round_seed("dev-0000", 1) + 1


def test_devices_of_one_process_build_their_halves_concurrently():
    # fx tracing patches nn.Module.__call__ process-wide; a device probing or running its model
    # while another traces used to fail with "module is not installed as a submodule".
    import threading

    import torch

    torch.set_num_threads(1)
    clients = [_client() for _ in range(16)]
    errors, built = [], []

    def build(c):
        try:
            built.append(c._build("digits-mlp", "act1", None))
            built[-1].cloud(built[-1].edge(torch.zeros(2, 1, 8, 8)))
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    try:
        threads = [threading.Thread(target=build, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(built) == 16
        with torch.no_grad():
            built[0].edge.fc1.weight.add_(1.0)  # one device's training must not touch another's
        w = [b.edge.state_dict()["fc1.weight"] for b in built[:3]]
        assert not torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    finally:
        for c in clients:
            c.endpoint.close()


def test_split_dp_state_survives_a_device_restart(tmp_path):
    """Randomized labels and the ledger come back from the state folder: drawing the labels
    again would spend label_epsilon twice, restarting the ledger would under-report."""
    from split.graph import split_template
    from split.privacy.split_dp import SplitDP

    dp = SplitDP(act_clip=1.0, act_sigma=2.0, param_clip=1.0, param_sigma=2.0, delta=1e-5,
                 label_epsilon=1.0, num_classes=10)  # fmt: skip
    cfg = {"dp": dp.to_meta()}
    y = np.arange(2000) % 10

    def device():
        return SplitClient(
            options=SplitClientOptions(device_id="pi-01", prefix="t", state_dir=str(tmp_path)),
            mqtt=MqttConfig(client_id="pi-01", port=1),  # never connected
            x=np.zeros((2000, 1, 8, 8), np.float32),
            y=y,
        )

    first = device()
    trainer = first._setup_dp("run-1", cfg, "vanilla", split_template("digits-mlp-tanh", "act1"))
    labels = trainer.released_labels(y).copy()
    assert (labels != y).any()
    for _ in range(3):
        trainer.begin_epoch()
        first._save_dp("run-1")
    eps = trainer.epsilon()

    again = device()  # a new process: fresh generators, same state folder
    back = again._setup_dp("run-1", cfg, "vanilla", split_template("digits-mlp-tanh", "act1"))
    np.testing.assert_array_equal(back.released_labels(y), labels)
    assert back.releases == 3 and back.epsilon() == eps
    other = again._setup_dp("run-2", cfg, "vanilla", split_template("digits-mlp-tanh", "act1"))
    assert other.releases == 0  # a ledger per run
    with pytest.raises(Exception, match="run_id must name a folder"):
        again._dp_state_path("..")
    wrong = {"dp": {**dp.to_meta(), "act_sigma": 3.0}}
    with pytest.raises(Exception, match="saved under other settings"):
        device()._setup_dp("run-1", wrong, "vanilla", split_template("digits-mlp-tanh", "act1"))
