"""GPU check of the generator on the configurations DESIGN.md measured (needs CUDA).

For bf16 and fp16, with a 4-bit NF4 base (bitsandbytes) and with a plain base,
a LoRA model cast the way TRL casts PEFT models (LoRA layers to the training
dtype, norms to fp32) is trained for a few steps by a real Trainer; at each
epoch end a callback generates the same prompts twice: with a naive
``model.generate`` and with trainer_client's Generator. The known failure
(every naive sample fails on the bf16 cast) is reproduced and the Generator
must succeed on every sample in every configuration. The model is built from a
config and saved locally, so nothing is downloaded. Batched and one-by-one
generation are timed on the same model.

Run: ``python -m tests.trainer.gpu_check`` (prints one line per configuration;
exit status 1 when the Generator failed anywhere).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)

from tests.trainer.tiny import build_tokenizer, make_trainer, reversal_rows, train_features
from trainer_client.config import PredictionsConfig
from trainer_client.generator import Generator, trainer_autocast_dtype
from trainer_client.sampler import Sampler

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def save_base_model(tokenizer, folder: Path) -> Path:
    """A small Qwen2-shaped model built from config and saved (the 'hub' of this check)."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def cast_like_trl(model, dtype: torch.dtype):
    """LoRA layers and fp32 embeddings to the training dtype, norms to fp32 (TRL's casting)."""
    for name, module in model.named_modules():
        if "lora_" in name:
            module.to(dtype)
        elif "norm" in name:
            module.to(torch.float32)
        elif any(k in name for k in ("lm_head", "embed_tokens")) and hasattr(module, "weight"):
            if module.weight.dtype == torch.float32:
                module.to(dtype)
    return model


def load_model(folder: Path, dtype: torch.dtype, quantized: bool):
    if quantized:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                           "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    return cast_like_trl(model, dtype) if dtype == torch.bfloat16 else model


class CompareCallback(TrainerCallback):
    """At each epoch end: naive generate vs the Generator, on the same prompts."""

    def __init__(self, tokenizer, samples, config: PredictionsConfig):
        self.tokenizer, self.samples = tokenizer, samples
        self.generator = Generator(config, tokenizer)
        self.naive_ok = self.naive_failed = self.ours_ok = self.ours_failed = 0
        self.naive_error = ""

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        for sample in self.samples:
            self._naive(model, sample.prompt)
        results = self.generator.generate(model, self.samples, trainer_autocast_dtype(args))
        self.ours_ok += sum(1 for r in results if r.error is None)
        self.ours_failed += sum(1 for r in results if r.error is not None)
        model.train()

    def _naive(self, model, prompt: str) -> None:
        encoded = self.tokenizer(prompt, return_tensors="pt").to("cuda")
        try:
            with torch.no_grad():
                model.generate(**encoded, max_new_tokens=4)
            self.naive_ok += 1
        except RuntimeError as exc:
            self.naive_failed += 1
            self.naive_error = str(exc).splitlines()[0][:100]


def check(tokenizer, folder: Path, precision: str, quantized: bool, out: Path) -> bool:
    dtype = DTYPES[precision]
    config = PredictionsConfig(_env_file=None, sample_count=5, max_new_tokens=16,
                               generation_batch_size=8)
    samples = Sampler(reversal_rows(20, seed=9), config, tokenizer).samples
    callback = CompareCallback(tokenizer, samples, config)
    model = load_model(folder, dtype, quantized)
    features = train_features(tokenizer, reversal_rows(64))
    trainer = make_trainer(model, tokenizer, features, out, [callback], epochs=2,
                           use_cpu=False, **{precision: True})
    trainer.train()
    kind = "4-bit NF4" if quantized else "plain"
    print(f"{precision} {kind} LoRA: naive generate {callback.naive_ok} ok / "
          f"{callback.naive_failed} failed ({callback.naive_error or 'no error'}); "
          f"trainer_client Generator {callback.ours_ok} ok / {callback.ours_failed} failed",
          flush=True)
    return callback.ours_failed == 0 and callback.ours_ok == 2 * len(samples)


def time_batching(tokenizer, folder: Path, prompts: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    times = {}
    for batch in (prompts, 1):
        config = PredictionsConfig(_env_file=None, sample_count=prompts, max_new_tokens=32,
                                   generation_batch_size=batch, max_sample_count=prompts)
        samples = Sampler(reversal_rows(prompts * 2, seed=4), config, tokenizer).samples
        generator = Generator(config, tokenizer)
        generator.generate(model, samples, torch.bfloat16)  # warm-up at the timed shapes
        torch.cuda.synchronize()
        started = time.perf_counter()
        generator.generate(model, samples, torch.bfloat16)
        torch.cuda.synchronize()
        times[batch] = time.perf_counter() - started
    return (f"{prompts} prompts x 32 new tokens: batched {times[prompts]:.2f}s, one by one "
            f"{times[1]:.2f}s, ratio {times[1] / times[prompts]:.1f}x")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    tokenizer = build_tokenizer()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_base_model(tokenizer, Path(tmp) / "base")
        for precision in ("bf16", "fp16"):
            for quantized in (True, False):
                if "--timing-only" not in sys.argv:
                    ok &= check(tokenizer, folder, precision, quantized, Path(tmp) / "out")
        for prompts in (32, 128):
            print(time_batching(tokenizer, folder, prompts), flush=True)
    print("GPU check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
