"""vlmtune-native model code for checkpoints whose only upstream implementation is Hugging Face remote code.

`minicpmv` loads and trains the MiniCPM-V 2.6 / 4.x remote-code layout (`vpm` · `resampler` · `llm`) without
`trust_remote_code`; `minicpmv_image` is its image slicing and placeholder logic.
"""
