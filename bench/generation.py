"""Generation benchmark: batched, left-padded generation vs one prompt at a time.

Runs trainer_client's Generator (the same code the callback uses) on one model,
for --prompts (default 32 and 128) prompts with --max-new-tokens new tokens each,
once with generation_batch_size = the prompt count and once with 1, after a
warm-up at each shape. Prints both wall times, the tokens generated and the
ratio. The model is built from a config (trainer_client.toy: a Llama of
--hidden x --layers, random weights, EOS suppressed so every prompt decodes the
full length), so nothing is downloaded. On a CUDA machine it runs there
(--device), else on the CPU.

Run from the repository root:
    . .venv/bin/activate && python bench/generation.py
"""

import argparse
import time

import torch

from trainer_client.config import PredictionsConfig
from trainer_client.generator import Generator
from trainer_client.sampler import Sampler
from trainer_client.toy import ToyTask, build_model, build_tokenizer, model_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, nargs="+", default=[32, 128],
                   help="prompt counts to time (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default %(default)s")
    p.add_argument("--hidden", type=int, default=256, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="model depth (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 keeps torch's default (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    return p.parse_args()


def build(args: argparse.Namespace):
    task = ToyTask("reverse", "abcdefgh", 4, 8)
    rows, _ = task.split(max(args.prompts) * 2, 0, args.seed)
    tokenizer = build_tokenizer(r["prompt"] + r["completion"] for r in rows)
    config = model_config(tokenizer, hidden_size=args.hidden, layers=args.layers,
                          heads=args.heads, max_positions=256)
    model = build_model(config, seed=args.seed).to(args.device).eval()
    # Random weights would stop at a random EOS; suppress it so every prompt decodes
    # exactly max_new_tokens and both modes do the same amount of work.
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    return tokenizer, model, rows


def timed(generator: Generator, model, samples, device: str) -> tuple[float, int]:
    generator.generate(model, samples, None)  # warm-up at the timed shapes
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = generator.generate(model, samples, None)
    if device == "cuda":
        torch.cuda.synchronize()
    failed = [r for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} samples failed: {failed[0].error}")
    return time.perf_counter() - started, sum(r.completion_tokens or 0 for r in results)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model, rows = build(args)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, model "
          f"{args.layers}x{args.hidden} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters), {args.max_new_tokens} new tokens per prompt")
    print(f"{'prompts':>8} {'batched s':>10} {'one-by-one s':>13} {'tokens':>8} {'ratio':>7}")
    for count in args.prompts:
        times = {}
        for batch in (count, 1):
            config = PredictionsConfig(_env_file=None, sample_count=count, max_sample_count=count,
                                       generation_batch_size=batch, seed=args.seed,
                                       max_new_tokens=args.max_new_tokens)
            samples = Sampler(rows, config, tokenizer).samples
            times[batch] = timed(Generator(config, tokenizer), model, samples, args.device)
        (batched, tokens), (single, _) = times[count], times[1]
        print(f"{count:>8} {batched:>10.2f} {single:>13.2f} {tokens:>8} {single / batched:>6.1f}x")


if __name__ == "__main__":
    main()
