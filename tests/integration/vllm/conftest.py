import os

import pytest

from workload import POOL, WORKLOAD


@pytest.fixture(scope="session")
def model_dir():
    """The default model as a Hugging Face folder (tests/integration/test_vllm.sh
    makes it from the GGUF model); tests that need it skip without it."""
    path = os.environ.get("APEX_VLLM_MODEL")
    if not path or not os.path.isdir(path):
        pytest.skip("APEX_VLLM_MODEL is not a model folder (run tests/integration/test_vllm.sh)")
    return path


@pytest.fixture(scope="session")
def base(model_dir):
    """vLLM alone (its CPU attention backend, no APEX plugin selected) on the
    workload, in a pool of POOL blocks: the tokens every APEX run must give."""
    from test_generate import run
    return run(model_dir, "vllm", {"VLLM_CPU_KVCACHE_SPACE": "1"},
               WORKLOAD + ["--num-blocks", str(POOL)])
