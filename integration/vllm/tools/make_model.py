"""Dequantises the default GGUF model (setup_hooks/fetch_model.sh) into a
Hugging Face folder (config, tokenizer, safetensors) that vLLM loads, with
transformers' own GGUF reader. Nothing is downloaded.

    python make_model.py GGUF_FILE OUT_DIR
"""
import os
import sys


def main() -> int:
    gguf, out = sys.argv[1], sys.argv[2]
    if os.path.exists(os.path.join(out, "model.safetensors")):
        print(out)
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    tmp = out + ".tmp"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    # The weights are dequantised floats now; drop the GGUF marker so that
    # transformers writes them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # a half-written folder is never mistaken for a model
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
