import os

import pytest


@pytest.fixture(scope="session")
def model_dir():
    """The default model as a Hugging Face folder (tests/integration/test_vllm.sh
    makes it from the GGUF model); tests that need it skip without it."""
    path = os.environ.get("APEX_VLLM_MODEL")
    if not path or not os.path.isdir(path):
        pytest.skip("APEX_VLLM_MODEL is not a model folder (run tests/integration/test_vllm.sh)")
    return path
