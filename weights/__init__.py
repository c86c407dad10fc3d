"""Files to arrays: HF directories, GGUF files, quantized layouts and the default model.

Installed as `fastinfer.weights`.
"""
