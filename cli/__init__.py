"""The `llmir-onnx` command line (installed as the package `llmir_onnx.cli`)."""
