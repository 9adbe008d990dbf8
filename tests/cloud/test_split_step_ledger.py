"""The step ledger: a repeated or stale step message is never trained on twice (no broker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.config import FederatedConfig
from cloud.round_state import RoundState
from cloud.split_steps import StepLedger
from cloud.split_trainer import SplitTrainer
from cloud.split_worker import SplitStepWorker
from converters.mqtt import MqttConfig
from converters.tensor_codec import encode_tensors
from converters.wire import Envelope, MsgType, decode, encode

ACT, LG = MsgType.ACTIVATION, MsgType.LOGIT_GRADIENT


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_steps_older_than_the_last_answered_one_are_stale():
    ledger = StepLedger()
    assert ledger.admit("d", (1, 1, ACT)) == StepLedger.NEW
    assert ledger.admit("d", (1, 1, ACT)) == StepLedger.QUEUED
    ledger.answered("d", (1, 1, ACT), b"g1")
    assert ledger.admit("d", (1, 1, ACT)) == b"g1"  # the step in hand: its reply again
    assert ledger.admit("d", (1, 2, ACT)) == StepLedger.NEW
    ledger.answered("d", (1, 2, ACT), b"g2")
    # Step 1 again after step 2 was answered: a resend that crossed its reply, a redelivery.
    assert ledger.admit("d", (1, 1, ACT)) == StepLedger.STALE
    assert ledger.admit("d", (1, 2, ACT)) == b"g2"
    assert ledger.admit("other", (1, 1, ACT)) == StepLedger.NEW  # per device
    # A new round (or, on a worker, a new run: another identity) numbers its steps from 1.
    assert ledger.admit("d", (2, 1, ACT)) == StepLedger.NEW
    ledger.forget("d")
    assert ledger.admit("d", (1, 1, ACT)) == StepLedger.NEW


def test_ushaped_activation_comes_before_the_logit_gradient_of_its_step():
    ledger = StepLedger()
    ledger.admit("d", (1, 3, ACT))
    ledger.answered("d", (1, 3, ACT), b"logits3")
    assert ledger.admit("d", (1, 3, LG)) == StepLedger.NEW  # the second half of step 3
    ledger.answered("d", (1, 3, LG), b"grad3")
    assert ledger.admit("d", (1, 3, ACT)) == StepLedger.STALE  # would run a second forward
    assert ledger.admit("d", (1, 2, LG)) == StepLedger.STALE
    assert ledger.admit("d", (1, 3, LG)) == b"grad3"
    # A late answer to an older step does not move the ledger back.
    ledger.answered("d", (1, 2, LG), b"late")
    assert ledger.admit("d", (1, 3, LG)) == b"grad3"


def test_a_refused_step_is_answered_again_but_makes_no_step_stale():
    # A bogus step id (a malformed message, or one sent in the device's name) is refused with
    # an ERROR; the device's real steps after it must still be served.
    ledger = StepLedger()
    ledger.admit("d", (1, 2, ACT))
    ledger.answered("d", (1, 2, ACT), b"g2")
    assert ledger.admit("d", (1, 10**6, ACT)) == StepLedger.NEW
    ledger.answered("d", (1, 10**6, ACT), b"error", refused=True)
    assert ledger.admit("d", (1, 10**6, ACT)) == b"error"
    assert ledger.admit("d", (1, 2, ACT)) == b"g2"
    assert ledger.admit("d", (1, 1, ACT)) == StepLedger.STALE
    assert ledger.admit("d", (1, 3, ACT)) == StepLedger.NEW


def _activation(step: int, *, run_id="run", round_=1, batch=4) -> bytes:
    rng = np.random.default_rng(step)
    tensors = {
        "activation": rng.standard_normal((batch, 64)).astype(np.float32),
        "labels": rng.integers(0, 10, batch).astype(np.int64),
    }
    env = Envelope(
        type=ACT, run_id=run_id, round=round_, sender="dev-0000", seq=step,
        meta={"step": step, "batch": batch, "epoch": 0}, body=encode_tensors(tensors),
    )  # fmt: skip
    return encode(env)


def test_coordinator_never_trains_or_answers_a_stale_step_again(tmp_path):
    cfg = FederatedConfig(
        run_id="run", model="digits-mlp", mode="vanilla", rounds=1, min_clients=1,
        batch_size=4, lr=0.1, momentum=0.9, out_dir=str(tmp_path / "run"), seed=0, prefix="sl",
    )  # fmt: skip
    trainer = SplitTrainer(
        cfg, mqtt=MqttConfig(client_id="cloud", port=1), test_set=None
    )  # never connected, never evaluates
    sent = []
    trainer._deliver = lambda device, payload: sent.append(decode(payload))
    state = RoundState(round=1, selected=frozenset({"dev-0000"}))
    trainer._state = state
    trainer.half.begin_round()

    def arrive(payload: bytes) -> None:
        trainer._on_up("sl/up/dev-0000", "dev-0000", payload)
        while not trainer._work._q.empty():  # what the compute thread would serve
            trainer._serve([trainer._work._q.get_nowait()])

    def weights():
        return {k: v.detach().clone() for k, v in trainer.split.cloud.state_dict().items()}

    arrive(_activation(1))
    arrive(_activation(2))
    assert [(e.type, e.meta["step"]) for e in sent] == [
        (MsgType.GRADIENT, 1),
        (MsgType.GRADIENT, 2),
    ]
    trained = weights()
    arrive(_activation(1))  # step 1 again, after step 2 was answered
    assert len(sent) == 2, "a stale step must not be answered"
    assert state.duplicates == 1 and state.rejected == 0
    for k, v in weights().items():
        assert torch.equal(v, trained[k]), f"{k}: a stale step was trained on again"
    arrive(_activation(2))  # the step in hand: the same reply again, not trained again
    assert len(sent) == 3 and sent[2].seq == sent[1].seq and state.duplicates == 2
    arrive(_activation(10**6, batch=99))  # refused: batch > batch_size
    assert sent[-1].type == MsgType.ERROR and state.rejected == 1
    arrive(_activation(3))  # the device's next step is served all the same
    assert sent[-1].type == MsgType.GRADIENT and sent[-1].meta["step"] == 3
    assert state.duplicates == 2


def test_step_worker_never_trains_or_answers_a_stale_first_step_again():
    worker = SplitStepWorker(
        worker_id="w0", group="g", prefix="sw", mqtt=MqttConfig(client_id="w0", port=1)
    )  # never started: the dispatcher side alone
    posted = []
    worker._post = lambda device, payload: posted.append(payload)

    def arrive(payload: bytes, topic="sw/steps/dev-0000/w0"):
        worker._on_step(topic, "dev-0000", payload)
        got = []
        while not worker._work.empty():
            device, env, _ = worker._work.get_nowait()
            got.append(env.meta["step"])
            worker._ledger.answered(  # as _serve does once it has trained the step
                (env.run_id, device), (env.round, env.meta["step"], env.type), b"reply%d" % got[-1]
            )
        return got

    assert arrive(_activation(1), topic="sw/steps/dev-0000") == [1]  # the shared pick-up
    assert arrive(_activation(2)) == [2]  # then this worker's own topic
    # The device's resend of step 1 on the shared topic overtook nothing on this worker's
    # topic (MQTT orders per topic only): it arrives after step 2 was answered.
    assert arrive(_activation(1), topic="sw/steps/dev-0000") == []
    assert posted == [] and worker.duplicates == 1 and worker.rejected == 0
    assert arrive(_activation(2)) == [] and posted == [b"reply2"]  # step 2's cached reply
    assert worker.duplicates == 2
    # A later run on the same long-lived worker numbers its rounds and steps from 1 again.
    assert arrive(_activation(1, run_id="run-2"), topic="sw/steps/dev-0000") == [1]
