"""The inference backends' names: a light module (no torch) for the parser and the panel."""

BACKEND_CHOICES = ("auto", "torch", "torch-bf16", "openvino", "openvino-bf16", "openvino-int8",
                   "onnxruntime")
BACKEND_HELP = {
    "auto": "OpenVINO f32 when installed, else torch; bf16 (on a bf16 CPU) or INT8 once a guard "
            "showed it labels like torch fp32 (pooled Dice >= 0.995) on reference cases",
    "torch": "PyTorch fp32 (the reference)",
    "torch-bf16": "PyTorch bfloat16 autocast (opt-in)",
    "openvino": "OpenVINO f32 (optional package)",
    "openvino-bf16": "OpenVINO with the bf16 precision hint (opt-in)",
    "openvino-int8": "OpenVINO INT8, post-training quantised with NNCF (optional packages)",
    "onnxruntime": "ONNX Runtime f32 (optional package)",
}
# the order `auto` tries on a CPU; measured in docs/benchmarks.md ("CPU inference backends")
AUTO_PREFERENCE = ("openvino",)
# what `auto` may adopt in place of OpenVINO f32 once the accuracy guard passed (backend_guard.py)
AUTO_CANDIDATES = ("openvino-bf16", "openvino-int8")
PACKAGE_OF = {"openvino": "openvino", "openvino-bf16": "openvino", "openvino-int8": "openvino",
              "onnxruntime": "onnxruntime"}
FORMAT_OF = {"openvino": "openvino", "openvino-bf16": "openvino", "openvino-int8": "openvino-int8",
             "onnxruntime": "onnx"}
OPENVINO_BACKENDS = ("openvino", "openvino-bf16", "openvino-int8")
