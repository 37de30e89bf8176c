"""The one error type of the library, and a subclass per stage.

Every refusal of user input raises a SignroundError whose message says what was wrong and what to
do, in the words of the Python API: parameters by their names (`accuracy_level`, `nsamples`). When
a message is about one parameter, `param` names it, so the command line can speak of its flag
instead (`--accuracy-level`). Anything else that escapes is a bug, and shows its traceback.
"""

from __future__ import annotations


class SignroundError(ValueError):
    """Bad input, named. `param`: the API parameter the message is about, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelError(SignroundError):
    """A model folder that cannot be read as a float Hugging Face model."""


class UnsupportedModelError(ModelError):
    """A model of an architecture or feature this project does not handle."""


class DataError(SignroundError):
    """Calibration or evaluation text that cannot be used."""


class CheckpointError(SignroundError):
    """A checkpoint folder that cannot be read or written, with what is wrong and what to do."""


class TuneError(SignroundError):
    """Tuning settings that do not fit together or do not fit the model."""


class ExportError(SignroundError):
    """A checkpoint or request an exporter cannot turn into a correct file."""


class ONNXExportError(ExportError):
    pass


class MatMulNBitsError(ONNXExportError):
    """A weight MatMulNBits cannot hold exactly."""


class GGUFExportError(ExportError):
    pass


class ValidationError(SignroundError):
    """An artifact that cannot be read or compared with its checkpoint."""
