"""Exception types raised by the cloud package."""


class RoundFailedError(RuntimeError):
    """A federated round could not complete (too few clients answered in time)."""


class UpdateRejectedError(ValueError):
    """A device update broke a rule and was not aggregated."""


class BrokerError(RuntimeError):
    """The MQTT broker could not be started or configured."""
