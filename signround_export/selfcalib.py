"""Data-free calibration: sequences sampled from the float model itself (`calib self`).

Each sequence starts with the tokenizer's BOS where it adds one, then a token drawn uniformly from the
vocabulary (special tokens left out), then GREEDY_TOKENS tokens chosen greedily, then tokens sampled
at TEMPERATURE from the model's full distribution until seqlen tokens; an EOS is just another token.
Text a model writes itself calibrates its quantization about as well as real text (LLM-QAT, Liu et
al., 2023). The ids are kept in a safetensors file with what they were generated under, and reused
when a later call asks for the same.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_file
from .data import bos_prefix, load_tokenizer
from .errors import DataError
from .model.folder import SELF_CALIBRATION_FILE

GREEDY_TOKENS = 3  # after the random first token: a plausible start before sampling takes over
TEMPERATURE = 1.0
BATCH = 16  # sequences generated together; part of the recipe (the generator's draws follow it)


def self_calibration_ids(folder: str | Path, count: int, seqlen: int, seed: int, cache_dir: Path | None = None,
                         progress: bool = True) -> torch.Tensor:
    """count sequences of seqlen tokens sampled from the float model in `folder`, reproducible with
    the seed: int64 [count, seqlen]. Read from cache_dir/SELF_CALIBRATION_FILE when it was generated
    under the same settings; else generated (and written there, when cache_dir is given).

    This loads the whole float model (bfloat16 where the CPU computes it natively, else float32): the
    only step of tuning that does."""
    folder = Path(folder)
    tokenizer = load_tokenizer(folder)
    prefix = bos_prefix(folder, tokenizer)
    if seqlen <= len(prefix) + 1:
        raise DataError(f"`seqlen` {seqlen} is too short to sample text after the {len(prefix)} token(s) the "
                        "tokenizer puts first; give a longer `seqlen`", param="seqlen")
    settings = {"seed": seed, "seqlen": seqlen, "count": count, "temperature": TEMPERATURE,
                "greedy_tokens": GREEDY_TOKENS, "batch": BATCH, "prefix": prefix,
                "model": str(folder.resolve()), "config_sha256": config_digest(folder)}
    cache = Path(cache_dir) / SELF_CALIBRATION_FILE if cache_dir is not None else None
    cached = read_cache(cache, settings) if cache is not None else None
    if cached is not None:
        return cached
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    first = torch.tensor([i for i in range(tokenizer.get_vocab_size()) if i not in special], dtype=torch.long)
    model, dtype = load_generator_model(folder, progress)
    first = first[first < model.get_input_embeddings().num_embeddings]
    try:
        ids = generate(model, count, seqlen, prefix, first, torch.Generator().manual_seed(seed), progress)
    finally:
        del model
        gc.collect()
    if cache is not None:
        write_cache(cache, ids, settings | {"dtype": str(dtype).removeprefix("torch.")})
    return ids


def config_digest(folder: Path) -> str:
    path = folder / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def metadata(settings: dict) -> dict[str, str]:
    """safetensors metadata holds strings only."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in settings.items()}


def read_cache(path: Path, settings: dict) -> torch.Tensor | None:
    """The cached ids when the file holds ids generated under these settings, else None (regenerate)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    wanted = metadata(settings)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
            if any(found.get(k) != v for k, v in wanted.items()):
                return None
            ids = f.get_tensor("ids")
    except (SafetensorError, OSError, RuntimeError):  # a damaged file is generated again
        return None
    return ids if ids.dtype == torch.long and ids.shape == (settings["count"], settings["seqlen"]) else None


def write_cache(path: Path, ids: torch.Tensor, settings: dict) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({"ids": ids.contiguous()}, str(tmp), metadata=metadata(settings))


def load_generator_model(folder: Path, progress: bool = True):
    """The float model through transformers, for its KV-cached forward; and the dtype it runs in.
    Without progress, transformers' own loading bar is off too (and restored after)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .tune.signround import pick_dtype

    dtype = pick_dtype(torch.device("cpu"))
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    with torch.random.fork_rng(devices=[]):  # loading may draw from the global RNG: leave it as it was
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: transformers cannot load the float model to sample `calib` self from "
                            f"({str(e)[:200]}); give calibration text instead") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return model.eval(), dtype


@torch.no_grad()
def generate(model, count: int, seqlen: int, prefix: list[int], first: torch.Tensor, g: torch.Generator,
             progress: bool) -> torch.Tensor:
    """count sequences, BATCH at a time: prefix, a token of `first` drawn uniformly, GREEDY_TOKENS greedy
    tokens, then samples at TEMPERATURE, through the model's KV cache."""
    # the KV cache's name as transformers' forward takes and returns it ("past_key_values" before 5.x)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.empty(count, seqlen, dtype=torch.long)
    start = len(prefix) + 1  # the prompt: prefix and the random first token
    bar = tqdm(total=count, desc="self calibration", unit="seq", disable=not progress)
    t0 = time.perf_counter()
    for lo in range(0, count, BATCH):
        rows = ids[lo : lo + BATCH]
        rows[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        rows[:, len(prefix)] = first[torch.randint(len(first), (len(rows),), generator=g)]
        kv = static_cache(model, seqlen)
        out = model(input_ids=rows[:, :start], use_cache=True, **({cache: kv} if kv is not None else {}))
        for t in range(start, seqlen):
            logits = out.logits[:, -1].float()
            if t < start + GREEDY_TOKENS:
                rows[:, t] = logits.argmax(-1)
            else:
                rows[:, t] = torch.multinomial(torch.softmax(logits / TEMPERATURE, -1), 1, generator=g)[:, 0]
            if t + 1 < seqlen:
                out = model(input_ids=rows[:, t : t + 1], use_cache=True, **{cache: getattr(out, cache)})
        bar.update(len(rows))
        bar.set_postfix_str(f"{(lo + len(rows)) * (seqlen - start) / (time.perf_counter() - t0):.0f} tokens/s")
    bar.close()
    return ids


def static_cache(model, seqlen: int):
    """A KV cache of seqlen positions made once (transformers' default one grows by copying itself at
    every token: 1.5x slower over 512 tokens on SmolLM2); None where this transformers cannot make one."""
    try:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=seqlen)
    except (ImportError, TypeError, ValueError):
        return None
