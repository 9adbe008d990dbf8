"""The in-process split coordinator never uses a message of another session (no broker).

A coordinator restarted with the same run id repeats round numbers; a device still finishing
the old session's round must be told, not trained on, and must not disturb the new round.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.round_state import RoundState
from cloud.split_trainer import SplitTrainer
from converters.mqtt import MqttConfig
from converters.tensor_codec import encode_tensors
from converters.wire import Envelope, MsgType, decode, encode

DEVICE = "dev-0000"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(tmp_path, **kw) -> tuple[SplitTrainer, RoundState, list[Envelope]]:
    base = dict(
        run_id="run", model="digits-mlp", mode="vanilla", rounds=1, min_clients=1, batch_size=4,
        lr=0.1, momentum=0.9, out_dir=str(tmp_path / "run"), seed=0, prefix="ss",
    )  # fmt: skip
    cfg = FederatedConfig(**{**base, **kw})
    trainer = SplitTrainer(cfg, mqtt=MqttConfig(client_id="cloud", port=1), test_set=None)
    sent: list[Envelope] = []
    trainer._deliver = lambda device, payload: sent.append(decode(payload))
    state = RoundState(round=1, selected=frozenset({DEVICE}))
    trainer._state = state
    trainer.half.begin_round()
    return trainer, state, sent


def _message(kind: MsgType, meta: dict, body: bytes = b"", *, sender=DEVICE) -> bytes:
    env = Envelope(type=kind, run_id="run", round=1, sender=sender, seq=1, meta=meta, body=body)
    return encode(env)


def _activation(step: int, **meta) -> bytes:
    rng = np.random.default_rng(step)
    tensors = {
        "activation": rng.standard_normal((4, 64)).astype(np.float32),
        "labels": rng.integers(0, 10, 4).astype(np.int64),
    }
    meta = {"step": step, "batch": 4, "epoch": 0, **meta}
    return _message(MsgType.ACTIVATION, meta, encode_tensors(tensors))


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.split.cloud.state_dict().items()}


def test_a_step_of_another_session_is_answered_with_an_error_and_never_trained(tmp_path):
    trainer, state, sent = _trainer(tmp_path)

    def arrive(payload: bytes) -> None:
        trainer._on_up("ss/up/dev-0000", DEVICE, payload)
        while not trainer._work._q.empty():  # what the compute thread would serve
            trainer._serve([trainer._work._q.get_nowait()])

    before = _weights(trainer)
    arrive(_activation(1, session="old-session"))  # the old coordinator's device, same round
    (err,) = sent
    assert err.type == MsgType.ERROR and err.meta["step"] == 1
    assert (
        f"meta.session must be this cloud's session {trainer.session!r}, got 'old-session'"
        in err.meta["error"]
    )
    assert state.late == 1 and state.rejected == 0 and state.duplicates == 0
    for k, v in _weights(trainer).items():
        assert torch.equal(v, before[k]), f"{k}: a step of another session was trained"
    # This session's own step 1 is new (the refusal was not cached for it) and is trained.
    arrive(_activation(1, session=trainer.session))
    assert sent[-1].type == MsgType.GRADIENT and sent[-1].meta["step"] == 1
    assert not torch.equal(_weights(trainer)["fc2.weight"], before["fc2.weight"])
    # A step naming no session (a device older than sessions in steps) is taken as before.
    arrive(_activation(2))
    assert sent[-1].type == MsgType.GRADIENT and sent[-1].meta["step"] == 2
    # The old session's later messages: neither its ERROR drops the device from this round
    # nor its UPDATE counts as the device's update; each is counted as late.
    arrive(_message(MsgType.ERROR, {"error": "timed out", "session": "old-session"}))
    arrive(_message(MsgType.UPDATE, {"num_samples": 4, "session": "old-session"}))
    assert state.late == 3 and state.rejected == 0
    assert DEVICE not in state.dropped and DEVICE not in state.updates
    assert len(sent) == 3  # only steps are answered


def test_a_half_update_of_another_session_is_not_averaged(tmp_path):
    trainer, state, _ = _trainer(tmp_path, mode="splitfed-v1", split_workers=1)
    params = {k: v.detach().numpy() for k, v in trainer.split.cloud.state_dict().items()}
    body = encode_tensors(params, codec="float32")

    def half_update(**meta) -> bytes:
        return _message(MsgType.HALF_UPDATE, {"device": DEVICE, **meta}, body, sender="w0")

    trainer._on_worker("ss/workers/w0/up", "w0", half_update(session="old-session"))
    assert trainer._half_updates == {} and state.late == 1 and state.rejected == 0
    trainer._on_worker("ss/workers/w0/up", "w0", half_update(session=trainer.session))
    assert list(trainer._half_updates) == [DEVICE] and state.duplicates == 0
