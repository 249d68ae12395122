"""The inference backends' names: a light module (no torch) for the parser and the panel."""

BACKEND_CHOICES = ("auto", "torch", "torch-bf16", "openvino", "openvino-bf16", "onnxruntime")
BACKEND_HELP = {
    "auto": "the fastest backend that matched torch fp32 (Dice >= 0.995) and is installed",
    "torch": "PyTorch fp32 (the reference)",
    "torch-bf16": "PyTorch bfloat16 autocast (opt-in)",
    "openvino": "OpenVINO f32 (optional package)",
    "openvino-bf16": "OpenVINO with the bf16 precision hint (opt-in)",
    "onnxruntime": "ONNX Runtime f32 (optional package)",
}
# the order `auto` tries on a CPU; measured in docs/benchmarks.md ("CPU inference backends")
AUTO_PREFERENCE = ("openvino",)
PACKAGE_OF = {"openvino": "openvino", "openvino-bf16": "openvino", "onnxruntime": "onnxruntime"}
FORMAT_OF = {"openvino": "openvino", "openvino-bf16": "openvino", "onnxruntime": "onnx"}
