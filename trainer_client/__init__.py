"""epochlens trainer client: stream per-epoch predictions from a transformers Trainer.

    from trainer_client import PredictionsCallback, PredictionsConfig
    cb = PredictionsCallback(PredictionsConfig(sample_count=8), dataset=eval_ds,
                             tokenizer=tok, writer="localhost:50051", token=token)
    trainer = Trainer(..., callbacks=[cb])

Predictions that could not be uploaded stay in the spool folder; upload them
later with `epochlens-sync` (see trainer_client.offline).

The names below are imported on first use, so that the upload side (Run,
StreamingClient, the sync command) does not pay for importing torch and
transformers, and installs without them (the light distribution
epochlens-client, clients/python: torch only with its [torch] extra).
"""

import importlib

_EXPORTS = {
    "PredictionsCallback": "trainer_client.callback",
    "epoch_number": "trainer_client.callback",
    "PredictionsConfig": "trainer_client.config",
    "CostCeilingExceeded": "trainer_client.cost",
    "CostEstimate": "trainer_client.cost",
    "Generator": "trainer_client.generator",
    "GenerationResult": "trainer_client.results",
    "Sample": "trainer_client.sampler",
    "SampleFormatError": "trainer_client.sampler",
    "Sampler": "trainer_client.sampler",
    "FlushReport": "trainer_client.streaming",
    "StreamingClient": "trainer_client.streaming",
    "sync": "trainer_client.offline",
    "Run": "trainer_client.run",
    "Predictor": "trainer_client.predictor",
}

__all__ = sorted(_EXPORTS)


# What the [torch] extra of the light install (epochlens-client) adds.
TORCH_EXTRA = ("torch", "transformers", "accelerate")


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer_client' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TORCH_EXTRA:
            raise
        raise ModuleNotFoundError(
            f"trainer_client.{name} needs {exc.name}, which is not installed: "
            "pip install 'epochlens-client[torch]' (or the torch extra of your install)",
            name=exc.name) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
