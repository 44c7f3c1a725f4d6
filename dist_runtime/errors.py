"""Error types. Each message names the input at fault and the limit it broke."""


class DistRuntimeError(Exception):
    """Base of every error the runtime raises on purpose; the CLI prints these without a traceback."""


class CheckpointError(DistRuntimeError):
    """A Hugging Face checkpoint is malformed, incomplete or of an unsupported kind."""


class CalibrationError(DistRuntimeError):
    """A calibration text is missing or empty, or the checkpoint has no tokenizer to read it."""


class PlanError(DistRuntimeError):
    """A TP x PP layout is impossible for this model, or does not fit the memory given."""


class ConfigError(DistRuntimeError):
    """A runtime option (a flag, a --config file's key, an LLM keyword) is unknown or out of range."""


class EngineError(DistRuntimeError):
    """An engine folder is missing, corrupt, of another version, or does not match the world."""


class RequestError(DistRuntimeError):
    """A generation request asks for something the engine cannot do (too long, bad parameter);
    `field` names the request field at fault, where one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestFailed(DistRuntimeError):
    """Rank 0 could not carry one accepted request through (its text, its stop strings, its
    sink); that request ends with this error and the engine serves the others on."""
