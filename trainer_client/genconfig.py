"""A transformers.GenerationConfig mapped onto the predictions config.

Only what the generator does is taken, and nothing is dropped silently:

- ``max_new_tokens``, ``do_sample`` (``greedy = not do_sample``), ``temperature``,
  ``top_p``, ``top_k`` and ``repetition_penalty`` replace the config's values;
- token ids (``bos``/``eos``/``pad``/``decoder_start_token_id``) are ignored with an
  INFO line: the generator stops on the tokenizer's EOS and the model's
  generation config EOS ids, and pads with the tokenizer's pad token;
- any other setting that differs from GenerationConfig's default (``num_beams``,
  ``max_length``, ``min_new_tokens``, ...) is refused with a ValueError naming it,
  since predictions made without it would not be what the caller asked for.
"""

import logging
from typing import Any

from trainer_client.config import PredictionsConfig

log = logging.getLogger(__name__)

MAPPED = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
TOKEN_IDS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id",
                       "decoder_start_token_id"})
# Bookkeeping keys of GenerationConfig.to_diff_dict(), not generation settings.
BOOKKEEPING = frozenset({"transformers_version", "_from_model_config"})


def apply_generation_config(config: PredictionsConfig,
                            generation_config: Any) -> PredictionsConfig:
    """A copy of `config` with the GenerationConfig's settings (see the module doc)."""
    if generation_config is None:
        return config
    if not hasattr(generation_config, "to_diff_dict"):
        raise ValueError(f"generation_config must be a transformers.GenerationConfig, not a "
                         f"{type(generation_config).__name__}")
    given = {k: v for k, v in generation_config.to_diff_dict().items() if k not in BOOKKEEPING}
    refused = sorted(k for k in given if k not in TOKEN_IDS and k not in MAPPED
                     and k != "do_sample")
    if refused:
        raise ValueError(f"generation_config sets {refused}, which predictions do not "
                         f"support; supported: do_sample, {', '.join(MAPPED)}")
    ignored = sorted(k for k in given if k in TOKEN_IDS)
    if ignored:
        log.info("generation_config: %s ignored (stop and pad tokens come from the tokenizer "
                 "and the model's generation config)", ", ".join(ignored))
    update: dict[str, Any] = {k: given[k] for k in MAPPED if given.get(k) is not None}
    if "do_sample" in given:
        update["greedy"] = not given["do_sample"]
    return PredictionsConfig(_env_file=None, **{**config.model_dump(), **update})
