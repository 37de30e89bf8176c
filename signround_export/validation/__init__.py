"""Validation: how far each deployed file is from its checkpoint's reference, and perplexity."""

from .metrics import Perplexity, Scores, folder_perplexity, perplexity
from .report import ArtifactReport, Thresholds, ValidationResult, write_report
from .validate import validate

__all__ = ["ArtifactReport", "Perplexity", "Scores", "Thresholds", "ValidationResult", "folder_perplexity",
           "perplexity", "validate", "write_report"]
