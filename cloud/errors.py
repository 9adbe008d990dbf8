"""Exception types raised by the cloud package."""

from split import errors as _split_errors


class RoundFailedError(RuntimeError):
    """A federated round could not complete (too few clients answered in time)."""


class UpdateRejectedError(ValueError):
    """A device update broke a rule and was not aggregated."""


class BrokerError(RuntimeError):
    """The MQTT broker could not be started or configured."""


class StrategyError(ValueError):
    """An aggregation strategy name, setting or checkpoint state breaks its rule."""


class PrivacyBudgetExceededError(_split_errors.PrivacyBudgetExceededError):
    """A DP-FedAvg round would push the user-level epsilon past its target.

    Subclasses the split package's error so one ``except`` catches device and cloud stops.
    """


class SplitProtocolError(ValueError):
    """A split-learning message (activation, logit gradient) breaks the step protocol."""
