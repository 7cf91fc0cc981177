"""The channel that carries APEX's block copies from vLLM's scheduler to the
worker that owns APEX's context.

The scheduler (engine-core process) decides migrations; the KV lives in the
worker, which is the same process with UniProcExecutor and another one with
MultiprocExecutor (the CPU platform's choice under `vllm serve`). The
scheduler appends one line per batch of copies to a file; the worker reads
the lines it has not applied yet when it builds a step's attention metadata,
before that step's first attention call, and applies them in order with
apex_paged_copy_blocks.

Why that is ordered: the scheduler writes (and closes) its lines before
schedule() returns, vLLM then sends that step's SchedulerOutput to the
worker, and the worker reads after receiving it (a later read of a file sees
an earlier write on the same machine). The CPU platform runs no async
scheduling, so schedule(N + 1) starts only after the worker finished step N.
Source blocks are not handed to other requests before the worker applied
the copies (the scheduler frees them only after a step with a forward ran),
so vLLM's zeroing of newly allocated blocks never reaches a pending source.

APEX_VLLM_COPIES names the file; the plugin's entry point sets it in the
first vLLM process, and engine-core and worker processes inherit it.
"""
import os
import tempfile

ENV = "APEX_VLLM_COPIES"


def default_path() -> str:
    if not os.environ.get(ENV):
        d = os.path.join(tempfile.gettempdir(), f"apex-vllm-{os.getpid()}")
        os.makedirs(d, exist_ok=True)
        os.environ[ENV] = os.path.join(d, "block-copies.txt")
    return os.environ[ENV]


def reset() -> None:
    """The scheduler starts the channel empty (a new engine)."""
    open(default_path(), "w").close()


def send(src: list[int], dst: list[int]) -> None:
    if not src:
        return
    line = " ".join(map(str, src)) + "|" + " ".join(map(str, dst)) + "\n"
    with open(default_path(), "a") as f:
        f.write(line)


class Reader:
    """The worker's side: the copies written since its last read."""

    def __init__(self):
        self.offset = 0

    def take(self) -> list[tuple[list[int], list[int]]]:
        try:
            with open(default_path(), "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() < self.offset:
                    self.offset = 0  # the scheduler started a new channel
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        out = []
        for line in data[:end].decode().splitlines():
            s, d = line.split("|")
            out.append(([int(x) for x in s.split()], [int(x) for x in d.split()]))
        return out
