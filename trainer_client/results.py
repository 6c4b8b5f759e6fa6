"""What one generated sample produced; shared by the generator and the upload side.

Kept free of torch so that the upload side (and `epochlens-sync`) import fast.
"""

from dataclasses import dataclass


@dataclass
class GenerationResult:
    """The outcome of one sample: a prediction, or the error that prevented it."""

    sample_index: int
    prompt: str
    ground_truth: str | None
    prediction: str | None
    generation_time_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
